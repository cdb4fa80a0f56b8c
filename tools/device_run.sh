#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels, run the GPU tests, then
# the portable benchmark. Usage (device call, carry .whl):
#   bash tools/device_run.sh [benchmark args...]
# Results under $OUT: gpu-tests.log, bench.json, bench.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m moe_core plugins | python3 -c "import json,sys; print([(r['name'], r['status'], len(r['kernels'])) for r in json.load(sys.stdin)])"
python3 -m moe_core run --model qwen3-30b-a3b --tokens 64 --explain
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x -m gpu tests/portable -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/run_portable.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
