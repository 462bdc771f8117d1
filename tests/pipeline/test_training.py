"""The training loop in-process (no Ray): resumption after a crash, masks held, alternation."""
from __future__ import annotations

import pytest
import torch

import penni
from penni.models import build_model
from pipeline.config.loading import load_config, to_dict
from pipeline.stages.functions import finetune_training, retrain_training
from pipeline.training import loop as T
from pipeline.training.distributed import TrainJob, training_loop
from pipeline.training.worlds import LocalWorld


def _job(tmp_path, stage: str, epochs: int, model: torch.nn.Module, *overrides: str) -> dict:
    cfg = load_config("tiny", [f"{stage}.epochs={epochs}", "data.train_subset=256", "data.val_subset=64", *overrides])
    path = tmp_path / "input.safetensors"
    penni.save(model, path)
    training = {"retrain": lambda: retrain_training(cfg.retrain),
                "finetune": lambda: finetune_training(cfg.finetune, tmp_path / "teacher.safetensors")}[stage]()
    return TrainJob(stage=stage, config=to_dict(cfg), input_model=str(path), training=training).to_dict()


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    job = _job(tmp_path, "retrain", 3, model)
    real = T.train_one_epoch
    calls = []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(kwargs["epoch"])
        if kwargs["epoch"] == 2 and calls.count(2) == 1:
            raise RuntimeError("simulated node loss")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(RuntimeError, match="simulated"):
        training_loop(job, LocalWorld(tmp_path / "ckpt", use_gpu=False))
    result = training_loop(job, LocalWorld(tmp_path / "ckpt", use_gpu=False))
    assert calls == [0, 1, 2, 2]  # epochs 0 and 1 were not trained again
    assert "resuming from epoch 2" in capsys.readouterr().out
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert [h["phase"] for h in result["history"]] == ["coefficients", "basis", "coefficients"]


def test_finetune_holds_masks_of_a_pruned_checkpoint(tmp_path):
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    penni.prune(model, rule="sparsity", target=0.7)
    job = _job(tmp_path, "finetune", 2, model)
    world = LocalWorld(tmp_path / "ckpt", use_gpu=False)
    training_loop(job, world)
    trained = penni.load(world.latest_checkpoint() / "model.safetensors")
    for _, module, name, mask in penni.masking.iter_masks(trained):
        assert (getattr(module, name)[mask == 0] == 0).all()
    assert abs(penni.coefficient_sparsity(trained) - 0.7) < 0.01
    before = penni.penni_layers(model)["features.conv2_1"].coefficients
    after = penni.penni_layers(trained)["features.conv2_1"].coefficients
    assert not torch.equal(before, after)  # it did train


def test_optimizer_excludes_decay_on_norms_and_biases_but_not_basis():
    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    cfg = load_config("tiny")
    opt = T.build_optimizer(model, cfg.retrain)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    layer = penni.penni_layers(model)["features.conv1_1"]
    assert id(layer.basis) in decayed and id(layer.coefficients) in decayed
    assert id(model.features.bn1_1.weight) not in decayed


def test_distillation_loss_on_known_logits():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2])
    t, w = 2.0, 0.25
    p_teacher = torch.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, dim=1))).sum(dim=1).mean()
    ce = -torch.log_softmax(student, dim=1)[torch.arange(2), labels].mean()
    got = T.distillation_loss(student, teacher, labels, temperature=t, weight=w)
    assert torch.allclose(got, (1 - w) * ce + w * t * t * kl, atol=1e-6)
    assert torch.allclose(T.distillation_loss(student, teacher, labels, t, 0.0), ce)
    assert T.distillation_loss(teacher, teacher, labels, t, 1.0).abs() < 1e-6  # nothing to learn from itself


def test_finetune_with_distillation_learns_from_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("fashion_cnn", in_channels=1)
    penni.save(teacher, tmp_path / "teacher.safetensors")
    student = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    losses = {}
    for distill in ("false", "true"):
        job = _job(tmp_path, "finetune", 1, student, f"finetune.distill={distill}", "finetune.distill_weight=0.9")
        assert (job["training"]["distillation"] is not None) == (distill == "true")
        result = training_loop(job, LocalWorld(tmp_path / f"ckpt-{distill}", use_gpu=False))
        losses[distill] = result["history"][0]["train_loss"]
    assert losses["true"] != losses["false"]


def test_recalibrate_batchnorm_replaces_stale_statistics_with_those_of_the_batches():
    """Precise BN: stale running statistics (as after an epoch of strong L1) become the batches' own, and the
    data-parallel average (a sum over 2 identical replicas, halved) leaves them unchanged."""
    import torch
    from torch import nn

    from pipeline.training.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(100.0)
    batches = [(torch.randn(8, 3, 10, 10) * 2 + 1, torch.zeros(8)) for _ in range(5)]
    recalibrate_batchnorm(model, iter(batches), num_batches=3, all_reduce=lambda t: 2 * t, world_size=2)
    with torch.no_grad():
        seen = torch.cat([model[0](x) for x, _ in batches[:3]])  # only the first 3 batches count
    expected_mean = seen.mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-4)
    per_batch_var = torch.stack([model[0](x).detach().var(dim=(0, 2, 3)) for x, _ in batches[:3]]).mean(0)
    assert torch.allclose(model[1].running_var, per_batch_var, rtol=1e-3)   # update_bn: the batches' mean variance
    assert model[1].momentum == 0.1 and model.training  # momentum and train mode restored


def test_every_epoch_ends_with_batchnorm_statistics_of_the_final_weights(tmp_path):
    """The loop's precise-BN step: after a retraining epoch (L1) and after a fine-tuning epoch (no penalty) alike,
    the saved model's BatchNorm statistics come from the recalibration pass (16 batches), not from the epoch's
    running averages (an epoch is 32 batches of 8: running averages would have counted them too)."""
    from pipeline.training.distributed import BN_RECALIBRATION_BATCHES

    def tracked(world) -> set[int]:
        trained = penni.load(world.latest_checkpoint() / "model.safetensors")
        return {int(m.num_batches_tracked) for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    model = penni.decompose(build_model("fashion_cnn", in_channels=1), d=5)
    for stage, expected in (("retrain", {BN_RECALIBRATION_BATCHES}), ("finetune", {BN_RECALIBRATION_BATCHES})):
        world = LocalWorld(tmp_path / f"ckpt-{stage}", use_gpu=False)
        training_loop(_job(tmp_path, stage, 1, model, "data.batch_size=8"), world)
        assert tracked(world) == expected, stage  # untrained input: 0 tracked; an epoch is 32 batches of 8
