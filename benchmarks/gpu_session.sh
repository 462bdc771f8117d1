#!/usr/bin/env bash
# One lent-GPU session in one call (the device budget is 15 minutes, start-up included): the latency-target
# benchmark (ResNet50 at batch 256 in bf16 channels-last; the reproduction's VGG16 at batch 1, 64 and 256), the GPU
# smoke test, then the full-size reproduction, each time-boxed, each writing into $OUT as it finishes
# (reproduce.py writes its results after every model, latency_target.py after every row, so a cut-off run keeps
# what finished). GPU_SESSION_STEPS picks steps (default "latency smoke reproduce").
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

steps=" ${GPU_SESSION_STEPS:-latency smoke reproduce} "
if [ "$device" = cuda ]; then smoke=(--device cuda); scale=gpu; else smoke=(--device cpu --quick); scale=tiny; fi
if [ "$device" = cuda ]; then
    resnet=(--batch-sizes 256 --also-time 1 32 --dtype bfloat16 --channels-last); vgg=(--batch-sizes 64 256 --also-time 1)
else  # the CPU check: the same calls at sizes a 2-core machine finishes
    resnet=(--batch-sizes 1 --grid 0.5 1 --table-repeats 1 --repeats 3); vgg=(--batch-sizes 1 --repeats 3)
fi
if [[ $steps == *" latency "* ]]; then
    echo "== latency_target.py: ResNet50 to 2.0x (at most ${GPU_LATENCY_SECONDS:-240} s)"
    timeout "${GPU_LATENCY_SECONDS:-240}" python benchmarks/latency_target.py --device "$device" --runtimes torch \
        "${resnet[@]}" --out "$out/latency_target_resnet50.md" > "$out/latency_target_resnet50.log" 2>&1
    echo "latency_target resnet50 exit $? after $((SECONDS - start)) s"; tail -n 12 "$out/latency_target_resnet50.log"
    echo "== latency_target.py: the reproduction's VGG16 to 1.5x (at most ${GPU_VGG_SECONDS:-150} s)"
    timeout "${GPU_VGG_SECONDS:-150}" python benchmarks/latency_target.py --model vgg16_fashion --device "$device" \
        --runtimes torch --speedup 1.5 "${vgg[@]}" --out "$out/latency_target_vgg16.md" \
        > "$out/latency_target_vgg16.log" 2>&1
    echo "latency_target vgg16 exit $? after $((SECONDS - start)) s"; tail -n 12 "$out/latency_target_vgg16.log"
fi
[[ $steps == *" smoke "* ]] || [[ $steps == *" reproduce "* ]] || exit 0

if [[ $steps == *" smoke "* ]]; then
    echo "== gpu_smoke.sh ${smoke[*]} (at most ${GPU_SMOKE_SECONDS:-130} s)"
    OUT="$out/gpu_smoke" timeout "${GPU_SMOKE_SECONDS:-130}" bash benchmarks/gpu_smoke.sh "${smoke[@]}" \
        > "$out/gpu_smoke.log" 2>&1
    echo "gpu_smoke exit $? after $((SECONDS - start)) s"; tail -n 25 "$out/gpu_smoke.log"
fi

[[ $steps == *" reproduce "* ]] || exit 0
left=$((budget - (SECONDS - start)))
echo "== reproduce.py --scale $scale --device $device (at most $left s)"
timeout "$left" python workflows/reproduce.py --scale "$scale" --device "$device" --work "${TMPDIR:-/tmp}/penni_reproduce" \
    --out "$out/reproduce_$scale" > "$out/reproduce_$scale.log" 2>&1
echo "reproduce exit $? after $((SECONDS - start)) s"
grep -v "^\s*$" "$out/reproduce_$scale.log" | tail -n 60
