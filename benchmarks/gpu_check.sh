#!/usr/bin/env bash
# GPU latency benchmark: the seed's compressed VGG16/ResNet50 and the quickstart net vs dense,
# float32 at batch 1/32/256 and bfloat16 at batch 256, timed with CUDA events (cudnn.benchmark on): eager,
# then CUDA graphs on both sides, then CUDA graphs + channels_last on both sides.
# Needs only torch, torchvision, safetensors and numpy (no Ray, MLflow, onnx).
# Writes inference_latency_gpu_{eager,cudagraphs,cudagraphs_cl}.{json,md} into $OUT (or benchmarks/results/).
# About 2 minutes on one H200 (measured: 66 s for the first two runs).
# Usage: bash benchmarks/gpu_check.sh [extra inference_latency.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the lent GPU machines have the tree, not the package
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true
common=(--device cuda --repeats 50 --warmup 10 --optimize-repeats 10 --no-onnx "$@")
time python benchmarks/inference_latency.py "${common[@]}" --graph none --out "$dest/inference_latency_gpu_eager"
time python benchmarks/inference_latency.py "${common[@]}" --graph cudagraphs --out "$dest/inference_latency_gpu_cudagraphs"
time python benchmarks/inference_latency.py "${common[@]}" --graph cudagraphs --channels-last \
    --out "$dest/inference_latency_gpu_cudagraphs_cl"
