#!/usr/bin/env bash
# The GPU harness in one command: bash bench/gpu.sh [part ...]   (parts: see bench/gpu.py; default all)
# Writes gpu_*.json, knn_cuda.json and gpu.log to $OUT (the device tool's folder) or reports/bench.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-reports/bench}"
mkdir -p "$OUT"
# webdataset + braceexpand, which the GPU image lacks, travel in build/gpu_site (make bench-gpu-deps)
if [ -d build/gpu_site ]; then export PYTHONPATH="$PWD/build/gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  "$PY" -c "import torch, timm, webdataset; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -m bench.gpu --out "$OUT" "$@"; } 2>&1 | tee "$OUT/gpu.log"
