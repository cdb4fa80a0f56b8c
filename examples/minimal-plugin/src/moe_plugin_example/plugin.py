"""The plugin module named by the ``moe_core.plugins`` entry point: one experts kernel.

``example.torch.loop`` computes a MoE layer's experts in pure torch, one expert
at a time. It handles unquantized weights (bf16, fp16, fp32) with the ``silu``
activation and nothing else: the registry refuses every other request, with a
reason, from what the entry declares, and :func:`supports` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights, hookimpl

#: ``<plugin>.<backend>.<variant>``; ``example`` is the entry point's name.
NAME = "example.torch.loop"

#: Weight storage dtype of each quant scheme this kernel declares.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: One Python iteration per expert: past this many the kernel is too slow to be useful.
MAX_EXPERTS = 512


def supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """``None`` if this kernel runs ``spec`` on ``device``, else the reason it does not.

    Called by ``moe_plan`` after the registry has checked the declared quant
    schemes, activations and features (and the capability), so only what
    those cannot say is left here. The reason is shown by ``plan.explain()``.
    """
    if DTYPES[spec.quant.name] != spec.dtype:
        return f"weights ({spec.quant.name}) and activations ({spec.dtype}) must share a dtype"
    if spec.num_experts > MAX_EXPERTS:
        return f"{spec.num_experts} experts: this kernel loops over experts in Python (at most {MAX_EXPERTS})"
    return None


def prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> dict[str, torch.Tensor]:
    """Re-lay out the canonical weights once per layer (never in place).

    Canonical ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E, H, I]``
    become ``[E, K, N]`` matrices, so that :func:`apply` computes ``x @ w``.
    """
    inter = spec.intermediate_size
    return {
        "w_gate": weights.w13[:, :inter].transpose(1, 2).contiguous(),  # [E, H, I]
        "w_up": weights.w13[:, inter:].transpose(1, 2).contiguous(),  # [E, H, I]
        "w_down": weights.w2.transpose(1, 2).contiguous(),  # [E, I, H]
    }


def apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Write ``out[t] = sum_j w[t, j] * down(silu(x[t] @ gate) * (x[t] @ up))`` over ``t``'s experts.

    Every expert runs on every token, scaled by the token's router weight for
    it (zero for the other tokens): no shape depends on the data, so nothing
    synchronises with the host and CUDA graphs can capture it, and ids outside
    ``[0, E)`` match no expert, so they are skipped. Accumulates in float32.
    """
    x = hidden_states.float()
    weights = topk_weights.float()
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for e in range(spec.num_experts):
        coef = (weights * (topk_ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]
        gate = x @ prepared["w_gate"][e].float()
        up = x @ prepared["w_up"][e].float()
        acc += coef * ((F.silu(gate) * up) @ prepared["w_down"][e].float())
    out.copy_(acc)


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """Called once, when moe-core first loads plugins: describe the kernel."""
    register(
        KernelEntry(
            name=NAME,
            family="experts",
            apply=apply,
            prepare=prepare,
            supports=supports,
            quant=frozenset(DTYPES),
            activations=frozenset({"silu"}),
            features=frozenset(),  # no bias, expert parallelism or router weight on the input
            capability="any",  # pure torch: CPU, CUDA and ROCm
            priority=-10,  # below the reference (0): installing the example changes no plan
            needs_contiguous=False,  # torch's matmul takes strided hidden_states
            description="example plugin: pure torch, one expert at a time (a tutorial, not a fast path)",
        )
    )
