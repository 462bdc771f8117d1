#!/usr/bin/env bash
# GPU smoke test: one GPU, no Ray, no MLflow needed (the stages run in this process;
# tracking is off where MLflow is missing). Three parts, each checked, each writing into DEST:
#   1. the tiny pipeline, in-process, on the device, bf16 autocast + channels-last in every training stage
#      (ray.use_gpu=true is how a stage picks CUDA); its report and the evaluate manifest -> DEST/pipeline/
#   2. the training-step benchmark: dense vs reconstruct-mode ResNet50, bf16, channels-last, batch 256
#      -> DEST/train_step.md
#   3. JPEG decoding on the device: torchvision.io.decode_jpeg(device=...) in batches on generated 500x375
#      JPEGs, resized to 224 on the device; checked against PIL's decode; images/s -> DEST/jpeg_decode.json
# DEST is $OUT (set on the lent GPU machines), else benchmarks/results/gpu_smoke_<device>.
# Needs torch, torchvision, pillow, pyarrow, PyYAML and pydantic (carry pydantic's wheels where it is missing).
#
# Usage: bash benchmarks/gpu_smoke.sh [--device cuda|cpu] [--quick]
#   --device cpu   the same steps on the CPU (float32 train-step benchmark: bf16 autocast is CUDA-only there)
#   --quick        small sizes (the CPU check: a few minutes on 2 cores)
# About 2-3 minutes on one H100/H200 without --quick (estimated; not yet run on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --quick) quick=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (use --device cuda|cpu, --quick)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
source benchmarks/ensure_gpu_deps.sh   # the lent GPU machines have the tree, not the package, and no pydantic
export PYTHONUNBUFFERED=1
dest="${OUT:-benchmarks/results/gpu_smoke_$device}"
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

missing=$(python - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "torchvision", "PIL", "pyarrow", "yaml", "pydantic") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "error: missing Python packages: $missing (install or carry them as wheels)" >&2
    exit 2
fi
python -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ "$device" = cuda ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: CUDA is not available (use --device cpu)')"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
fi

# ---------------------------------------------------------------- 1. tiny pipeline, in-process
echo "== 1/3 tiny pipeline in-process on $device (bf16 autocast, channels-last)"
sets=(ray.use_gpu=$([ "$device" = cuda ] && echo true || echo false) ray.num_workers=1 ray.max_failures=0
      ray.stage_retries=0 data.loader_workers=0)
for stage in baseline retrain finetune; do sets+=("$stage.amp=bf16" "$stage.channels_last=true"); done
if ! python -c "from pipeline.fashion_mnist import find_fashion_mnist; find_fashion_mnist(None, download=False)" \
        2>/dev/null; then
    echo "(Fashion-MNIST not on this machine: synthetic 1x28x28 data instead)"
    sets+=(data.dataset=synthetic data.synthetic_size=1024)
fi
if [ "$quick" = 1 ]; then
    sets+=(data.train_subset=256 data.val_subset=64 data.test_subset=128 data.batch_size=32 data.eval_batch_size=64
           evaluate.latency_repeats=2)
fi
set_args=()
for s in "${sets[@]}"; do set_args+=(--set "$s"); done
python workflows/full_pipeline.py --config tiny --in-process --storage "$work/runs" --run-name gpu_smoke \
    "${set_args[@]}"
mkdir -p "$dest/pipeline"
cp "$work/runs/gpu_smoke/report/"*.md "$dest/pipeline/" 2>/dev/null || true
python - "$work/runs/gpu_smoke" "$device" "$dest/pipeline/evaluate_summary.json" <<'EOF'
import json, pathlib, sys
run, device, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
summary = json.loads((run / "evaluate" / "manifest.json").read_text())["metrics"]
out.write_text(json.dumps(summary, indent=2, sort_keys=True))
where = summary.get("device", "?")
print(f"evaluate ran on: {where}; test top-1 baseline {summary.get('baseline_test_top1')} -> "
      f"compressed {summary.get('compressed_test_top1')}")
if (device == "cuda") == (where == "cpu"):
    sys.exit(f"error: the pipeline was asked for {device} but evaluated on {where}")
EOF

# ---------------------------------------------------------------- 2. training step, dense vs reconstruct
echo "== 2/3 training step: ResNet50 dense vs reconstruct"
if [ "$device" = cuda ]; then   # bf16 autocast is CUDA-only in train_step.py
    step_args=(--device cuda --amp bf16 --channels-last --batch-size 256)
    if [ "$quick" = 1 ]; then step_args+=(--steps 5 --warmup 2); else step_args+=(--steps 20 --warmup 5); fi
else
    step_args=(--device cpu --channels-last)
    if [ "$quick" = 1 ]; then step_args+=(--batch-size 2 --image-size 64 --steps 1 --warmup 1)
    else step_args+=(--batch-size 8 --image-size 160 --steps 3 --warmup 1); fi
fi
python benchmarks/train_step.py "${step_args[@]}" --variants dense,reconstruct | tee "$dest/train_step.md"

# ---------------------------------------------------------------- 3. JPEG decoding on the device
echo "== 3/3 JPEG decoding on $device (torchvision.io.decode_jpeg, batched)"
images=$([ "$quick" = 1 ] && echo 64 || echo 2048)
python - "$device" "$images" "$dest/jpeg_decode.json" <<'EOF'
"""Decode generated ImageNet-sized JPEGs in batches on the device, resize to 224; check against PIL."""
import io, json, sys, time
import numpy as np, torch, torchvision
from PIL import Image
from torchvision.io import decode_jpeg

device, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
blobs = []
for i in range(min(n, 64)):  # 64 distinct images, repeated up to n
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
    arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    blobs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
data = [blobs[i % len(blobs)] for i in range(n)]
batch = 256 if device == "cuda" else 32

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

def run_epoch():
    for start in range(0, n, batch):
        decoded = decode_jpeg(data[start:start + batch], device=device)
        resized = [torch.nn.functional.interpolate(x[None].float(), size=(224, 224), mode="bilinear",
                                                   antialias=True) for x in decoded]
        torch.cat(resized).to(memory_format=torch.channels_last)

first = decode_jpeg(blobs[:4], device=device)
reference = [torch.from_numpy(np.array(Image.open(io.BytesIO(b.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)
             for b in blobs[:4]]
diff = max(float((a.cpu().float() - r.float()).abs().mean()) for a, r in zip(first, reference))
if diff > 3.0 or first[0].shape != (3, 375, 500):
    sys.exit(f"error: decode_jpeg on {device} differs from PIL (mean abs diff {diff:.2f}, shape {tuple(first[0].shape)})")
run_epoch()  # warm-up (nvjpeg handles, cudnn)
sync()
t0 = time.perf_counter()
run_epoch()
sync()
seconds = time.perf_counter() - t0
result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "images": n, "batch": batch,
          "image_size": "500x375 -> 224x224", "images_per_s": n / seconds, "mean_abs_diff_vs_pil": diff,
          "torch": torch.__version__, "torchvision": torchvision.__version__,
          "target_images_per_s": 3000 if device == "cuda" else None}
json.dump(result, open(out, "w"), indent=2)
print(f"decode_jpeg + resize on {result['device']}: {result['images_per_s']:.0f} images/s "
      f"({n} images, batch {batch}; mean abs diff vs PIL {diff:.2f})")
EOF
echo "gpu_smoke: all three parts passed; outputs in $dest"
