"""benchmarks/gpu_smoke.sh: valid bash, and bad arguments are one clear line with a non-zero exit.
(Its full CPU run, `bash benchmarks/gpu_smoke.sh --device cpu --quick`, takes several minutes on 2 cores
with the tiny pipeline in it, too long for the suite: run it by hand; it ran green when it was written.)"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.sh"


def test_gpu_smoke_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv, expected", [(["--device", "tpu"], "--device must be cuda or cpu"),
                                            (["--quik"], "unknown argument '--quik'")])
def test_gpu_smoke_rejects_bad_arguments_in_one_line(argv, expected, tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)}, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0] and not any(tmp_path.iterdir())
