#!/usr/bin/env bash
# One lent-GPU session in one call (the device budget is 15 minutes, start-up included): the GPU smoke test
# then the full-size reproduction, each time-boxed, each writing into $OUT as it finishes
# (reproduce.py writes its results after every model, so a cut-off run keeps the models that finished).
#   here:        bash benchmarks/gpu_wheels.sh     (pydantic + Torch-Pruning wheels and Fashion-MNIST -> .gpu-wheels/)
#   device run:  carry [".gpu-wheels"], timeout_s 590:  bash benchmarks/gpu_session.sh
#   CPU check:   GPU_SESSION_DEVICE=cpu OUT=/tmp/out bash benchmarks/gpu_session.sh   (tiny sizes, same steps)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${GPU_SESSION_SECONDS:-570}     # seconds for everything, under the call's timeout_s
device=${GPU_SESSION_DEVICE:-cuda}
out=${OUT:?set OUT to the folder that receives the results}
source benchmarks/ensure_gpu_deps.sh
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python -c "import torch, torchvision, sys; print(sys.version); \
print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; nproc; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$device" = cuda ]; then smoke=(--device cuda); scale=gpu; else smoke=(--device cpu --quick); scale=tiny; fi
echo "== gpu_smoke.sh ${smoke[*]} (at most ${GPU_SMOKE_SECONDS:-130} s)"
OUT="$out/gpu_smoke" timeout "${GPU_SMOKE_SECONDS:-130}" bash benchmarks/gpu_smoke.sh "${smoke[@]}" \
    > "$out/gpu_smoke.log" 2>&1
echo "gpu_smoke exit $? after $((SECONDS - start)) s"; tail -n 25 "$out/gpu_smoke.log"

left=$((budget - (SECONDS - start)))
echo "== reproduce.py --scale $scale --device $device (at most $left s)"
timeout "$left" python workflows/reproduce.py --scale "$scale" --device "$device" --work "${TMPDIR:-/tmp}/penni_reproduce" \
    --out "$out/reproduce_$scale" > "$out/reproduce_$scale.log" 2>&1
echo "reproduce exit $? after $((SECONDS - start)) s"
grep -v "^\s*$" "$out/reproduce_$scale.log" | tail -n 60
