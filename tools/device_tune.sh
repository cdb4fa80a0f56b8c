#!/usr/bin/env bash
# On the lent GPU: tune the portable fused MoE for the given presets (bf16 unless DTYPE is set)
# and leave the merged table under $OUT/configs. Usage: bash tools/device_tune.sh MODEL [MODEL...]
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
mkdir -p "$OUT/configs"
python3 tools/profile_apply.py --models qwen3-30b-a3b --tokens 1 --no-sweep --budget-s 120 --out "$OUT/profile" 2>&1 | tail -40 | tee "$OUT/profile.log"
for model in "$@"; do
  start=$(date +%s)
  python3 -m moe_core tune --model "$model" --dtype "${DTYPE:-bf16}" --plugin portable --out "$OUT/configs" 2>&1 | tail -3
  echo "$model tuned in $(( $(date +%s) - start )) s"
done
