#!/usr/bin/env bash
# The whole GPU measurement of issue 9 in one call, on a machine with one H100/H200 and PyTorch:
#
#   bash benchmarks/gpu.sh                     # from the repository root: everything (~20 minutes)
#   bash benchmarks/gpu.sh training            # or one part per call (the device tool allows 10 minutes
#   bash benchmarks/gpu.sh training-512        #   a command; each part writes its own RESULTS.md
#   bash benchmarks/gpu.sh sampling,data       #   section, so the parts add up)
#
# It checks the GPU, then runs benchmarks/run.py --device cuda: MicroDiT_XL_2 training at 256 px
# (reference and optimised at mask 0 and 0.75, optimised + activation checkpointing unmasked) and
# 512 px (optimised, mask 0 and 0.75), 30-step Heun CFG sampling at 512 px (reference / compiled bf16 / + CUDA graphs) and
# the shard loader, with MFU against the bf16 matmul peak measured in the same run. The table goes
# to benchmarks/RESULTS.md ('performance: <part> (cuda)') and benchmarks/results/perf-<part>-cuda.csv;
# with $OUT set (the device tool), they are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0) if ok else 'no GPU'); sys.exit(0 if ok else 1)"
"$PY" benchmarks/run.py --device cuda --threads 8 --sections "${1:-training,training-512,sampling,data}"
if [ -n "${OUT:-}" ]; then
  cp benchmarks/RESULTS.md benchmarks/results/perf-*-cuda.csv "$OUT"/
fi
