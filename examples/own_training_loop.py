"""PENNI inside your own PyTorch training loop (no Ray, no MLflow): python examples/own_training_loop.py"""
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

import penni
from penni.models import build_model

torch.manual_seed(0)
# FakeData is generated locally (no download); use your own DataLoader here.
data = datasets.FakeData(size=256, image_size=(1, 28, 28), num_classes=10, transform=transforms.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
example = torch.stack([data[i][0] for i in range(8)])


def train(model, epochs, lr=0.05, lam=0.0, schedule=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for epoch in range(epochs):
        if schedule:
            print(f"  epoch {epoch}: training {schedule.start_epoch(model, opt, epoch)}")
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            if lam:
                loss = loss + lam * penni.l1_penalty(model)   # sparsify the coefficients
            opt.zero_grad()
            loss.backward()
            if schedule:
                schedule.drop_frozen_gradients(model, epoch)  # freeze basis or coefficients
            opt.step()
    return model


# 1. your model, trained as usual (build_model records how to rebuild it for penni.load)
model = train(build_model("fashion_cnn", num_classes=10, in_channels=1), epochs=2)
before = penni.profile(model.eval(), example)

# 2. decompose: every 3x3 conv -> d=5 shared basis kernels + coefficients (SVD init)
penni.decompose(model, d=5)

# 3. sparse retraining: L1 on the coefficients, basis and coefficients learn in turn
train(model, epochs=4, lr=0.02, lam=1e-3, schedule=penni.AlternatingSchedule(every=1))

# 4. prune small coefficients (the zeros are held by masks), then fine-tune
sparsity = penni.prune(model, rule="std", s=1.0)
print("pruned:", {k: round(v, 2) for k, v in sparsity.items()})
train(model, epochs=1, lr=0.01)
print(f"coefficient sparsity after fine-tuning: {penni.coefficient_sparsity(model):.2f}")  # masks held the zeros

# 5. shrink: physically drop dead channels and unused basis kernels (same function)
model.eval()
small = penni.shrink(model, example).eval()
with torch.no_grad():
    print("max |shrunk - pruned|:", (small(example) - model(example)).abs().max().item())

print("\n## before (dense)\n" + before.to_markdown())
print("## after (decomposed, pruned, shrunk)\n" + penni.profile(small, example).to_markdown())

# 6. save (safetensors + JSON recipe, nothing pickled) and load back
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "fashion_cnn_penni.safetensors"
    penni.save(small, path)
    loaded = penni.load(path).eval()
with torch.no_grad():
    assert torch.equal(loaded(example), small(example)), "loaded model differs"
print(f"saved and loaded {path.name}: identical outputs")
