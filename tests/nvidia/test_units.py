"""moe_plugin_nvidia.aot.units: which fused_moe_90 sources each quant scheme needs."""

from __future__ import annotations

import pytest

from moe_plugin_nvidia.aot.units import QUANT_SCHEMES, classify_generated, parse_quant_list, select_units

TMA = "INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, {a}, {b}, {o},\n void, EpilogueOpDefault, NONE, 128, 64, 64);\n"
SM80 = "template void sm80_generic_fused_moe_gemm_kernelLauncher<{a}, {a}, 16, 128, 64, 2, Silu>(...);\n"
MIXED = "template void sm90_generic_mixed_moe_gemm_kernelLauncher<{a}, {b}, x>(...);\n"
W4A8_INT4 = MIXED.format(a="__nv_fp8_e4m3", b="cutlass::uint4b_t")
W4A16_FP4 = MIXED.format(a="__nv_bfloat16", b="SafeFP4")

BF16 = ("__nv_bfloat16",) * 3
FP8 = ("__nv_fp8_e4m3", "__nv_fp8_e4m3", "__nv_bfloat16")


def _tma(a, b, o):
    return TMA.format(a=a, b=b, o=o)


SOURCES = {
    "/c/moe_gemm/moe_gemm_tma_warp_specialized_input.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_bf16_bf16.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_fp8_fp8.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_fp16_fp16.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_bf16_uint4.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_bf16_fp8.cu": None,
    "/c/moe_gemm/moe_gemm_kernels_bf16_fp4.cu": None,
    "/c/fp8_blockscale_gemm/fp8_blockscale_gemm.cu": None,
    "/c/cutlass_backend/flashinfer_cutlass_fused_moe_binding.cu": None,
    "/c/common/logger.cpp": None,
    "/g/90/a_M128_group0.generated.cu": _tma(*BF16) * 2,
    "/g/90/a_M128_group1.generated.cu": _tma(*FP8) + _tma("__nv_fp8_e4m3", "__nv_fp8_e4m3", "half"),
    "/g/90/a_M128_group2.generated.cu": _tma("half", "half", "half"),
    "/g/90/a_M128_group3.generated.cu": _tma("float", "float", "float"),
    "/g/90/a_M128_Mixed_group0.generated.cu": W4A8_INT4,
    "/g/90/a_M128_Mixed_group1.generated.cu": W4A16_FP4 * 2,
    "/g/80/a_M16_group0.generated.cu": SM80.format(a="cutlass::half_t"),
    "/g/80/a_M16_group1.generated.cu": SM80.format(a="cutlass::half_t")
    + SM80.format(a="cutlass::bfloat16_t"),
}


def _names(paths):
    return sorted(p.rsplit("/", 1)[-1] for p in paths)


def test_classify_generated_reads_the_instantiations():
    assert classify_generated(_tma(*BF16)) == {"tma:__nv_bfloat16,__nv_bfloat16,__nv_bfloat16"}
    assert classify_generated(SM80.format(a="cutlass::bfloat16_t")) == {"sm80:cutlass::bfloat16_t"}
    assert classify_generated(W4A8_INT4) == {"mixed:__nv_fp8_e4m3,cutlass::uint4b_t"}
    assert classify_generated(W4A16_FP4) == {"mixed:__nv_bfloat16,SafeFP4"}
    assert classify_generated("template void fpA_intB_gemm<half>(...);") == frozenset()
    assert classify_generated("") == frozenset()


def test_bf16_keeps_core_its_runner_and_its_instantiations_only():
    sel = select_units(SOURCES, ["bf16"])
    assert _names(sel.kept) == sorted(
        [
            "moe_gemm_tma_warp_specialized_input.cu",
            "moe_gemm_kernels_bf16_bf16.cu",
            "flashinfer_cutlass_fused_moe_binding.cu",
            "logger.cpp",
            "a_M128_group0.generated.cu",
            "a_M16_group1.generated.cu",
        ]
    )
    assert set(sel.kept) | set(sel.omitted) == set(SOURCES) and not set(sel.kept) & set(sel.omitted)
    assert len(sel.by_scheme["core"]) == 3 and len(sel.by_scheme["bf16"]) == 3
    assert list(sel.kept) == [p for p in SOURCES if p in sel.kept]  # input order kept


def test_schemes_add_up_and_share_core():
    both = select_units(SOURCES, ["bf16", "fp8", "fp8_block"])
    kept = set(_names(both.kept))
    assert {"a_M128_group1.generated.cu", "moe_gemm_kernels_fp8_fp8.cu", "fp8_blockscale_gemm.cu"} <= kept
    # fp8_block's DeepGEMM path is reached through the runner typed bf16 activations x fp8 weights
    assert "moe_gemm_kernels_bf16_fp8.cu" in kept
    assert "a_M128_group3.generated.cu" in _names(both.omitted)  # fp32 is never built
    assert {"a_M128_Mixed_group0.generated.cu", "a_M128_Mixed_group1.generated.cu"} <= set(
        _names(both.omitted)
    )
    assert _names(both.by_scheme["fp8_block"]) == ["fp8_blockscale_gemm.cu", "moe_gemm_kernels_bf16_fp8.cu"]
    fp16 = select_units(SOURCES, "fp16")
    assert {"a_M128_group2.generated.cu", "a_M16_group0.generated.cu", "a_M16_group1.generated.cu"} <= set(
        _names(fp16.kept)
    )
    assert "a_M128_group0.generated.cu" in _names(fp16.omitted)


def test_mxfp4_keeps_the_bf16_x_fp4_mixed_gemms_only():
    sel = select_units(SOURCES, ["mxfp4"])
    assert _names(sel.by_scheme["mxfp4"]) == [
        "a_M128_Mixed_group1.generated.cu",
        "moe_gemm_kernels_bf16_fp4.cu",
    ]
    assert "a_M128_Mixed_group0.generated.cu" in _names(sel.omitted)  # W4A8 int4: not an mxfp4 kernel


def test_parse_quant_list():
    assert parse_quant_list("fp8, bf16,bf16") == ("bf16", "fp8")
    assert set(QUANT_SCHEMES) == {"bf16", "fp16", "fp8", "fp8_block", "mxfp4"}
    with pytest.raises(ValueError, match="int8"):
        parse_quant_list("bf16,int8")
    with pytest.raises(ValueError):
        parse_quant_list("")
