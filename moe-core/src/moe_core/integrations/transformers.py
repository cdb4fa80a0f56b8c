"""Hugging Face transformers 5.x: ``experts_implementation="moe_core"``.

::

    from moe_core.integrations import transformers as moe_hf

    moe_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_core")
    model.set_experts_implementation("moe_core")      # or switch a loaded model

transformers keeps a MoE layer's experts in a module decorated with
``@use_experts_implementation``; its ``forward`` looks up
``config._experts_implementation`` in ``transformers.integrations.moe.ExpertsInterface``
and calls ``fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])
-> [T, H]``. The router has already run, so every routing method works.
:func:`register` adds :func:`experts_forward` there, which

1. reads the module's layout from the flags the decorator sets (``has_gate``,
   ``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_post_expert_norm``)
   and re-lays its weights out canonically (:func:`expert_weights`): ``w13 [E, 2I, H]``
   gate rows then up rows, ``w2 [E, H, I]``, ``b13``/``b2``;
2. maps the module's gate function to a moe-core activation (``silu``, ``gelu``,
   ``swiglu_oai`` with the module's alpha and limit, ``relu2`` for non-gated experts),
   checked numerically against the module's own ``_apply_gate``/``act_fn`` once;
3. plans (:func:`moe_core.moe_plan`) and prepares once per module, caching both
   on the module; the cache is rebuilt when the activations' device or dtype, the
   top-k, or any weight tensor (storage, shape, dtype, in-place version, so also
   ``load_state_dict``) changes;
4. runs :func:`moe_core.moe_apply`.

Under ``torch.compile`` (``fullgraph=True`` works) the preparation cached by an
eager forward is used as it is: run the model once eagerly first (a first call
that is traced raises :class:`~moe_core.MoEError` saying so), and again eagerly
after changing the weights.

With transformers' expert parallelism (``module._is_expert_parallel``) the ids
``>= num_experts`` are the off-rank sentinel and contribute nothing.

Where moe-core cannot express a module (a post-expert norm, a gate function that
is none of the above, quantized expert weights, activations that are not
bf16/fp16/fp32) or autograd is recording (moe-core runs inference only), the
module's own eager forward runs instead, with a warning once per case.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MoEError
from ..planner import MoEPlan, PreparedWeights, moe_apply, moe_plan
from ..reference import activation_reference
from ..spec import ExpertWeights, MoESpec

__all__ = ["NAME", "cached_plan", "expert_weights", "experts_forward", "register", "unsupported_reason"]

#: The name :func:`register` uses by default.
NAME = "moe_core"

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STATE_ATTR = "_moe_core_state"
# (alpha, limit) attribute names of gpt-oss style clamped SwiGLU gates in transformers' models
_SWIGLU_ATTRS = (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit"))
_warned: set[tuple[str, str]] = set()


def register(name: str = NAME) -> str:
    """Register :func:`experts_forward` in transformers' ``ExpertsInterface`` as ``name``.

    Idempotent. Imports transformers (>= 5) here, not at import of moe-core.
    Returns ``name``; afterwards ``from_pretrained(..., experts_implementation=name)``
    and ``model.set_experts_implementation(name)`` select it.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:  # transformers missing, or < 5 (no ExpertsInterface)
        raise ImportError(
            "moe_core.integrations.transformers needs transformers>=5 (pip install 'moe-core[hf]')"
        ) from exc
    current = ExpertsInterface._global_mapping.get(name)
    if current is experts_forward:
        return name
    if current is not None and getattr(current, "__module__", None) != __name__:
        raise MoEError(f"transformers experts implementation {name!r} is already registered by {current!r}")
    ExpertsInterface.register(name, experts_forward)
    return name


@dataclass
class _State:
    """What one experts module caches: the plan and prepared weights, or why it falls back."""

    key: tuple[Any, ...]
    plan: MoEPlan | None
    prepared: PreparedWeights | None
    reason: str | None
    sources: tuple[torch.Tensor, ...]  # held so their storage addresses stay unique while cached


def _weight_names(module: torch.nn.Module) -> tuple[str, ...]:
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    names = (first, "down_proj")
    if getattr(module, "has_bias", False):
        names += (f"{first}_bias", "down_proj_bias")
    return names


def _weights(module: torch.nn.Module) -> tuple[Any, ...]:
    """The module's weight tensors (``None`` where an attribute is missing), in ``_weight_names`` order."""
    return tuple(getattr(module, n, None) for n in _weight_names(module))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, _version(t))


def expert_weights(module: torch.nn.Module, dtype: torch.dtype | None = None) -> ExpertWeights:
    """The module's expert weights in moe-core's canonical layout (detached, contiguous).

    Handles transposed storage (``is_transposed``: ``gate_up_proj [E, H, 2I]``,
    ``down_proj [E, I, H]``) and interleaved gate/up columns (``is_concatenated=False``,
    gpt-oss: gate at even, up at odd positions). ``dtype`` converts the weights
    (default: keep theirs). Tensors already canonical are returned without a copy.
    """
    gated = getattr(module, "has_gate", True)
    tensors = [t.detach() for t in _weights(module)]
    w13, w2 = tensors[0], tensors[1]
    b13, b2 = (tensors[2], tensors[3]) if len(tensors) == 4 else (None, None)
    if getattr(module, "is_transposed", False):
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if gated and not getattr(module, "is_concatenated", True):
        w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
        if b13 is not None:
            b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)

    def canon(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (t if dtype is None else t.to(dtype)).contiguous()

    return ExpertWeights(w13=canon(w13), w2=canon(w2), b13=canon(b13), b2=canon(b2))


def _probe(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(rows, cols, generator=gen) * 4).to(device)


def _activation(
    module: torch.nn.Module, inter: int, device: torch.device
) -> tuple[dict[str, Any], str | None]:
    """The moe-core activation (as MoESpec fields) matching the module's gate, or a reason.

    Feeds a probe to the module's own ``_apply_gate`` (gated) or ``act_fn`` (non-gated)
    and compares with :func:`moe_core.reference.activation_reference` per candidate.
    """
    if getattr(module, "has_gate", True):
        fn = getattr(module, "_apply_gate", None)
        candidates: list[dict[str, Any]] = []
        for alpha_name, limit_name in _SWIGLU_ATTRS:
            alpha, limit = getattr(module, alpha_name, None), getattr(module, limit_name, None)
            if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
                candidates.append(
                    {"activation": "swiglu_oai", "swiglu_alpha": float(alpha), "swiglu_limit": float(limit)}
                )
        candidates += [{"activation": "silu"}, {"activation": "gelu"}]
        x = _probe(64, 2 * inter, device)  # canonical: gate columns, then up columns
        fn_in = x
        if not getattr(module, "is_concatenated", True):  # the module sees gate, up interleaved
            fn_in = torch.stack([x[:, :inter], x[:, inter:]], dim=-1).reshape(x.shape)
    else:
        fn = getattr(module, "act_fn", None)
        candidates = [{"activation": "relu2"}]
        x = fn_in = _probe(64, inter, device)
    if fn is None:
        return {}, "the experts module has no gate or activation function"
    try:
        with torch.no_grad():
            got = fn(fn_in).float()
    except Exception as exc:  # a gate function that does not take one plain tensor
        return {}, f"its gate function failed on a probe ({type(exc).__name__}: {exc})"
    probe_spec = dict(num_experts=1, top_k=1, hidden_size=1, intermediate_size=inter, dtype=torch.float32)
    for fields in candidates:
        expected = activation_reference(x, MoESpec(**probe_spec, **fields))
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            return fields, None
    names = ", ".join(f["activation"] for f in candidates)
    return {}, f"its gate function ({getattr(fn, '__qualname__', fn)}) matches none of: {names}"


def unsupported_reason(module: torch.nn.Module, dtype: torch.dtype | None = None) -> str | None:
    """Why moe-core cannot run this experts module (``None``: it can), before weights are read."""
    if getattr(module, "has_post_expert_norm", False):
        return "post-expert norm (has_post_expert_norm) is not supported"
    for name in _weight_names(module):
        t = getattr(module, name, None)
        if not isinstance(t, torch.Tensor) or (name.endswith("proj") and t.dim() != 3):
            return f"expected a 3-D tensor {name!r} on the experts module"
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} has dtype {t.dtype}; quantized expert weights are not supported here"
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        return f"activations of dtype {dtype} are not supported"
    return None


def _build(module: torch.nn.Module, key: tuple[Any, ...], x: torch.Tensor, top_k: int) -> _State:
    sources = tuple(t for t in _weights(module) if isinstance(t, torch.Tensor))
    reason = unsupported_reason(module, x.dtype)
    if reason is not None:
        return _State(key, None, None, reason, sources)
    weights = expert_weights(module, x.dtype)
    num_local, rows, hidden = weights.w13.shape
    gated = getattr(module, "has_gate", True)
    inter = rows // 2 if gated else rows
    act, reason = _activation(module, inter, weights.w13.device)
    if reason is not None:
        return _State(key, None, None, reason, sources)
    num_experts, expert_map = num_local, None
    if getattr(module, "_is_expert_parallel", False):
        # transformers marks routes to other ranks' experts with the local id num_experts (weight 0)
        num_experts, expert_map = num_local + 1, (*range(num_local), -1)
    spec = MoESpec(
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        intermediate_size=inter,
        has_bias=weights.b13 is not None,
        dtype=x.dtype,
        expert_map=expert_map,
        **act,
    )
    plan = moe_plan(spec, device=x.device)
    return _State(key, plan, plan.prepare(weights), None, sources)


def _state(module: torch.nn.Module, x: torch.Tensor, top_k: int) -> _State:
    if torch.compiler.is_compiling():
        state = getattr(module, _STATE_ATTR, None)
        if state is None:
            raise MoEError(
                "moe_core experts must be prepared before torch.compile traces them: "
                "run the model once eagerly (under torch.no_grad()) first"
            )
        return state
    key = (
        x.device,
        x.dtype,
        top_k,
        bool(getattr(module, "_is_expert_parallel", False)),
        tuple(_tensor_key(t) if isinstance(t, torch.Tensor) else None for t in _weights(module)),
    )
    state = getattr(module, _STATE_ATTR, None)
    if state is None or state.key != key:
        state = _build(module, key, x, top_k)
        object.__setattr__(module, _STATE_ATTR, state)  # not a submodule/parameter: plain attribute
    return state


def _eager(module: torch.nn.Module, reason: str, *args: torch.Tensor) -> torch.Tensor:
    cls = type(module)
    tag = (cls.__qualname__, reason)
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(
            f"moe_core: {cls.__name__} runs its eager forward: {reason}", RuntimeWarning, stacklevel=3
        )
    original = getattr(cls.forward, "__wrapped__", None)
    if original is None:
        raise MoEError(f"{cls.__name__} is not a transformers experts module (no wrapped forward); {reason}")
    return original(module, *args)


def _records_grad(module: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden_states.requires_grad or any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in _weights(module)
    )


def experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``ExpertsInterface`` function: ``[T, H]`` for the routed ``hidden_states``.

    Args:
        module: a transformers experts module (``@use_experts_implementation``).
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, k]`` expert ids (local ids under transformers' EP).
        top_k_weights: ``[T, k]`` router weights.
    """
    args = (hidden_states, top_k_index, top_k_weights)
    if _records_grad(module, hidden_states):
        return _eager(module, "autograd is recording and moe-core runs inference only", *args)
    state = _state(module, hidden_states, top_k_index.shape[-1])
    if state.reason is not None:
        return _eager(module, state.reason, *args)
    return moe_apply(state.plan, hidden_states.contiguous(), state.prepared, top_k_weights, top_k_index)


def cached_plan(module: torch.nn.Module) -> MoEPlan | None:
    """The plan cached on an experts module by its last moe-core forward (``None`` if none)."""
    state = getattr(module, _STATE_ATTR, None)
    return state.plan if state is not None else None
