#!/usr/bin/env bash
# Source me on a lent GPU machine: installs pydantic from carried wheels (.gpu-wheels/, made by gpu_wheels.sh) when it
# is missing, and puts the working tree on PYTHONPATH (those machines have the tree, not the installed package).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import pydantic" 2>/dev/null; then
    if [ -d .gpu-wheels ]; then
        python -m pip install --quiet --no-index --find-links .gpu-wheels pydantic
    else
        echo "error: pydantic is missing and no .gpu-wheels/ was carried: run 'bash benchmarks/gpu_wheels.sh' here first" >&2
        return 2 2>/dev/null || exit 2
    fi
fi
if ! python -c "import torch_pruning" 2>/dev/null && ls .gpu-wheels/torch_pruning-*.whl >/dev/null 2>&1; then
    python -m pip install --quiet --no-index --no-deps .gpu-wheels/torch_pruning-*.whl   # for workflows/reproduce.py
fi
fashion_raw="$HOME/.cache/penni/FashionMNIST/raw"   # where pipeline.fashion_mnist looks after the Debian package
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -f "$fashion_raw/train-images-idx3-ubyte.gz" ] \
        && [ -d .gpu-wheels/fashion-mnist ]; then
    mkdir -p "$fashion_raw" && cp .gpu-wheels/fashion-mnist/*.gz "$fashion_raw/"
fi
