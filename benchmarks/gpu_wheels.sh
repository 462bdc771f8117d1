#!/usr/bin/env bash
# The lent GPU machines have torch, torchvision, pyarrow, safetensors, matplotlib and PyYAML but not pydantic (the
# pipeline's config needs it) and no network. Run this here to fetch pydantic's Python 3.12 wheels into .gpu-wheels/
# Torch-Pruning and Fashion-MNIST (git-ignored, ~33 MB), carry that folder to the GPU machine, and the GPU scripts install from it when pydantic is missing:
#   bash benchmarks/gpu_wheels.sh            # here
#   device run, carry [".gpu-wheels"]:  bash benchmarks/gpu_smoke.sh   (or workflows/reproduce.py: see docs/results.md)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import pydantic; print(pydantic.VERSION)")
python -m pip download --quiet --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels "pydantic==$version"
# Torch-Pruning for workflows/reproduce.py's comparison (pure Python; its torch/numpy come from the GPU machine)
python -m pip download --quiet --no-deps -d .gpu-wheels "torch-pruning==$(python -c "import importlib.metadata as m; print(m.version('torch-pruning'))")"
ls .gpu-wheels
# Fashion-MNIST (the GPU machines have no dataset and no network; ensure_gpu_deps.sh puts it where penni looks)
mkdir -p .gpu-wheels/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu-wheels/fashion-mnist/
du -sh .gpu-wheels
