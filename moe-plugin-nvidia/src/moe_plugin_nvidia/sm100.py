"""``nvidia.flashinfer.trtllm`` and ``nvidia.flashinfer.cute_dsl``: FlashInfer's SM100-only MoE paths.

Registered so that ``plan.explain()`` says why they are not chosen elsewhere
(capability ``cuda>=10.0,<11.0``, plus ``supports`` reasons). Their ``apply``
is not wired yet: planning one on an SM100 device raises
:class:`moe_core.UnsupportedError` at prepare time with that message, rather
than running something untested.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_core import DeviceInfo, KernelEntry, MoESpec
from moe_core.errors import UnsupportedError

from ._common import PRIORITY_SM100, flashinfer_refusal

__all__ = ["kernel_entries"]

_NOT_WIRED = "is registered for planning only: its prepare/apply are not implemented yet (SM100 untested)"

_TRTLLM_QUANTS = ("bf16", "fp8_block", "nvfp4", "mxfp4")
_CUTE_QUANTS = ("nvfp4",)


def _common_refusal(spec: MoESpec, device: DeviceInfo, quants: tuple[str, ...], what: str) -> str | None:
    if device.capability is None or device.capability[0] != 10:
        return f"{what} runs on SM100 (Blackwell) only, got {device.arch}"
    if spec.quant.name not in quants:
        return f"{what} takes {', '.join(quants)}, not {spec.quant.name}"
    if spec.dtype != torch.bfloat16:
        return f"{what} needs bf16 activations"
    return flashinfer_refusal()


def trtllm_supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """trtllm-gen MoE: SM100, bf16 / fp8 block / nvfp4 / mxfp4; H and I multiples of 128."""
    reason = _common_refusal(spec, device, _TRTLLM_QUANTS, "trtllm-gen MoE")
    if reason:
        return reason
    if spec.hidden_size % 128 or spec.intermediate_size % 128:
        return f"trtllm-gen MoE needs H and I multiples of 128, got H={spec.hidden_size}, I={spec.intermediate_size}"
    return f"nvidia.flashinfer.trtllm {_NOT_WIRED}"


def cute_dsl_supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """CuTe-DSL MoE: SM100, nvfp4, the optional ``nvidia-cutlass-dsl`` package."""
    reason = _common_refusal(spec, device, _CUTE_QUANTS, "CuTe-DSL MoE")
    if reason:
        return reason
    import importlib.util

    if importlib.util.find_spec("cutlass") is None:
        return "CuTe-DSL MoE needs nvidia-cutlass-dsl (pip install 'moe-plugin-nvidia[cute-dsl]')"
    return f"nvidia.flashinfer.cute_dsl {_NOT_WIRED}"


def _unwired(name: str):
    def fail(*_: Any, **__: Any) -> None:
        raise UnsupportedError(f"{name} {_NOT_WIRED}")

    return fail


def kernel_entries() -> list[KernelEntry]:
    """The SM100 kernels (planning and refusal reasons only)."""
    return [
        KernelEntry(
            name="nvidia.flashinfer.trtllm",
            family="experts",
            apply=_unwired("nvidia.flashinfer.trtllm"),
            prepare=_unwired("nvidia.flashinfer.trtllm"),
            supports=trtllm_supports,
            quant=frozenset(_TRTLLM_QUANTS),
            activations=frozenset({"silu", "swiglu_oai"}),
            features=frozenset({"expert_parallel"}),
            capability="cuda>=10.0,<11.0",
            priority=PRIORITY_SM100,
            description="FlashInfer trtllm-gen MoE (SM100): bf16, fp8 block, nvfp4, mxfp4 [not wired yet]",
        ),
        KernelEntry(
            name="nvidia.flashinfer.cute_dsl",
            family="experts",
            apply=_unwired("nvidia.flashinfer.cute_dsl"),
            prepare=_unwired("nvidia.flashinfer.cute_dsl"),
            supports=cute_dsl_supports,
            quant=frozenset(_CUTE_QUANTS),
            activations=frozenset({"silu"}),
            capability="cuda>=10.0,<11.0",
            priority=PRIORITY_SM100,
            description="FlashInfer CuTe-DSL MoE (SM100): nvfp4 [not wired yet]",
        ),
    ]
