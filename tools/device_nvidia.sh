#!/usr/bin/env bash
# On the lent H100/H200 (CPython 3.12, torch cu130, no internet, no FlashInfer): install the carried
# FlashInfer (tools/nvidia_bundle.sh -> third_party/flashinfer-device/) with its prebuilt fused_moe_90
# and this repo's wheels (tools/device_wheels.sh -> .whl/), then run each step under its own time
# limit; logs under $OUT/logs, packed into $OUT/nvidia-results.tgz.
# Steps (STEPS, space separated; default all):
#   doctor   moe doctor + loading FlashInfer's cutlass module from the AOT slot (no JIT allowed)
#   tests    the GPU tests of this plugin (tests/nvidia, -m gpu) and the conformance kit on it
#   plan     moe plan / moe run --explain with the nvidia plugin (bf16 mixtral, qwen3, gpt-oss-20b; then
#            `moe plan $PLAN_ARGS` and `moe run $RUN_ARGS --explain` when given)
#   tune     moe tune --plugin nvidia --no-dispatch for TUNE_MODELS x TUNE_QUANTS (default qwen3-30b-a3b mixtral-8x7b,
#            bf16; fp8 as fp8/w:per_tensor/a:fp8_per_tensor) at TUNE_TOKENS (tables -> $OUT/logs/tuned)
#   hf       the HF transformers GPU tests (tests/integrations, -m gpu) and benchmarks/hf_generate.py with the
#            GPU plugins installed (transformers + deps as cp312 wheels in .whl: ../shared/tools/device-wheels.sh)
#   tactics  tools/nvidia_tactics.py: which of FlashInfer's cutlass tactics run with the prebuilt module, and why not
#   suite    moe bench $SUITE_ARGS with every installed plugin (e.g. "--models qwen3-30b-a3b --tokens 1,32 --quant bf16,fp8")
#   bench    benchmarks/nvidia_overhead.py: plugin vs direct FlashInfer (tuned, autotuned, untuned), BENCH_QUANTS (bf16,fp8)
#   dispatch benchmarks/dispatch.py over the portable and nvidia kernels: per-T tuned plan vs each single backend
#            (DISPATCH_MODELS, default the two with shipped nvidia tactics; DISPATCH_BUDGET_S, default 300)
# Carry: .whl third_party/flashinfer-device     Usage: STEPS="doctor tests" bash tools/device_nvidia.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
S=/tmp/site
D=third_party/flashinfer-device
L="$OUT/logs"
mkdir -p "$L" "$S"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S" .whl/*.whl || exit 1
python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$D/flashinfer.tar.xz" "$S" || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S" "$D"/wheels/apache_tvm_ffi-*.whl || exit 1
for pair in pynvml:nvidia_ml_py filelock:filelock requests:requests urllib3:urllib3 idna:idna certifi:certifi \
    charset_normalizer:charset_normalizer packaging:packaging tqdm:tqdm; do  # only what is missing there
  python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target "$S" "$D"/wheels/${pair#*:}-*.whl
done
export PYTHONPATH=$S
CU13=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")
export LD_LIBRARY_PATH="$CU13:${LD_LIBRARY_PATH:-}"
export FLASHINFER_DISABLE_JIT=1            # a missing module must fail, not compile for an hour
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws # FlashInfer writes its generated sources and logs here
export MOE_NVIDIA_TUNE_DIR="$L/tuned"      # `moe tune` writes here, the plugin reads it
export TRTLLM_DG_CACHE_DIR=/tmp/dgcache    # fp8_block: FlashInfer's DeepGEMM kernels, compiled by nvcc on first use
command -v nvcc >/dev/null || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MOE_BENCH_COMMIT=$(cat .whl/COMMIT 2>/dev/null)
STEPS=${STEPS:-doctor tests plan hf tune bench dispatch}
source "$(dirname "$0")/device_steps.sh"  # step NAME LIMIT_S COMMAND...
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)"
  cat "$D/moe_build.json" 2>/dev/null
} 2>&1 | tee "$L/device.txt"
step doctor 120 bash -c 'python3 -m moe_core doctor && python3 -c "
import time; t = time.time()
from flashinfer.fused_moe.core import get_cutlass_fused_moe_module
m = get_cutlass_fused_moe_module(\"90\")
print(\"fused_moe_90 loaded from the AOT slot in %.1f s:\" % (time.time() - t), m)"'
step tests "${TEST_TIMEOUT:-240}" bash -c 'python3 -m pytest -q -m gpu tests/nvidia -p no:cacheprovider --durations=10 -rs ${TEST_ARGS:-};
  python3 -m pytest -q -p no:cacheprovider --pyargs moe_core.conformance --moe-kernel nvidia.flashinfer.cutlass'
step plan 90 bash -c 'for m in mixtral-8x7b qwen3-30b-a3b gpt-oss-20b; do python3 -m moe_core plan --model $m; done;
  python3 -m moe_core run --model qwen3-30b-a3b --tokens 64 --explain; python3 -m moe_core run --model mixtral-8x7b --tokens 7;
  if [ -n "${PLAN_ARGS:-}" ]; then python3 -m moe_core plan $PLAN_ARGS; fi
  if [ -n "${RUN_ARGS:-}" ]; then python3 -m moe_core run $RUN_ARGS --explain; fi'
step hf "${HF_TIMEOUT:-240}" bash -c "python3 -m pytest -q -m gpu tests/integrations -p no:cacheprovider -rs -s;
  python3 benchmarks/hf_generate.py ${HF_ARGS:-} --out $L/hf"
step tune "${TUNE_TIMEOUT:-240}" bash -c 'for q in ${TUNE_QUANTS:-bf16}; do for m in ${TUNE_MODELS:-qwen3-30b-a3b mixtral-8x7b}; do
  python3 -m moe_core tune --model $m --plugin nvidia --quant $q --no-dispatch --tokens "${TUNE_TOKENS:-1,32,512,4096}"; done; done
  ls -la "$MOE_NVIDIA_TUNE_DIR"'
step tactics "${TACTICS_TIMEOUT:-200}" python3 tools/nvidia_tactics.py ${TACTICS_ARGS:-}
step suite "${SUITE_TIMEOUT:-240}" python3 -m moe_core bench ${SUITE_ARGS:-} --out "$L/suite"
step bench "${BENCH_TIMEOUT:-240}" python3 benchmarks/nvidia_overhead.py --models "${BENCH_MODELS:-mixtral-8x7b,qwen3-30b-a3b}" \
  --tokens "${BENCH_TOKENS:-1,32,512,4096}" --quant "${BENCH_QUANTS:-bf16}" ${BENCH_ARGS:-} --out "$L/nvidia-overhead.json"
step dispatch $(( ${DISPATCH_BUDGET_S:-300} + 90 )) python3 benchmarks/dispatch.py --models "${DISPATCH_MODELS:-qwen3-30b-a3b,mixtral-8x7b}" \
  --kernels portable,nvidia --peers none --budget-s "${DISPATCH_BUDGET_S:-300}" --out "$L/dispatch"
ls "$TRTLLM_DG_CACHE_DIR/cache" 2>/dev/null > "$L/deepgemm-kernels.txt"  # the DeepGEMM kernels compiled here
tar -czf "$OUT/nvidia-results.tgz" -C "$OUT" logs
