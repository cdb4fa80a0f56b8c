"""aiter/CK fallbacks: ``amd.aiter.fused_moe`` (family ``experts``) and ``amd.aiter.moe_sorting`` (``sorting``).

Both run AMD's own kernels through the ``aiter`` package (``pip install
amd-aiter``; ROCm only) on gfx942/gfx950, at a priority below this plugin's and
the portable plugin's kernels. Nothing here imports aiter at registration or
planning time: ``supports`` looks the package up without importing it
(``plan.explain()`` says "aiter is not installed" when it is absent), and
imports it only on a real ROCm device; ``prepare``/``apply`` import it when
they run.

What is passed to aiter is built by pure functions, :func:`fused_moe_call`,
:func:`aiter_layout` and :func:`moe_sorting_call`, which need no aiter (enum
values are named, resolved at call time), so the tests check them against the
real signatures and documented layouts of aiter's source (``tests/amd/test_aiter.py``).

Translation (aiter's ``fused_moe`` in ``aiter/fused_moe.py``):

- weights: canonical ``w13 [E, 2I, H]`` (gate rows, then up rows) and ``w2 [E,
  H, I]`` are aiter's ``w1 [expert, inter_dim*2, dim]`` and ``w2 [expert, dim,
  inter_dim]`` (its reference splits gate then up the same way); ``prepare``
  re-lays them out with ``aiter.ops.shuffle.shuffle_weight(w, layout=(16,
  16))``, the layout its CK/asm MoE kernels read. fp8 weights become aiter's
  fp8 type for the arch (``float8_e4m3fnuz`` on gfx942: bits reinterpreted,
  ``-0`` cleared, scales doubled). High-precision weights given for a
  quantized scheme are quantized first (:func:`moe_core.quant.quantize_weights`).
- quant schemes -> ``QuantType``: ``bf16``/``fp16`` -> ``No``; ``fp8`` with
  dynamic per-token activations -> ``per_Token`` (weight scales ``[E, N, 1]``,
  a per-tensor weight scale broadcast to every row); ``fp8`` per-tensor weights
  with static per-tensor activations -> ``per_Tensor`` (weight scales ``[E, 1,
  1]``, ``a1_scale``/``a2_scale`` ``[1]``); ``fp8_block`` 128x128 ->
  ``per_128x128`` (scales ``[E, N/128, K/128]``, activations quantized by aiter
  in 1x128 groups). Activations ``silu``/``gelu`` -> ``ActivationType.Silu``/``Gelu``.
- router weight on the input -> ``doweight_stage1=True``.
- ids: int32, and ids outside ``[0, E)`` are sent to an extra expert ``E``
  that the ``expert_mask`` (length ``E + 1``, int32) marks non-local, so aiter
  drops them as the contract requires; under expert parallelism the mask marks
  this rank's experts (aiter numbers local experts by rank, so the spec's
  expert map must be increasing).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoEInputError, MoESpec, PreparedWeights
from moe_core.quant import quantize_weights
from moe_core.sorting import SortedTokens, SortingRequest, max_num_blocks, moe_sorting_reference

from ._common import PRIORITY_AITER

__all__ = [
    "AITER_CAPABILITY",
    "AiterCall",
    "AiterEnum",
    "aiter_layout",
    "aiter_refusal",
    "aiter_version",
    "fused_moe_call",
    "kernel_entries",
    "moe_sorting_aiter",
    "moe_sorting_call",
]

AITER_CAPABILITY = "hip gfx942,gfx950"
#: aiter's fp8 dtype per arch (``aiter.utility.dtypes.defaultDtypes``)
FP8_DTYPES = {"gfx942": torch.float8_e4m3fnuz, "gfx950": torch.float8_e4m3fn}
#: ``aiter.ops.shuffle.shuffle_weight``'s ``layout`` for the MoE kernels (16 rows x 32 columns per tile)
SHUFFLE_LAYOUT = (16, 16)
_ACTIVATIONS = {"silu": "Silu", "gelu": "Gelu"}
_OUT_DTYPES = (torch.bfloat16, torch.float16)
_MOE_BUF_COLUMNS = 8  # moe_sorting_fwd zeroes a [T, cols] fp16 buffer; 16 bytes per row (CK asks for x16)


@dataclass(frozen=True)
class AiterEnum:
    """An aiter enum member by name (``aiter.QuantType.per_Token``), resolved when the call runs."""

    type: str
    member: str

    def resolve(self, aiter: Any) -> Any:
        return getattr(getattr(aiter, self.type), self.member)


@dataclass
class AiterCall:
    """A call of an aiter function: ``function`` (dotted path), positional ``args`` as ``(aiter's
    parameter name, value)`` in order, and keyword ``kwargs``; :class:`AiterEnum` values are
    resolved by :meth:`run`."""

    function: str
    args: list[tuple[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, aiter: Any) -> Any:
        module, name = self.function.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)

        def value(v: Any) -> Any:
            return v.resolve(aiter) if isinstance(v, AiterEnum) else v

        return fn(*(value(v) for _, v in self.args), **{k: value(v) for k, v in self.kwargs.items()})


# ----------------------------------------------------------------------------- availability


def aiter_version() -> str | None:
    """The installed ``amd-aiter`` version (no import), or ``None``."""
    if importlib.util.find_spec("aiter") is None:
        return None
    try:
        return metadata.version("amd-aiter")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def _import_aiter() -> tuple[Any, str | None]:
    try:
        import aiter
        import aiter.fused_moe
    except Exception as exc:  # a broken install refuses, it does not crash planning
        return None, f"{type(exc).__name__}: {exc}"
    return aiter, None


def _aiter() -> Any:
    module, error = _import_aiter()
    if module is None:
        raise MoEInputError(f"aiter failed to import: {error}")
    return module


def aiter_refusal(device: DeviceInfo) -> str | None:
    """Why aiter cannot run on ``device``: not installed, or (on a real device) not importable."""
    if importlib.util.find_spec("aiter") is None:
        return "aiter is not installed (pip install amd-aiter, on a ROCm machine)"
    if device.simulated:  # planning for a device that is not here: do not import aiter on this host
        return None
    if not getattr(torch.version, "hip", None):
        return "aiter needs a ROCm build of torch"
    _, error = _import_aiter()
    return None if error is None else f"aiter is installed but does not import: {error}"


# ----------------------------------------------------------------------------- fused MoE


def _quant_type(spec: MoESpec) -> tuple[str | None, str | None]:
    """``(QuantType member, None)`` for the spec's scheme, or ``(None, why not)``."""
    q = spec.quant
    if q.name in ("bf16", "fp16"):
        return "No", None
    if q.name == "fp8":
        if q.activation == "fp8_per_token":
            return "per_Token", None
        if q.weight_scale == "per_tensor":
            return "per_Tensor", None
        return None, (
            "aiter has no mode for per-channel fp8 weights with static per-tensor activations "
            "(per_Token quantizes activations dynamically; per_Tensor needs per-tensor weight scales)"
        )
    if q.name == "fp8_block":
        if q.block_shape != (128, 128):
            return None, f"aiter's block-scaled fp8 MoE takes 128x128 blocks, not {q.block_shape}"
        return "per_128x128", None
    return None, f"quant {q.name} is not mapped to aiter"


def _supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    reason = aiter_refusal(device)
    if reason:
        return reason
    if spec.dtype not in _OUT_DTYPES:
        return f"aiter's fused_moe writes bf16 or fp16, not {spec.dtype}"
    if spec.quant.name in ("bf16", "fp16") and spec.quant.weight_dtype != spec.dtype:
        return f"{spec.quant.name} weights with {spec.dtype} activations are not supported"
    qtype, reason = _quant_type(spec)
    if qtype is None:
        return reason
    multiple = 128 if qtype == "per_128x128" else 32
    H, inter = spec.hidden_size, spec.intermediate_size
    if H % multiple or inter % multiple:
        return (
            f"hidden_size={H} and intermediate_size={inter} must be multiples of {multiple} "
            f"(aiter's {SHUFFLE_LAYOUT} weight shuffle"
            + (" and 128x128 scale blocks)" if multiple == 128 else ")")
        )
    if spec.is_expert_parallel:
        local = [g for g in spec.global_to_local() if g >= 0]
        if local != list(range(len(local))):
            return (
                "aiter numbers local experts by their rank in expert_mask: the expert_map must be increasing"
            )
    return None


def _to_arch_fp8(w: torch.Tensor, scale: torch.Tensor, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``float8_e4m3fn`` weights and their scale in aiter's fp8 type for ``arch`` (same values)."""
    want = FP8_DTYPES.get(arch, torch.float8_e4m3fn)
    if want == w.dtype:
        return w, scale
    bits = w.view(torch.int8)
    bits = torch.where(bits == -128, torch.zeros_like(bits), bits)  # -0 is NaN in e4m3fnuz
    return bits.view(want), scale * 2.0  # same bits read as fnuz are half the value


def aiter_layout(spec: MoESpec, weights: ExpertWeights, arch: str, shuffle: Any) -> dict[str, torch.Tensor]:
    """Canonical ``weights`` as aiter's ``fused_moe`` takes them (``shuffle``: aiter's ``shuffle_weight``)."""
    qtype, reason = _quant_type(spec)
    if qtype is None:
        raise MoEInputError(f"amd.aiter.fused_moe: {reason}")
    if spec.quant.is_quantized and weights.w13.dtype in (torch.float32, torch.float16, torch.bfloat16):
        weights = quantize_weights(weights, spec.quant)
    L, N1, H, inter = spec.num_local_experts, spec.w13_rows, spec.hidden_size, spec.intermediate_size
    w1, w2 = weights.w13.contiguous(), weights.w2.contiguous()
    s1, s2 = weights.w13_scale, weights.w2_scale
    if qtype in ("per_Token", "per_Tensor", "per_128x128"):
        w1, s1 = _to_arch_fp8(w1, s1.float(), arch)
        w2, s2 = _to_arch_fp8(w2, s2.float(), arch)
    out = {"w1": shuffle(w1, layout=SHUFFLE_LAYOUT), "w2": shuffle(w2, layout=SHUFFLE_LAYOUT)}
    if qtype == "per_Token":  # one scale per output row: [E, N, 1]
        out["w1_scale"] = s1.reshape(L, -1, 1).expand(L, N1, 1).contiguous()
        out["w2_scale"] = s2.reshape(L, -1, 1).expand(L, H, 1).contiguous()
    elif qtype == "per_Tensor":  # one scale per expert; static activation scales [1]
        out["w1_scale"] = s1.reshape(L, 1, 1).contiguous()
        out["w2_scale"] = s2.reshape(L, 1, 1).contiguous()
        out["a1_scale"] = weights.a13_scale.float().reshape(1).contiguous()
        out["a2_scale"] = weights.a2_scale.float().reshape(1).contiguous()
    elif qtype == "per_128x128":  # [E, ceil(N/128), ceil(K/128)]
        out["w1_scale"] = s1.reshape(L, -(-N1 // 128), -(-H // 128)).contiguous()
        out["w2_scale"] = s2.reshape(L, -(-H // 128), -(-inter // 128)).contiguous()
    # experts of this rank, plus an always-masked extra expert E that out-of-range ids are sent to
    local = torch.tensor([g >= 0 for g in spec.global_to_local()] + [False], dtype=torch.int32)
    out["expert_mask"] = local.to(w1.device)
    return out


def _prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> PreparedWeights:
    _aiter()
    from aiter.ops.shuffle import shuffle_weight

    tensors = aiter_layout(spec, weights, device.arch, shuffle_weight)
    return PreparedWeights("amd.aiter.fused_moe", tensors, {"layout": f"aiter shuffle {SHUFFLE_LAYOUT}"})


def fused_moe_call(
    spec: MoESpec,
    tensors: dict[str, torch.Tensor],
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> AiterCall:
    """The ``aiter.fused_moe.fused_moe`` call for prepared ``tensors`` (see the module docstring)."""
    qtype, reason = _quant_type(spec)
    if qtype is None:
        raise MoEInputError(f"amd.aiter.fused_moe: {reason}")
    E = spec.num_experts
    kept = (topk_ids >= 0) & (topk_ids < E)
    ids = torch.where(kept, topk_ids, torch.full_like(topk_ids, E)).to(torch.int32)
    args = [
        ("hidden_states", hidden_states),
        ("w1", tensors["w1"]),
        ("w2", tensors["w2"]),
        ("topk_weight", topk_weights.to(torch.float32)),
        ("topk_ids", ids),
    ]
    kwargs: dict[str, Any] = {
        "expert_mask": tensors["expert_mask"],
        "activation": AiterEnum("ActivationType", _ACTIVATIONS[spec.activation]),
        "quant_type": AiterEnum("QuantType", qtype),
        "doweight_stage1": spec.apply_router_weight_on_input,
        "dtype": spec.dtype,
    }
    for name in ("w1_scale", "w2_scale", "a1_scale", "a2_scale"):
        if name in tensors:
            kwargs[name] = tensors[name]
    return AiterCall("aiter.fused_moe.fused_moe", args, kwargs)


def _apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    call = fused_moe_call(spec, prepared.tensors, hidden_states, topk_weights, topk_ids)
    out.copy_(call.run(_aiter()))


# ----------------------------------------------------------------------------- sorting


def moe_sorting_call(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> tuple[AiterCall, dict[str, torch.Tensor]]:
    """The ``aiter.moe_sorting_fwd`` call and its output buffers (sized as ``aiter.fused_moe.moe_sorting``
    sizes them, and at least as long as the contract's outputs).

    Out-of-range ids go to an extra expert ``E`` that the mask marks non-local, so CK drops them.
    """
    T, k = topk_ids.shape
    E, B, dev = num_experts, unit_size, topk_ids.device
    kept = (topk_ids >= 0) & (topk_ids < E)
    ids = torch.where(kept, topk_ids, torch.full_like(topk_ids, E)).to(torch.int32).contiguous()
    mask = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    mask[:E] = 1 if expert_mask is None else (expert_mask != 0).to(torch.int32)
    n, length = T * k, max_num_blocks(T * k, E, B) * B
    padded = max(n + (E + 1) * B - k, length)  # aiter: topk_ids.numel() + num_experts * block_size - topk
    buffers = {
        "sorted_token_ids": torch.empty(padded, dtype=torch.int32, device=dev),
        "sorted_weights": torch.empty(padded, dtype=torch.float32, device=dev),
        "sorted_expert_ids": torch.empty(-(-padded // B), dtype=torch.int32, device=dev),
        "num_valid_ids": torch.empty(2, dtype=torch.int32, device=dev),
        "moe_buf": torch.empty(T, _MOE_BUF_COLUMNS, dtype=torch.float16, device=dev),
    }
    args = [
        ("topk_ids", ids),
        ("topk_weights", topk_weights.to(torch.float32).contiguous()),
        *buffers.items(),
        ("num_experts", E + 1),
        ("unit_size", B),
        ("local_expert_mask", mask),
        ("num_local_tokens", None),
        ("dispatch_policy", 0),
    ]
    return AiterCall("aiter.moe_sorting_fwd", args), buffers


def _to_contract(buffers: dict[str, torch.Tensor], T: int, k: int, E: int, B: int) -> SortedTokens:
    """CK's output as the contract's: padding ``(k << 24) | T`` -> ``T``, tails written, exact lengths."""
    length = max_num_blocks(T * k, E, B) * B
    num = buffers["num_valid_ids"]
    pos = torch.arange(length, dtype=torch.int32, device=num.device)
    ids = buffers["sorted_token_ids"][:length]
    pad = (pos >= num[0]) | ((ids & 0xFFFFFF) == T)
    sorted_ids = torch.where(pad, torch.full_like(ids, T), ids)
    weights = buffers["sorted_weights"][:length]
    sorted_weights = torch.where(pad, torch.zeros_like(weights), weights)
    units = buffers["sorted_expert_ids"][: length // B]
    unused = pos[: length // B] * B >= num[0]
    sorted_expert_ids = torch.where(unused, torch.full_like(units, -1), units)
    return SortedTokens(sorted_ids, sorted_weights, sorted_expert_ids, num)


def moe_sorting_aiter(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> SortedTokens:
    """:func:`moe_core.sorting.moe_sorting` by CK's ``moe_sorting`` (through aiter); any order within an expert."""
    kwargs = {"num_experts": num_experts, "unit_size": unit_size, "expert_mask": expert_mask}
    if topk_ids.numel() == 0:
        return moe_sorting_reference(topk_ids, topk_weights, **kwargs)
    call, buffers = moe_sorting_call(topk_ids, topk_weights, **kwargs)
    call.run(_aiter())
    T, k = topk_ids.shape
    return _to_contract(buffers, T, k, num_experts, unit_size)


def _supports_sorting(request: SortingRequest, device: DeviceInfo) -> str | None:
    reason = aiter_refusal(device)
    if reason:
        return reason
    if request.ids_dtype not in (torch.int32, torch.int64):
        return f"topk_ids dtype {request.ids_dtype} not supported (int32, int64)"
    return None


def kernel_entries() -> list[KernelEntry]:
    """``amd.aiter.fused_moe`` and ``amd.aiter.moe_sorting`` (need aiter, on gfx942/gfx950)."""
    return [
        KernelEntry(
            name="amd.aiter.fused_moe",
            family="experts",
            apply=_apply,
            prepare=_prepare,
            supports=_supports,
            quant=frozenset({"bf16", "fp16", "fp8", "fp8_block"}),
            activations=frozenset(_ACTIVATIONS),
            features=frozenset({"expert_parallel", "router_weight_on_input"}),
            capability=AITER_CAPABILITY,
            priority=PRIORITY_AITER,
            description="aiter fused_moe (CK/asm kernels): bf16/fp16, fp8 per-token/per-tensor, fp8 block",
        ),
        KernelEntry(
            name="amd.aiter.moe_sorting",
            family="sorting",
            op="moe_sorting",
            apply=moe_sorting_aiter,
            supports=_supports_sorting,
            features=frozenset({"expert_map"}),
            capability=AITER_CAPABILITY,
            priority=PRIORITY_AITER,
            description="CK moe_sorting through aiter (moe_sorting_fwd), padding and tails made contract-exact",
        ),
    ]
