"""Shared facts of the NVIDIA plugin: priorities, FlashInfer availability and build-state refusals."""

from __future__ import annotations

import os

from .flashinfer_env import MIN_FLASHINFER, flashinfer_dir, flashinfer_version, prebuilt_module, version_tuple

__all__ = [
    "PRIORITY_CUTLASS",
    "PRIORITY_SM100",
    "cutlass_module_name",
    "flashinfer_refusal",
    "module_refusal",
]

#: Above portable's Triton kernels (50) where FlashInfer's cutlass MoE runs.
PRIORITY_CUTLASS = 70
#: trtllm-gen / CuTe-DSL on SM100 (above cutlass there).
PRIORITY_SM100 = 80

#: ``MOE_NVIDIA_ALLOW_JIT=1`` lets FlashInfer JIT-compile a module that is not prebuilt.
ALLOW_JIT_ENV = "MOE_NVIDIA_ALLOW_JIT"


def flashinfer_refusal() -> str | None:
    """Why FlashInfer cannot be used (not installed / too old), or ``None``."""
    if flashinfer_dir() is None:
        return "flashinfer-python is not installed (pip install 'flashinfer-python>=0.7.2')"
    have = version_tuple(flashinfer_version())
    if have and have < MIN_FLASHINFER:
        need = ".".join(map(str, MIN_FLASHINFER))
        return f"flashinfer-python {flashinfer_version()} is too old (need >= {need})"
    return None


def cutlass_module_name(capability: tuple[int, int]) -> str | None:
    """FlashInfer's cutlass fused-MoE module for a compute capability (``None``: no module)."""
    major, minor = capability
    if major == 9:
        return "fused_moe_90"
    if major in (10, 11):
        return "fused_moe_103" if (major, minor) == (10, 3) else "fused_moe_100"
    if major == 12:
        return "fused_moe_120"
    return None


def module_refusal(module: str, quant: str) -> str | None:
    """Why ``module`` cannot serve ``quant`` without a long JIT build, or ``None``.

    ``MOE_NVIDIA_ALLOW_JIT=1`` accepts a missing module (FlashInfer then
    compiles it on first use: 40-60 minutes for ``fused_moe_90``).
    """
    found = prebuilt_module(module)
    arch = {"fused_moe_90": "9.0a"}.get(module)
    if arch:
        build = f"`moe nvidia build --arch {arch} --quant {quant}`"
        jit = "JIT-compiling it takes 40-60 min on first use"
    else:
        build = (
            "FlashInfer's jit-cache wheel (flashinfer-jit-cache; `moe nvidia build` builds only fused_moe_90)"
        )
        jit = "FlashInfer JIT-compiles it with nvcc on first use"
    if found is None:
        if os.environ.get(ALLOW_JIT_ENV) == "1":
            return None
        return (
            f"FlashInfer's {module} is not built ({jit}): "
            f"build it ahead of time with {build}, or set {ALLOW_JIT_ENV}=1 to let FlashInfer compile it"
        )
    if not found.has_quant(quant):
        built = ",".join(found.manifest.quants) if found.manifest else "?"
        return f"the prebuilt {module} ({found.path}) has no {quant} kernels (built: {built}); rebuild with {build}"
    return None
