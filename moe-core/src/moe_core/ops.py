"""``torch.library`` custom ops, so MoE layers trace under ``torch.compile``.

- ``moe_core::moe_apply(x, topk_weights, topk_ids, weights[], plan, layout) -> out``
- ``moe_core::moe_apply_out(x, topk_weights, topk_ids, weights[], plan, layout, out!)``
- ``moe_core::select_experts(logits, bias?, method, top_k, ...) -> (weights, ids)``

Plans and prepared-weight layouts are not tensors, so they are registered in a
process-wide table and passed to the ops as integer handles (constants in a
traced graph). Each op has a fake (meta) implementation giving output shapes
without running a kernel. In eager mode :func:`moe_core.moe_apply` and
:func:`moe_core.select_experts` call the kernels directly, skipping the
dispatcher overhead; under ``torch.compile`` they go through these ops.
"""

from __future__ import annotations

import torch

from .planner import PLANS, MoEPlan, PreparedWeights, rebuild_prepared, run_experts
from .routing import RoutingSpec, run_select_experts

__all__ = ["moe_apply_op", "select_experts_op"]


def _rebuild(layout: int, weights: list[torch.Tensor]) -> PreparedWeights:
    return rebuild_prepared(layout, weights)


@torch.library.custom_op("moe_core::moe_apply", mutates_args=())
def _moe_apply(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: list[torch.Tensor],
    plan: int,
    layout: int,
) -> torch.Tensor:
    prepared = _rebuild(layout, weights)
    return run_experts(PLANS[plan], hidden_states, prepared, topk_weights, topk_ids, None)


@_moe_apply.register_fake
def _(hidden_states, topk_weights, topk_ids, weights, plan, layout):
    return hidden_states.new_empty(hidden_states.shape, dtype=PLANS[plan].spec.dtype)


@torch.library.custom_op("moe_core::moe_apply_out", mutates_args=("out",))
def _moe_apply_out(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights: list[torch.Tensor],
    plan: int,
    layout: int,
    out: torch.Tensor,
) -> None:
    prepared = _rebuild(layout, weights)
    run_experts(PLANS[plan], hidden_states, prepared, topk_weights, topk_ids, out)


@_moe_apply_out.register_fake
def _(hidden_states, topk_weights, topk_ids, weights, plan, layout, out):
    return None


def moe_apply_op(
    plan: MoEPlan,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run :func:`moe_core.moe_apply` through the custom op (inputs already checked)."""
    weights = list(prepared.tensors.values())
    handle, layout = _handles(plan, prepared)
    if out is None:
        return torch.ops.moe_core.moe_apply(hidden_states, topk_weights, topk_ids, weights, handle, layout)
    torch.ops.moe_core.moe_apply_out(hidden_states, topk_weights, topk_ids, weights, handle, layout, out)
    return out


def _handles(plan: MoEPlan, prepared: PreparedWeights) -> tuple[int, int]:
    """The plan's and the layout's handles, constants of the traced graph (with ``dynamic=True``
    dynamo would otherwise turn these ints read from a closure into symbols)."""
    return plan.handle, prepared.layout_handle


# what torch.compiler.assume_constant_result(_handles) does, without importing dynamo (seconds) here
_handles._dynamo_marked_constant = True  # type: ignore[attr-defined]


@torch.library.custom_op("moe_core::select_experts", mutates_args=())
def _select_experts(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    method: str,
    top_k: int,
    renormalize: bool,
    num_expert_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    num_fused_shared_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    routing = RoutingSpec(
        method,
        top_k,
        renormalize,
        num_expert_group or None,
        topk_group or None,
        routed_scaling_factor,
        num_fused_shared_experts,
    )
    return run_select_experts(logits, routing, correction_bias)


@_select_experts.register_fake
def _(logits, correction_bias, method, top_k, renormalize, num_expert_group, topk_group, scale, n_shared):
    shape = (logits.shape[0], top_k + n_shared)
    return (
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.int32),
    )


def select_experts_op(
    logits: torch.Tensor, routing: RoutingSpec, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`moe_core.select_experts` through the custom op (inputs already checked)."""
    return torch.ops.moe_core.select_experts(
        logits,
        correction_bias,
        routing.method,
        routing.top_k,
        routing.renormalize,
        routing.num_expert_group or 0,
        routing.topk_group or 0,
        float(routing.routed_scaling_factor),
        routing.num_fused_shared_experts,
    )
