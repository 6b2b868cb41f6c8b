#!/usr/bin/env bash
# The GPU half of the suite, as run on a lent GPU machine (torch + CUDA, no package registry):
# CUDA exactness tests, then latency for torch CUDA eager (and onnxruntime CUDA where installed).
#   OUT=benchmarks/results bash benchmarks/gpu.sh [extra latency.py flags]
set -u
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
    "tests/test_zoo_exact.py::test_torchvision_models_when_installed" 2>&1 | tail -3
python3 benchmarks/latency.py --backends torch-cuda,ort-cuda --batches 1,64,256 --big-batches 1,8,64 \
    --repeats 20 --big-repeats 10 --sparsities 0.1,0.3,0.5,0.7,0.9 --sweep-batches 1,256 \
    --big-sparsities "" --out "$OUT" --quiet "$@"
