#!/usr/bin/env bash
# The GPU half of the suite as ONE prepared run for a lent GPU machine (torch + CUDA, no package registry):
# at most ~8 minutes on an H200 (about 6.5 when all goes well):
#   1. versions, and the CUDA exactness tests (tests/test_cuda.py, torchvision models; ~10 s);
#   2. benchmarks/gpu_runtimes.py: eager fp32, eager fp16 / bf16 channels_last, CUDA graph, torch.compile
#      (reduce-overhead + inductor freezing) at batch 64 and 256; dense / masked / native / compact exact /
#      compact-drop (+ round_to=8 on all-50); ResNet-50 bottleneck-inner-50 first, then all-50, ViT, LeNet.
#      It starts no cell past its --budget-s and rewrites its JSON + markdown after every cell.
# Writes $OUT/<device>/gpu_runtimes_*.{json,md} and $OUT/gpu_run_log.txt.
#   OUT=benchmarks/results bash benchmarks/gpu.sh [extra gpu_runtimes.py flags]
# torch-pruning is not installed there: carry it as a wheel in .whl/ (benchmarks/README.md, "On a lent GPU").
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, torch_pruning as tp, onnxruntime as o; print('torch', torch.__version__, \
'torch-pruning', tp.__version__, 'ort', o.__version__, o.get_available_providers())" || exit 1
    timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
        "tests/test_zoo_exact.py::test_torchvision_models_when_installed" 2>&1 | tail -3
    timeout 400 python3 benchmarks/gpu_runtimes.py --out "$OUT" --budget-s 360 --quiet "$@"
    echo "gpu.sh: exit status of gpu_runtimes.py: $? (124: stopped by timeout; its files hold every finished cell)"
} 2>&1 | tee "$OUT/gpu_run_log.txt"
