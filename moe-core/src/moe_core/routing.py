"""Expert routing: :class:`RoutingSpec`, :func:`select_experts` and its reference.

``select_experts(logits [T, E], routing, correction_bias=None)`` returns
``(weights float32 [T, k'], ids int32 [T, k'])`` with ``k' = top_k +
num_fused_shared_experts``. Methods:

``softmax``
    softmax over all ``E`` logits (float32), then the top-k probabilities;
    ``renormalize`` divides them by their sum (Mixtral, Qwen3-MoE).
``softmax_after_topk``
    top-k on the logits, then softmax over those k (gpt-oss).
``sigmoid``
    top-k on the logits, weights ``sigmoid(logit)``; optional renormalize
    (Llama-4; with ``apply_router_weight_on_input`` in the experts).
``biased_grouped``
    DeepSeek-V3: ``s = sigmoid(logits)``; choice scores ``s + correction_bias``;
    ``E`` split into ``num_expert_group`` groups, each scored by the sum of its
    two best choice scores; the ``topk_group`` best groups are kept and the
    top-k choice scores taken among their experts; weights are the unbiased
    ``s`` of the chosen experts, divided by their sum if ``renormalize``.

Every method then multiplies the weights by ``routed_scaling_factor``. With
``num_fused_shared_experts = n`` the ids ``E .. E+n-1`` are appended to every
token with weight 1.0 (the shared experts' output is added unscaled; their
weights then live at those expert indices of a ``MoESpec`` with ``E + n``
experts).

Ties are broken by the lowest index: among equal scores the lower expert id
(and for groups the lower group id) is chosen first. Expert ids within a token
are ordered by descending choice score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MoEInputError
from .registry import dispatch_op
from .validation import check_dtype, check_float_tensor, check_same_device, check_shape

__all__ = [
    "ROUTING_METHODS",
    "RoutingRequest",
    "RoutingSpec",
    "select_experts",
    "select_experts_reference",
    "topk_lowest_index",
]

ROUTING_METHODS = ("softmax", "softmax_after_topk", "sigmoid", "biased_grouped")


@dataclass(frozen=True)
class RoutingSpec:
    """How a router's logits become (weights, expert ids); see the module docstring.

    Args:
        method: one of :data:`ROUTING_METHODS`.
        top_k: routed experts per token.
        renormalize: divide the chosen weights by their sum (softmax, sigmoid,
            biased_grouped; ``softmax_after_topk`` is normalized by definition).
        num_expert_group, topk_group: ``biased_grouped`` groups (default: one
            group, all kept).
        routed_scaling_factor: multiplies every routed weight.
        num_fused_shared_experts: shared-expert slots appended (weight 1.0).
    """

    method: str = "softmax"
    top_k: int = 2
    renormalize: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    num_fused_shared_experts: int = 0

    def __post_init__(self) -> None:
        if self.method not in ROUTING_METHODS:
            raise MoEInputError(f"unknown routing method {self.method!r}; expected one of {ROUTING_METHODS}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0:
            raise MoEInputError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.num_fused_shared_experts < 0:
            raise MoEInputError("num_fused_shared_experts must be >= 0")
        if self.method != "biased_grouped" and (self.num_expert_group or self.topk_group):
            raise MoEInputError("num_expert_group/topk_group only apply to method='biased_grouped'")
        groups = self.num_expert_group or 1
        keep = self.topk_group if self.topk_group is not None else groups
        if groups < 1 or not 1 <= keep <= groups:
            raise MoEInputError(
                f"need num_expert_group >= 1 and 1 <= topk_group <= num_expert_group, got {groups}, {keep}"
            )

    @property
    def num_slots(self) -> int:
        """Columns of the output: ``top_k + num_fused_shared_experts``."""
        return self.top_k + self.num_fused_shared_experts

    def check_num_experts(self, num_experts: int) -> None:
        """Raise :class:`MoEInputError` if this spec cannot route over ``num_experts``."""
        if self.top_k > num_experts:
            raise MoEInputError(f"top_k={self.top_k} exceeds the {num_experts} experts of the logits")
        if self.method == "biased_grouped":
            groups = self.num_expert_group or 1
            keep = self.topk_group if self.topk_group is not None else groups
            if num_experts % groups:
                raise MoEInputError(f"{num_experts} experts do not split into {groups} groups")
            if self.top_k > keep * (num_experts // groups):
                raise MoEInputError(f"top_k={self.top_k} exceeds the experts of the {keep} kept groups")


@dataclass(frozen=True)
class RoutingRequest:
    """What a routing kernel's ``supports(request, device)`` receives."""

    spec: RoutingSpec
    num_experts: int
    dtype: torch.dtype
    has_bias: bool = False

    @property
    def features(self) -> frozenset[str]:
        extra = {"fused_shared_experts"} if self.spec.num_fused_shared_experts else set()
        return frozenset({self.spec.method, *extra})

    def describe(self) -> str:
        return f"{self.spec.method} top_k={self.spec.top_k} E={self.num_experts} logits={self.dtype}"


def topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, ties to the lowest index, in descending order."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def select_experts_reference(
    logits: torch.Tensor, routing: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch routing (float32 math); the contract every routing kernel matches."""
    x = logits.float()
    T, E = x.shape
    k = routing.top_k
    if routing.method == "softmax":
        weights, ids = topk_lowest_index(torch.softmax(x, dim=-1), k)
    elif routing.method == "softmax_after_topk":
        values, ids = topk_lowest_index(x, k)
        weights = torch.softmax(values, dim=-1)
    elif routing.method == "sigmoid":
        values, ids = topk_lowest_index(x, k)
        weights = torch.sigmoid(values)
    else:
        scores = torch.sigmoid(x)
        choice = scores + correction_bias.float() if correction_bias is not None else scores
        groups = routing.num_expert_group or 1
        keep = routing.topk_group if routing.topk_group is not None else groups
        per_group = choice.view(T, groups, E // groups)
        group_scores = topk_lowest_index(per_group, min(2, E // groups))[0].sum(dim=-1)
        kept = topk_lowest_index(group_scores, keep)[1]
        group_mask = torch.zeros(T, groups, dtype=torch.bool, device=x.device).scatter_(1, kept, True)
        masked = choice.masked_fill(~group_mask.repeat_interleave(E // groups, dim=1), float("-inf"))
        ids = topk_lowest_index(masked, k)[1]
        weights = scores.gather(1, ids)
    if routing.renormalize and routing.method != "softmax_after_topk":
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routing.routed_scaling_factor != 1.0:
        weights = weights * routing.routed_scaling_factor
    ids = ids.to(torch.int32)
    n_shared = routing.num_fused_shared_experts
    if n_shared:
        shared_ids = torch.arange(E, E + n_shared, dtype=torch.int32, device=x.device).expand(T, n_shared)
        ids = torch.cat([ids, shared_ids], dim=1)
        weights = torch.cat([weights, weights.new_ones(T, n_shared)], dim=1)
    return weights.float().contiguous(), ids.contiguous()


def _check_routing_inputs(
    logits: torch.Tensor, routing: RoutingSpec, correction_bias: torch.Tensor | None
) -> None:
    if not isinstance(routing, RoutingSpec):
        raise MoEInputError(f"routing must be a RoutingSpec, got {type(routing).__name__}")
    check_float_tensor(logits, "router_logits")
    if logits.dim() != 2:
        raise MoEInputError(f"router_logits must be 2-D [tokens, experts], got shape {list(logits.shape)}")
    routing.check_num_experts(logits.shape[1])
    if correction_bias is not None:
        if routing.method != "biased_grouped":
            raise MoEInputError("correction_bias only applies to method='biased_grouped'")
        check_float_tensor(correction_bias, "correction_bias")
        check_shape(correction_bias, (logits.shape[1],), "correction_bias")
        check_dtype(correction_bias, (torch.float32, torch.bfloat16, torch.float16), "correction_bias")
        check_same_device({"router_logits": logits, "correction_bias": correction_bias})


def select_experts(
    router_logits: torch.Tensor,
    routing: RoutingSpec,
    *,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: ``(weights float32 [T, k'], ids int32 [T, k'])`` (see the module docstring).

    Runs the best registered routing kernel for the logits' device (falling
    back to :func:`select_experts_reference`); traceable by ``torch.compile``
    (it is the custom op ``moe_core::select_experts``).
    """
    _check_routing_inputs(router_logits, routing, correction_bias)
    if torch.compiler.is_compiling():
        from .ops import select_experts_op

        return select_experts_op(router_logits, routing, correction_bias)
    return run_select_experts(router_logits, routing, correction_bias)


def run_select_experts(
    logits: torch.Tensor, routing: RoutingSpec, correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch without validation (inputs already checked)."""
    if logits.shape[0] == 0:
        shape = (0, routing.num_slots)
        return (
            torch.empty(shape, dtype=torch.float32, device=logits.device),
            torch.empty(shape, dtype=torch.int32, device=logits.device),
        )
    request = RoutingRequest(routing, logits.shape[1], logits.dtype, correction_bias is not None)
    impl = dispatch_op("routing", "select_experts", logits.device, request)
    if impl is None:
        return select_experts_reference(logits, routing, correction_bias)
    return impl(logits, routing, correction_bias)
