#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (tools/device_wheels.sh), then run, each
# optional: the GPU tests, the per-stage timing and the portable benchmark. Results under $OUT.
# Usage (device call, carry .whl, and .peers/vllm for the vLLM peer when you have built it there):
#   [SKIP_TESTS=1] [SKIP_STAGES=1] [SKIP_BENCH=1] bash tools/device_run.sh [bench args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
export MOE_BENCH_COMMIT=$(cat .whl/COMMIT 2>/dev/null)
[ -d .peers/vllm ] && export MOE_BENCH_VLLM=.peers/vllm
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m moe_core run --model qwen3-30b-a3b --tokens 64 --explain 2>&1 | tee "$OUT/run.log"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests -p no:cacheprovider -n 8 --durations=10 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "${SKIP_STAGES:-0}" != "1" ]; then
  timeout "${STAGES_TIMEOUT:-150}" python3 benchmarks/stages.py 2>&1 | tee "$OUT/stages.log"
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/run_portable.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
