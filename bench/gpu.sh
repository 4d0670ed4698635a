#!/usr/bin/env bash
# The GPU harness in one command (bench/gpu.py): the CUDA determinism alerts of every torch stage first, then
# correctness, step, batch, data, knn and compile; each part isolated, so one failing does not stop the others.
#
#   bash bench/gpu.sh [part ...] [--full]     # parts: alerts correctness step batch data knn compile (default all)
#
# On your own CUDA machine, from the repository root. It runs $BENCH_GPU_PYTHON if set, else .venv/bin/python when
# there, else $PYTHON or python3 (with torch; `make bench-gpu-deps` puts timm, webdataset and braceexpand, as
# requirements.lock pins them, in build/gpu_site, which goes on PYTHONPATH for any interpreter but .venv's):
#   bash bench/gpu.sh                              # the first call: <= 8 min (budget table: bench/gpu.py)
#   BENCH_GPU_WALL_S=0 bash bench/gpu.sh --full    # no time limit, the full repeat counts (12-15 min)
# What comes back, in $OUT if set, else reports/bench/ (8 files, each part's written as it ends):
#   gpu_alerts.json  gpu_correctness.json  gpu_step.json  gpu_batch.json  gpu_data.json  knn_cuda.json
#   gpu_compile.json  gpu.log (everything printed; the summary table last)
#
# On a GPU machine with its own Python and torch and no network (e.g. Python 3.12, torch 2.11): run
# `make bench-gpu-deps` where the lock is installed, copy the working tree with build/gpu_site there, run
# `OUT=<folder> bash bench/gpu.sh` with a 9-minute limit, and bring <folder> back into reports/bench/.
#
# BENCH_GPU_WALL_S (default 460): a hard limit on the harness; at it, SIGTERM ends the part in flight, which is
# recorded as failed, and the rest are skipped (the in-process budget, 440 s, normally skips them first); the
# exit status is then timeout's 124, and every file written so far is there.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-reports/bench}"
mkdir -p "$OUT"
if [ -n "${BENCH_GPU_PYTHON:-}" ]; then PY="$BENCH_GPU_PYTHON"   # that interpreter, whatever else is there
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY="${PYTHON:-python3}"; fi
if [ "$PY" != .venv/bin/python ] && [ -d build/gpu_site ]; then
  # timm, webdataset and braceexpand as requirements.lock pins them (the GPU image lacks webdataset)
  export PYTHONPATH="$PWD/build/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
WALL="${BENCH_GPU_WALL_S:-460}"
LIMIT=()
if [ "$WALL" != 0 ]; then LIMIT=(timeout -k 20 "$WALL"); fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  "${LIMIT[@]}" "$PY" -m bench.gpu --out "$OUT" "$@"; } 2>&1 | tee "$OUT/gpu.log"
