#!/usr/bin/env bash
# One-shot GPU check for issue #17: a full-size Qwen2.5-VL-7B-shaped model with random weights
# (bf16, built on the GPU: no download), capture mean / per-head vs SDPA vs eager at S = 4k and
# 8k, peak GPU memory, and probe-heads questions/s (logits vs generate-16), in about 8 minutes.
# Prints markdown tables for benchmarks/RESULTS.md. Fails at once without a CUDA device.
#
#   bash benchmarks/gpu.sh                                           # the check
#   bash benchmarks/gpu.sh --preset tiny --device cpu --seq 256 --questions 4   # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="python3"
export TRANSFORMERS_VERBOSITY=error
exec "$PY" benchmarks/gpu_check.py "$@"
