#!/usr/bin/env bash
# Pack what tools/device_nvidia.sh needs on the lent GPU (no internet, no FlashInfer there) into the
# ignored folder third_party/flashinfer-device/ (carry it; keep repo + carry under ~55 MiB):
#   flashinfer.tar.xz  the installed flashinfer package and its dist-info WITHOUT the C++ sources and
#                      headers (data/csrc, include, cutlass, cccl, spdlog: only needed to compile) and
#                      __pycache__, WITH data/aot/fused_moe_90/ (the module `moe nvidia build` installed)
#                      and the DeepGEMM headers fp8_block compiles its kernels from on the GPU host
#   wheels/            apache-tvm-ffi (CPython 3.12 manylinux) and the small deps `import flashinfer` needs
#                      (installed on the device only when missing there; numpy and torch's deps are assumed)
# Run here after `moe nvidia build`:  FI_SITE=<folder holding flashinfer/> bash tools/nvidia_bundle.sh
# FI_SITE defaults to where `python3 -c 'import flashinfer'` finds it (needs no GPU).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
out="$top/third_party/flashinfer-device"
py=${PYTHON:-python3}
FI_SITE=${FI_SITE:-$($py -c "import importlib.util, os; print(os.path.dirname(list(importlib.util.find_spec('flashinfer').submodule_search_locations)[0]))")}
[ -f "$FI_SITE/flashinfer/data/aot/fused_moe_90/fused_moe_90.so" ] || {
  echo "no prebuilt $FI_SITE/flashinfer/data/aot/fused_moe_90/fused_moe_90.so: run moe nvidia build first" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out/wheels"
tar -C "$FI_SITE" -cf "$out/flashinfer.tar" \
  --exclude='__pycache__' --exclude='flashinfer/data/csrc' --exclude='flashinfer/data/include' \
  --exclude='flashinfer/data/cutlass' --exclude='flashinfer/data/cccl' --exclude='flashinfer/data/spdlog' \
  --exclude='flashinfer/fused_moe/backends/cudnn_frost/artifacts' \
  flashinfer $(cd "$FI_SITE" && ls -d flashinfer_python-*.dist-info)
# fp8_block: FlashInfer's DeepGEMM path compiles its kernels with nvcc on first use of a shape, from these
# headers (288 KB; FlashInfer passes <flashinfer>/data/csrc/nv_internal/tensorrt_llm as the include folder)
tar -C "$FI_SITE" -rf "$out/flashinfer.tar" flashinfer/data/csrc/nv_internal/tensorrt_llm/deep_gemm
xz -T0 "$out/flashinfer.tar"
plats=()
for n in 17 24 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plats[@]}" --platform manylinux2014_x86_64 -d "$out/wheels" \
  'apache-tvm-ffi>=0.1.11,<0.2' nvidia-ml-py filelock requests urllib3 idna certifi charset-normalizer \
  packaging tqdm 2>&1 | grep -v WARNING || true
cp "$FI_SITE/flashinfer/data/aot/fused_moe_90/moe_build.json" "$out/" 2>/dev/null || true
du -sh "$out" "$out"/*
