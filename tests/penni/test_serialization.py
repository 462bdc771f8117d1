"""penni.save / penni.load: safetensors + JSON recipe round trips, held masks, refusing pickles."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import penni
from penni.masking import get_mask, hold_mask, iter_masks, raw_parameter
from penni.models import build_model
from penni.recipe import get_recipe, set_constructor
from penni.serialization import format as serialization
from penni.serialization.format import load, load_state, read_metadata, save, save_state
from penni.serialization.replay import recipe_json
from penni.serialization.tensors import PenniFormatError
from penni.slicing import add_bias, slice_in, slice_out, slice_penni_basis
from tests.helpers import randomize_batchnorm


def pruned(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, in_channels=1 if arch == "fashion_cnn" else 3)
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    penni.prune(model, rule="std", s=1.0)
    return model.eval()


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{tensor}": mask.clone() for name, _, tensor, mask in iter_masks(model)}


def assert_same_masks(a: nn.Module, b: nn.Module) -> None:
    ma, mb = masks_of(a), masks_of(b)
    assert ma, "the model holds no masks"
    assert set(ma) == set(mb)
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


def assert_round_trip(model: nn.Module, x: torch.Tensor, path: Path, **load_kw) -> nn.Module:
    model.eval()
    with torch.no_grad():
        expected = model(x)
    save(model, path, factories=load_kw.get("factories"))
    loaded = load(path, **load_kw).eval()
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(expected, got)
    assert get_recipe(loaded).to_dict() == json.loads(recipe_json(model))
    return loaded


def file_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), dict(f.metadata())


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch,shape", [("fashion_cnn", (2, 1, 28, 28)), ("resnet56", (2, 3, 32, 32))])
def test_round_trip_decomposed_pruned_keeps_masks(tmp_path, arch, shape):
    model = pruned(arch)
    x = torch.randn(*shape)
    path = tmp_path / "model.safetensors"
    loaded = assert_round_trip(model, x, path)

    keys, metadata = file_keys(path)
    assert not any("parametrizations" in k for k in keys)
    assert metadata["penni_format"] == "1"
    recipe = json.loads(metadata["penni_recipe"])
    assert recipe["constructor"]["factory"] == "penni.models:build_model"
    assert recipe["decomposed"] == get_recipe(model).decomposed
    mask_keys = [k for k in keys if k.endswith("::mask")]
    assert len(mask_keys) == len(masks_of(model)) > 0

    # masks are held again after loading, not merely baked into the values
    assert_same_masks(model, loaded)
    first = next(m for m in loaded.modules() if isinstance(m, penni.PenniConv2d))
    assert get_mask(first, "coefficients") is not None
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in loaded.modules())


def test_loaded_masks_hold_through_finetuning(tmp_path):
    model = pruned("fashion_cnn")
    save(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors").train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(loaded(x), y).backward()
        opt.step()
    for _, module, tensor, mask in iter_masks(loaded):
        assert torch.all(getattr(module, tensor)[mask == 0] == 0)


def cut(model: nn.Module, layer: str, axis: str, idx: list[int]) -> None:
    """Slice one layer in place and record it the way penni.shrink does."""
    module = model.get_submodule(layer)
    if axis == "basis":
        slice_penni_basis(module, torch.tensor(idx))
    elif axis == "out":
        slice_out(module, idx)
    else:
        slice_in(module, idx)
    get_recipe(model).record_kept(layer, axis, idx)


def hand_sliced() -> nn.Module:
    torch.manual_seed(3)
    model = build_model("fashion_cnn", in_channels=1)
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    keep = [0, 1, 3, 5, 6, 9, 12, 15]
    for layer, axis in [("features.conv1_2", "out"), ("features.bn1_2", "out"), ("features.conv2_1", "in")]:
        cut(model, layer, axis, keep)
    for layer, axis in [("features.conv1_2", "out"), ("features.bn1_2", "out"), ("features.conv2_1", "in")]:
        cut(model, layer, axis, [0, 2, 3, 7])          # a second cut composes with the first
    cut(model, "features.conv2_2", "basis", [0, 2, 4])
    cut(model, "features.conv2_2", "basis", [1, 2])
    keep = list(range(0, 64, 3))
    for layer, axis in [("features.conv3_2", "out"), ("features.bn3_2", "out"), ("classifier", "in")]:
        cut(model, layer, axis, keep)
    for layer in ("features.conv3_1", "classifier"):
        module = model.get_submodule(layer)
        out = module.out_channels if hasattr(module, "out_channels") else module.out_features
        if add_bias(module, torch.randn(out)):
            get_recipe(model).added_bias.append(layer)
    return model.eval()


def test_round_trip_hand_sliced_replays_kept_indices(tmp_path):
    model = hand_sliced()
    recipe = get_recipe(model)
    assert recipe.kept["features.conv1_2"]["out"] == [0, 3, 5, 15]
    assert recipe.kept["features.conv2_2"]["basis"] == [2, 4]
    assert recipe.added_bias == ["features.conv3_1"]         # the classifier already had one
    assert model.features.conv2_2.d == 2 and model.features.conv2_1.in_channels == 4
    loaded = assert_round_trip(model, torch.randn(2, 1, 28, 28), tmp_path / "sliced.safetensors")
    assert loaded.features.conv2_2.d == 2
    assert loaded.features.conv1_2.out_channels == 4 and loaded.features.bn1_2.num_features == 4
    assert loaded.classifier.in_features == len(range(0, 64, 3))
    assert loaded.features.conv3_1.bias is not None


def test_round_trip_hand_sliced_then_pruned(tmp_path):
    model = hand_sliced()
    penni.prune(model, rule="sparsity", target=0.5)
    loaded = assert_round_trip(model, torch.randn(2, 1, 28, 28), tmp_path / "m.safetensors")
    assert_same_masks(model, loaded)


def test_round_trip_real_shrink(tmp_path):
    from penni.shrinking import shrink

    torch.manual_seed(4)
    model = build_model("fashion_cnn", in_channels=1)
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    # dead output channels and a dead basis kernel, so shrink has channels and bases to drop
    conv = model.features.conv2_1
    mask = torch.ones_like(conv.coefficients)
    mask[::3] = 0
    mask[:, :, 1] = 0
    hold_mask(conv, "coefficients", mask)
    penni.prune(model, rule="std", s=0.5)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    small = shrink(model, x)
    small = model if small is None else small
    recipe = get_recipe(small)
    assert recipe.kept, "shrink recorded no kept indices"
    assert small.features.conv2_1.out_channels < 32
    loaded = assert_round_trip(small, x, tmp_path / "shrunk.safetensors")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())


def test_forward_mode_dtype_and_wrappers(tmp_path):
    model = pruned("fashion_cnn")
    penni.set_forward_mode(model, "dense")
    x = torch.randn(2, 1, 28, 28)
    loaded = assert_round_trip(torch.nn.DataParallel(model), x, tmp_path / "dp.safetensors")
    assert all(m.forward_mode == "dense" for m in penni.penni_layers(loaded).values())

    penni.set_forward_mode(model, "reconstruct")
    half = pruned("fashion_cnn").to(torch.bfloat16)
    save(torch.compile(half), tmp_path / "compiled.safetensors")   # unwrapped, never compiled
    loaded = load(tmp_path / "compiled.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(half(x.bfloat16()), loaded.eval()(x.bfloat16()))


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = pruned("fashion_cnn")
        assert_round_trip(nn.parallel.DistributedDataParallel(model), torch.randn(2, 1, 28, 28),
                          tmp_path / "ddp.safetensors")
    finally:
        dist.destroy_process_group()


class Tied(nn.Module):
    """Tied weights and a non-contiguous buffer: both break a naive safetensors save."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.ones(3, width).t())

    def forward(self, x):
        return self.b(self.a(x)) * self.scale[:, 0]


def test_tied_weights_and_custom_factory(tmp_path):
    factory = f"{__name__}:Tied"
    model = set_constructor(Tied(width=6), factory, width=6)
    with torch.no_grad():
        model.scale.mul_(torch.rand(6, 3))
    path = tmp_path / "tied.safetensors"
    with pytest.raises(ValueError, match="register_factory"):
        save(model, path)                                             # not registered: save says how
    assert not path.exists()
    save(model, path, factories={factory: Tied})
    with pytest.raises(PenniFormatError, match="factories="):
        load(path)                                                    # nothing named in a file is imported
    loaded = assert_round_trip(model, torch.randn(2, 6), path, factories={factory: Tied})
    assert loaded.a.weight is loaded.b.weight


def test_registered_factory(tmp_path):
    factory = f"{__name__}:registered_tied"
    penni.register_factory(factory, Tied)
    assert factory in penni.registered_factories() and penni.get_factory(factory) is Tied
    assert "penni.models:build_model" in penni.registered_factories()
    with pytest.raises(ValueError, match="already registered"):
        penni.register_factory(factory, nn.Linear)
    with pytest.raises(ValueError, match="torchvision"):
        penni.register_factory("torchvision.models:resnet18", Tied)
    model = set_constructor(Tied(width=5), factory, width=5)
    loaded = assert_round_trip(model, torch.randn(2, 5), tmp_path / "tied.safetensors")
    assert loaded.a.weight is loaded.b.weight


def test_importing_only_the_serialization_package_registers_penni_models():
    """The factory registry never imports penni.models; ``import penni`` (run by any ``import penni.x``) does."""
    code = ("import sys, penni.serialization.factories as f; "
            "assert f.registered_factories() == ['penni.models:build_model'], f.registered_factories(); "
            "assert 'penni.models' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_torchvision_arch_has_one_spelling_and_old_files_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=3).eval()
    assert get_recipe(model).constructor["kwargs"]["arch"] == "torchvision.models:resnet18"
    # a file written before: its recipe says arch="torchvision:resnet18"
    set_constructor(model, "penni.models:build_model", arch="torchvision:resnet18", num_classes=3, in_channels=3)
    path = tmp_path / "old.safetensors"
    save(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["penni_recipe"])["constructor"]["kwargs"]["arch"] == "torchvision:resnet18"
    loaded = load(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # build_model reads the old spelling as the one spelling; the loaded recipe is the file's, as written


def test_constructor_argument_and_missing_constructor(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="set_constructor"):
        save(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(TypeError, match="JSON"):
        save(model, tmp_path / "x.safetensors", constructor=("penni.models:build_model", {"arch": object()}))

    model = build_model("fashion_cnn", in_channels=1, widths=[4, 8, 8])
    other = build_model("fashion_cnn", in_channels=1, widths=[4, 8, 8])
    save(other, tmp_path / "y.safetensors", constructor=("penni.models:build_model",
                                                         {"arch": "fashion_cnn", "in_channels": 1,
                                                          "widths": [4, 8, 8]}))
    assert get_recipe(other).constructor == get_recipe(model).constructor   # the model is not changed
    assert load(tmp_path / "y.safetensors").classifier.in_features == 8
    del model
    save(build_model("fashion_cnn", in_channels=1, widths=(4, 8, 6)), tmp_path / "t.safetensors")  # a tuple
    assert load(tmp_path / "t.safetensors").classifier.in_features == 6


def test_save_refuses_a_recipe_that_does_not_rebuild_the_model(tmp_path):
    model = build_model("fashion_cnn", in_channels=1)
    model.classifier = nn.Linear(64, 7)          # an edit penni did not record
    with pytest.raises(ValueError, match="does not rebuild"):
        save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    save(model, tmp_path / "m.safetensors", verify=False)
    with pytest.raises(PenniFormatError, match="classifier"):
        load(tmp_path / "m.safetensors")


def test_metadata(tmp_path):
    model = build_model("fashion_cnn", in_channels=1)
    save(model, tmp_path / "m.safetensors", metadata={"stage": "finetune", "top1": "0.91"})
    assert read_metadata(tmp_path / "m.safetensors") == {"stage": "finetune", "top1": "0.91"}
    with pytest.raises(ValueError, match="reserved"):
        save(model, tmp_path / "m.safetensors", metadata={"penni_recipe": "{}"})


# ---------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""
    def boom(*args, **kwargs):
        raise AssertionError("penni tried to unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)


def test_refuses_torch_save_state_dict(tmp_path, no_unpickling):
    path = tmp_path / "model.pt"
    torch.save(build_model("fashion_cnn", in_channels=1).state_dict(), path)
    with pytest.raises(PenniFormatError, match="pickled code") as info:
        load(path)
    assert "weights_only=True" in str(info.value) and "penni.save" in str(info.value)
    with pytest.raises(PenniFormatError, match="pickled code"):
        load_state(build_model("fashion_cnn", in_channels=1), path)


def test_refuses_torch_save_whole_model(tmp_path, no_unpickling):
    path = tmp_path / "model.safetensors"       # the name does not matter, the content does
    torch.save(build_model("fashion_cnn", in_channels=1), path)
    with pytest.raises(PenniFormatError, match="will not unpickle"):
        load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PenniFormatError, match="pickle"):
        load(legacy)


def test_refuses_random_bytes_and_plain_safetensors(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(PenniFormatError, match="not a safetensors file"):
        load(path)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(PenniFormatError):
        load(tmp_path / "empty.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, 3')
    with pytest.raises(PenniFormatError):
        load(broken)
    plain = tmp_path / "plain.safetensors"
    save_file(build_model("fashion_cnn", in_channels=1).state_dict(), str(plain))
    with pytest.raises(PenniFormatError, match="load_state"):
        load(plain)
    model = build_model("fashion_cnn", in_channels=1)
    load_state(model, plain)                     # plain tensors are fine for load_state


def write_recipe_file(path: Path, factory: str, kwargs: dict, **fields) -> None:
    recipe = {"constructor": {"factory": factory, "kwargs": kwargs}, "decomposed": {}, "kept": {},
              "added_bias": [], "version": 1, **fields}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"penni_format": "1", "penni_recipe": json.dumps(recipe)})


@pytest.mark.parametrize("fields", [{"kept": [1, 2]}, {"kept": {"features.conv1_1": {"out": ["0"]}}},
                                    {"decomposed": {"features.conv1_1": "5"}}, {"version": 99},
                                    {"constructor": "os:system"}, {"evil": 1}])
def test_refuses_malformed_recipes(tmp_path, fields):
    path = tmp_path / "bad.safetensors"
    write_recipe_file(path, "penni.models:build_model", {"arch": "fashion_cnn"}, **fields)
    with pytest.raises(PenniFormatError, match="unreadable penni recipe"):
        load(path)


@pytest.mark.parametrize("factory", ["os:system", "pennix.evil:make", "torchvision.datasets:MNIST", "builtins:eval"])
def test_refuses_factories_outside_the_allow_list(tmp_path, factory):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    write_recipe_file(path, factory, {"command": f"touch {marker}"})
    with pytest.raises(PenniFormatError, match="factories=") as info:
        load(path)
    assert factory in str(info.value)
    assert not marker.exists()


def test_allowed_factory_with_wrong_tensors_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    write_recipe_file(path, "penni.models:build_model", {"arch": "fashion_cnn"})
    with pytest.raises(PenniFormatError, match="do not fit"):
        load(path)


# ---------------------------------------------------------------------------------- atomic writes


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    model = pruned("fashion_cnn")
    save(model, path)
    before = path.read_bytes()

    with pytest.raises(TypeError, match="str"):
        save(model, path, metadata={"epoch": 3})          # not serializable as safetensors metadata
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)                      # the start of a file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        save(model, path)
    with pytest.raises(OSError):
        save(model, tmp_path / "new.safetensors")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    monkeypatch.undo()
    assert_same_masks(model, load(path))


# ---------------------------------------------------------------------------------- save_state / load_state


def test_save_state_load_state_with_masks(tmp_path):
    source = pruned("fashion_cnn", seed=0)
    save_state(source, tmp_path / "state.safetensors", metadata={"epoch": "3"})
    keys, metadata = file_keys(tmp_path / "state.safetensors")
    assert "penni_recipe" not in metadata and any(k.endswith("::mask") for k in keys)

    target = pruned("fashion_cnn", seed=1)               # other values, other masks
    params = {name: raw_parameter(m, "coefficients") for name, m in penni.penni_layers(target).items()}
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    assert load_state(target, tmp_path / "state.safetensors") is target
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(source(x), target.eval()(x))
    assert_same_masks(source, target)
    for name, m in penni.penni_layers(target).items():  # the optimizer's parameters are still the model's
        assert raw_parameter(m, "coefficients") is params[name]
    assert any(p is params["features.conv1_1"] for g in opt.param_groups for p in g["params"])

    with pytest.raises(PenniFormatError, match="do not fit"):
        load_state(build_model("resnet56"), tmp_path / "state.safetensors")
    dense = build_model("fashion_cnn", in_channels=1)                   # not decomposed: keys differ, masks untouched
    with pytest.raises(PenniFormatError, match="missing from the file"):
        load_state(dense, tmp_path / "state.safetensors")
