"""The example and the benchmark scripts run end to end (tiny settings; speeds are never asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_script(relpath: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / relpath), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{relpath} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_own_training_loop_example():
    source = (REPO_ROOT / "examples/own_training_loop.py").read_text()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not {m.split(".")[0] for m in imports} & {"ray", "mlflow", "pipeline"}, imports
    out = run_script("examples/own_training_loop.py")
    assert "## before (dense)" in out and "## after (decomposed, pruned, shrunk)" in out
    assert out.count("| Name | Kind | Size |") == 2
    assert "| penni |" in out
    assert "identical outputs" in out


def test_train_step_benchmark_runs():
    out = run_script("benchmarks/train_step.py", "--device", "cpu", "--model", "torchvision:resnet18",
                     "--num-classes", "10", "--image-size", "64", "--batch-size", "2", "--steps", "2",
                     "--warmup", "1")
    assert "torch " in out and "device: cpu" in out
    for variant in ("dense", "reconstruct", "factorized"):
        assert f"| {variant} |" in out
    assert "| dense |" in out and "1.000x" in out

# benchmarks/inference_latency.py is run end to end by tests/integration/test_benchmarks.py (--quick).
