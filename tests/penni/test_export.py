"""penni.to_torch gives a plain-torch copy with the same outputs; torch.export and ONNX Runtime agree."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import penni
from penni import INFERENCE_MODES, PenniConv2d
from penni.models import build_model
from tests.helpers import randomize_batchnorm


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def no_penni_class(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("penni") for m in model.modules())


def compressed(arch: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    """decompose + prune (masks held) + shrink, every layer in a different inference form."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=shape[1])
    randomize_batchnorm(model)
    penni.decompose(model, d=5)
    model.eval()
    penni.prune(model, rule="sparsity", target=0.9)
    x = torch.randn(*shape)
    small = penni.shrink(model, x).eval()
    penni.prune(small, rule="sparsity", target=0.95)  # held masks on the shrunk model, baked by to_torch
    for i, layer in enumerate(penni.penni_layers(small).values()):
        layer.set_forward_mode(INFERENCE_MODES[i % len(INFERENCE_MODES)])
    return small, x


MODELS = [("fashion_cnn", (2, 1, 28, 28)), ("resnet18", (2, 3, 32, 32))]


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def case(request):
    arch, shape = request.param
    model, x = compressed(arch, shape)
    with torch.no_grad():
        expected = model(x)
    return model, x, expected


def test_to_torch_is_plain_and_exact(case):
    model, x, expected = case
    plain = penni.to_torch(model)
    assert no_penni_class(plain)
    convs = sum(isinstance(m, (nn.Conv2d, PenniConv2d)) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) > convs  # factorized layers became pairs
    with torch.no_grad():
        assert rel_err(plain(x), expected) <= 1e-5
    assert any(isinstance(m, PenniConv2d) for m in model.modules())  # the input model is unchanged


def test_sparse_layers_export_as_the_named_form():
    layer = PenniConv2d(16, 16, 3, 3, padding=1).eval()
    layer.set_forward_mode("factorized_sparse")
    assert isinstance(penni.export.plain_layers(layer), nn.Sequential)  # d=3 < 9 taps: the pair is cheaper
    assert isinstance(penni.export.plain_layers(layer, sparse_as="dense"), nn.Conv2d)
    wide = PenniConv2d(16, 16, 3, 9, padding=1).eval()
    wide.set_forward_mode("factorized_batched_sparse")
    assert isinstance(penni.export.plain_layers(wide), nn.Conv2d)
    with pytest.raises(ValueError, match="sparse_as"):
        penni.to_torch(nn.Sequential(layer), sparse_as="csr")


def test_fold_bn_removes_batchnorm_and_keeps_outputs(case):
    model, x, expected = case
    folded = penni.to_torch(model, fold_bn=True)
    assert no_penni_class(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(folded(x), expected) <= 1e-5


def test_torch_export_round_trips_without_penni(case, tmp_path):
    model, x, expected = case
    program = torch.export.export(penni.to_torch(model), (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["penni"] = None  # importing penni now fails: the file must not need it
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        program = torch.export.load({str(path)!r})
        got = program.module()(io["x"])
        err = float((got - io["expected"]).abs().max() / io["expected"].abs().max())
        assert err <= 1e-5, err
        assert not any(name.startswith("penni") for name in sys.modules if sys.modules[name] is not None)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_onnx_runtime_matches(case, tmp_path):
    import onnxruntime as ort  # in the [test] extra (through [export])

    model, x, expected = case
    path = penni.export_onnx(model, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (x, torch.cat([x, x, x])):  # the batch dimension is dynamic
        (got,) = session.run(None, {"input": batch.numpy()})
        with torch.no_grad():
            reference = model(batch)
        assert rel_err(torch.from_numpy(got), reference) <= 1e-4


def test_import_penni_needs_no_onnx():
    script = 'import sys; sys.modules["onnx"] = None; sys.modules["onnxruntime"] = None; import penni; print("ok")'
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_evaluate_stage_writes_onnx_and_times_both_runtimes(tmp_path):
    """run_evaluate: fastest forms chosen and saved, ONNX files written, ORT timed beside PyTorch."""
    import json

    from pipeline.config.loading import load_config
    from pipeline.stages.functions import StageContext, run_evaluate, summary_markdown

    cfg = load_config("tiny", [f"storage={tmp_path}", "evaluate.latency_repeats=2", "evaluate.latency_batch_sizes=[1,4]"])
    for stage in ("baseline", "shrink", "evaluate"):
        (tmp_path / stage).mkdir()
    torch.manual_seed(0)
    model = build_model("fashion_cnn", num_classes=10, in_channels=1).eval()
    penni.save(model, tmp_path / "baseline" / "model.safetensors")
    penni.decompose(model, d=5)
    penni.prune(model, rule="sparsity", target=0.9)
    penni.save(penni.shrink(model, torch.randn(2, 1, 28, 28)), tmp_path / "shrink" / "model.safetensors")
    ctx = StageContext(cfg=cfg, stage="evaluate", inputs={s: tmp_path / s for s in ("baseline", "shrink")},
                       out_dir=tmp_path / "evaluate", log=lambda _: None)
    metrics = run_evaluate(ctx)
    out = tmp_path / "evaluate"
    evaluation = json.loads((out / "evaluation.json").read_text())
    compressed = evaluation["models"]["compressed"]
    for bs in (1, 4):
        for label in ("baseline", "compressed"):
            assert evaluation["models"][label][f"ort_latency_ms_bs{bs}"] > 0
            assert evaluation["models"][label][f"latency_ms_bs{bs}"] > 0
        assert compressed[f"latency_mode_bs{bs}"] in ("per-layer", "all-dense")
        assert set(evaluation["inference_plans"][f"bs{bs}"]["modes"].values()) <= set(INFERENCE_MODES)
        assert f"ort_latency_speedup_bs{bs}" in metrics
    assert "ONNX Runtime latency ms, batch 4" in summary_markdown(evaluation["summary"], evaluation["models"])
    saved = penni.load(out / "compressed.safetensors")
    assert {n: m.forward_mode for n, m in penni.penni_layers(saved).items()} == evaluation["inference_plans"]["bs1"]["modes"]
    import onnxruntime as ort
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = saved.eval()(x)
    session = ort.InferenceSession(str(out / "compressed.onnx"), providers=["CPUExecutionProvider"])
    assert rel_err(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected) <= 1e-4
