#!/usr/bin/env bash
# On the lent GPU machine, one call: install the carried wheels (tools/device_wheels.sh), then each
# step under its own time limit, everything logged under $OUT/logs and packed into $OUT/results.tgz
# (the device tool returns at most 8 files). Steps (STEPS, space separated; default all but tune):
#   run      moe run --explain on qwen3-30b-a3b (planner choice, reference check)
#   tests    the GPU-marked tests (pytest -m gpu ${TEST_PATHS:-tests} -n ${TEST_WORKERS:-3}: 8 workers ran the real-shape tests out of the H200's memory, 4 out of the H100's; 3: 223 passed in 245 s on the H100)
#   quick    moe bench --quick (timed, bf16)
#   quant    moe bench for fp8 / fp8_block / mxfp4 against this plugin's bf16 (QUANT_MODELS, QUANT_TOKENS, QUANTS;
#            QUANT_ARGS: more moe bench arguments, e.g. "--kernels portable" to leave the reference untimed)
#   sorting  benchmarks/amd_sorting.py and benchmarks/routing_sorting.py
#   full     moe bench on every BENCHMARKS.md shape, FULL_DTYPES (vLLM peer when .peers/vllm is carried)
#   tune     tools/tune_device.py, once per ';'-separated argument set of TUNE_RUNS (e.g.
#            "--models mixtral-8x7b;--models deepseek-v3-tp8 --quant fp8,fp8_block"; "": every shape, bf16)
#            -> $OUT/logs/configs (TUNE_TIMEOUT, default 540)
#   dispatch benchmarks/dispatch.py: per-T dispatch tuned for every benchmark shape vs each single backend
#   paths    tools/quant_paths.py ${PATHS_ARGS} -> $OUT/logs/paths (PATHS_TIMEOUT, default 300)
#   hf       benchmarks/hf_generate.py: tokens/s of a small HF MoE model per experts backend -> $OUT/logs/hf
#            (needs transformers and its deps as cp312 wheels in .whl: ../shared/tools/device-wheels.sh)
#   stages   tools/decode_stages.py ${STAGES_ARGS}: each decode launch alone vs read-only kernels over the same
#            expert bytes -> $OUT/logs/stages (STAGES_TIMEOUT, default 240)
#   retuned  tools/quant_paths.py ${RETUNED_ARGS:-$PATHS_ARGS} on the tables the tune step wrote (MOE_PORTABLE_CONFIG_DIR=$OUT/logs/configs)
#            -> $OUT/logs/paths-retuned: against the paths step, the shipped tables vs the retuned ones in one call
#   ab       tools/quant_paths.py ${AB_ARGS} with this tree's portable plugin, then with the one in .whl/old (an older
#            commit's: OLD_REV=<rev> bash tools/device_wheels.sh), then this tree's again -> $OUT/logs/ab/{new1,old,new2}
#   decode   tools/profile_apply.py: decode vs sorted path and fast vs normal launch, T=1..8 -> $OUT/logs/decode
#            (DECODE_BUDGET_S, default 420; DECODE_ARGS e.g. "--models a,b --no-sweep")
# Usage (carry .whl, and .peers when you have it): STEPS="tests quick" bash tools/device_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
export MOE_BENCH_COMMIT=$(cat .whl/COMMIT 2>/dev/null)
[ -d .peers/vllm ] && export MOE_BENCH_VLLM=$PWD/.peers/vllm
L="$OUT/logs"
mkdir -p "$L"
STEPS=${STEPS:-run tests quick quant sorting}
source "$(dirname "$0")/device_steps.sh"  # step NAME LIMIT_S COMMAND...
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$L/device.txt"
step run 120 python3 -m moe_core run --model qwen3-30b-a3b --tokens 64 --explain
step tests "${TEST_TIMEOUT:-420}" python3 -m pytest -q -m gpu ${TEST_PATHS:-tests} -p no:cacheprovider -n "${TEST_WORKERS:-3}" --durations=15
step quick 240 python3 -m moe_core bench --quick --out "$L/quick"
step quant "${QUANT_TIMEOUT:-300}" python3 -m moe_core bench --models "${QUANT_MODELS:-qwen3-30b-a3b,deepseek-v3-tp8,gpt-oss-120b}" \
  --tokens "${QUANT_TOKENS:-1,8,32,512,2048}" --quant "${QUANTS:-bf16,fp8,fp8_block,mxfp4}" ${QUANT_ARGS:-} --out "$L/quant"
step sorting 150 bash -c "python3 benchmarks/amd_sorting.py --out $L/amd-sorting.json && python3 benchmarks/routing_sorting.py --out $L/routing-sorting.json"
step full "${FULL_TIMEOUT:-480}" python3 -m moe_core bench --dtypes "${FULL_DTYPES:-bf16,fp16}" --out "$L/full"
step tune "${TUNE_TIMEOUT:-540}" bash -c 'IFS=";"; for a in ${TUNE_RUNS:- }; do IFS=" "; python3 tools/tune_device.py --out "$0" $a; done' "$L/configs"
step dispatch 540 python3 benchmarks/dispatch.py --budget-s "${DISPATCH_BUDGET_S:-400}" --out "$L/dispatch"
step hf 300 python3 benchmarks/hf_generate.py ${HF_ARGS:-} --out "$L/hf"
step paths "${PATHS_TIMEOUT:-300}" python3 tools/quant_paths.py ${PATHS_ARGS:-} --out "$L/paths"
step stages "${STAGES_TIMEOUT:-240}" python3 tools/decode_stages.py ${STAGES_ARGS:-} --out "$L/stages"
step retuned "${RETUNED_TIMEOUT:-${PATHS_TIMEOUT:-300}}" env MOE_PORTABLE_CONFIG_DIR="$L/configs" python3 tools/quant_paths.py ${RETUNED_ARGS:-${PATHS_ARGS:-}} \
  --out "$L/paths-retuned"
step ab "${AB_TIMEOUT:-400}" bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_old .whl/old/*.whl &&
  for v in new1 old new2; do p=/tmp/site; [ $v = old ] && p=/tmp/site_old:/tmp/site;
  PYTHONPATH=$p python3 tools/quant_paths.py $1 --out "$0/$v" || exit 1; done' "$L/ab" "${AB_ARGS:-}"
step decode $(( ${DECODE_BUDGET_S:-420} + 60 )) python3 tools/profile_apply.py --budget-s "${DECODE_BUDGET_S:-420}" ${DECODE_ARGS:-} --out "$L/decode"
tar -czf "$OUT/results.tgz" -C "$OUT" logs
