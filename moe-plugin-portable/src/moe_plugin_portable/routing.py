"""The portable routing kernel (family ``routing``): ``portable.triton.routing``.

One Triton launch computes ``select_experts`` for every method of
:mod:`moe_core.routing` (``softmax``, ``softmax_after_topk``, ``sigmoid``,
DeepSeek-V3 ``biased_grouped`` with its group selection, renormalization,
``routed_scaling_factor`` and fused shared-expert slots) and writes the final
``weights float32 [T, k']`` and ``ids int32 [T, k']`` directly: no torch
pre- or post-processing, no host synchronisation, launch size a function of
``T`` alone (CUDA-graph capturable).

Results equal :func:`moe_core.routing.select_experts_reference`: the same ids
in the same order, weights to float32 rounding (math in float32 for every
logits dtype). **Tie rule**: among equal choice scores the lowest expert id is
chosen first, and among equal group scores the lowest group id; ids within a
token are ordered by descending choice score. (The kernel implements top-k as
``k`` rounds of an integer max over keys ``(score, -expert)``, which is "max,
then the lowest index among those equal to the max"; see
``_details/_routing.py``.)

Limits (``supports`` gives the reason): ``E <= 512``, ``top_k <= 16``, logits
float32/bfloat16/float16, ``E`` divisible by ``num_expert_group``, ``top_k``
within the kept groups' experts, at most 64 shared slots.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from moe_core import DeviceInfo, KernelEntry
from moe_core.routing import ROUTING_METHODS, RoutingRequest, RoutingSpec

from ._common import PRIORITY, interpreting, triton_refusal

__all__ = [
    "MAX_EXPERTS",
    "MAX_SHARED",
    "MAX_TOP_K",
    "kernel_entries",
    "launch_config",
    "routing_launch",
    "select_experts_triton",
]

MAX_EXPERTS = 512
MAX_TOP_K = 16
MAX_SHARED = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _supports(request: RoutingRequest, device: DeviceInfo) -> str | None:
    reason = triton_refusal(device)
    if reason:
        return reason
    spec, E = request.spec, request.num_experts
    if request.dtype not in _DTYPES:
        return f"router logits must be float32, bfloat16 or float16, got {request.dtype}"
    if E > MAX_EXPERTS:
        return f"{E} experts exceed the kernel's limit of {MAX_EXPERTS} (one register tile per token)"
    if spec.top_k > MAX_TOP_K:
        return f"top_k={spec.top_k} exceeds the kernel's limit of {MAX_TOP_K}"
    if spec.top_k > E:
        return f"top_k={spec.top_k} exceeds the {E} experts"
    if spec.num_fused_shared_experts > MAX_SHARED:
        return f"{spec.num_fused_shared_experts} fused shared experts exceed the limit of {MAX_SHARED}"
    if spec.method == "biased_grouped":
        groups = spec.num_expert_group or 1
        keep = spec.topk_group if spec.topk_group is not None else groups
        if E % groups:
            return f"{E} experts do not split into {groups} groups"
        if spec.top_k > keep * (E // groups):
            return f"top_k={spec.top_k} exceeds the {keep * (E // groups)} experts of the {keep} kept groups"
    elif request.has_bias:
        return f"correction_bias only applies to biased_grouped, not {spec.method}"
    return None


def launch_config(
    num_tokens: int, num_experts: int, groups: int = 1, *, interpret: bool | None = None
) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)`` for ``num_tokens`` tokens: one warp per program while it holds the tile.

    Small batches (the decode latency case) get one token per program, so
    every program is a single warp whose reductions are warp shuffles; larger
    batches put a few tokens in a program to amortise its fixed cost. Under
    the interpreter (CPU tests) up to 16 tokens share a program: it runs
    programs one after the other, so fewer and wider ones are faster.
    ``interpret`` defaults to whether the interpreter is on now.
    """
    lanes = _next_pow2(groups) * _next_pow2(num_experts // groups)
    if interpreting() if interpret is None else interpret:
        block_t = min(16, _next_pow2(num_tokens))
    else:
        block_t = 1 if num_tokens <= 512 else 2 if num_tokens <= 2048 else 4
    num_warps = max(1, min(8, block_t * lanes // 1024))
    return block_t, num_warps


def select_experts_triton(
    logits: torch.Tensor, routing: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [T, k'], ids int32 [T, k'])`` for ``logits [T, E]``, one Triton launch.

    Inputs are assumed checked (as :func:`moe_core.select_experts` does);
    ``logits`` may be strided. Equal to the reference (see the module docstring).
    """
    weights, ids, launch = routing_launch(logits, routing, correction_bias)
    if launch is not None:
        kernel, grid, args, kwargs = launch
        with _on_device(logits.device):
            kernel[grid](*args, **kwargs)
    return weights, ids


def routing_launch(
    logits: torch.Tensor,
    routing: RoutingSpec,
    correction_bias: torch.Tensor | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]] | None]:
    """The outputs of :func:`select_experts_triton` (allocated) and its launch ``(kernel, grid, args,
    kwargs)``, not run (``None`` when ``T == 0``); ``interpret`` as in :func:`launch_config`."""
    from ._details import _routing as kernels

    T, E = logits.shape
    k, n_shared = routing.top_k, routing.num_fused_shared_experts
    slots = k + n_shared
    weights = torch.empty((T, slots), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, slots), dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids, None
    grouped = routing.method == "biased_grouped"
    groups = (routing.num_expert_group or 1) if grouped else 1
    keep = routing.topk_group if grouped and routing.topk_group is not None else groups
    if interpret is None:
        block_t, num_warps = launch_config(T, E, groups)
    else:
        block_t, num_warps = launch_config(T, E, groups, interpret=interpret)
    bias = correction_bias if correction_bias is not None else logits
    grid = (-(-T // block_t),)
    args: dict[str, Any] = dict(
        E=E,
        K=k,
        N_SHARED=n_shared,
        METHOD=kernels.METHODS[routing.method],
        RENORMALIZE=bool(routing.renormalize),
        HAS_BIAS=correction_bias is not None,
        GROUPS=groups,
        TOPK_GROUP=keep,
        BLOCK_T=block_t,
        BLOCK_G=_next_pow2(groups),
        BLOCK_EG=_next_pow2(E // groups),
        BLOCK_S=_next_pow2(slots),
        num_warps=num_warps,
    )
    positional = (
        logits,
        bias,
        weights,
        ids,
        T,
        logits.stride(0),
        logits.stride(1),
        bias.stride(0) if correction_bias is not None else 0,
        weights.stride(0),
        float(routing.routed_scaling_factor),
    )
    return weights, ids, (kernels.select_experts_kernel, grid, positional, args)


def _on_device(device: torch.device) -> Any:
    """Make ``device`` current for the launch when it is a GPU other than the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def kernel_entries() -> list[KernelEntry]:
    """The routing kernels of this plugin."""
    return [
        KernelEntry(
            name="portable.triton.routing",
            family="routing",
            apply=select_experts_triton,
            supports=_supports,
            features=frozenset({*ROUTING_METHODS, "fused_shared_experts"}),
            capability="any",
            priority=PRIORITY,
            description="Triton routing: softmax/sigmoid top-k and DeepSeek-V3 biased grouped top-k, "
            "one program per token(s), one launch, shared-expert slots fused",
        )
    ]
