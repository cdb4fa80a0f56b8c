"""What a MoE layer is: :class:`QuantScheme`, :class:`MoESpec`, :class:`ExpertWeights`.

These are plain, hashable descriptions. Kernels are planned from a ``MoESpec``
(:func:`moe_core.moe_plan`) and fed ``ExpertWeights`` in the canonical layout:

===========  ===================  ============================================
tensor       shape                meaning
===========  ===================  ============================================
``w13``      ``[E, 2I, H]``       gate rows ``[:I]`` then up rows ``[I:]``
                                  (``[E, I, H]`` for the non-gated ``relu2``)
``w2``       ``[E, H, I]``        down projection
``b13``      ``[E, 2I]``          bias of ``w13`` (``[E, I]`` non-gated)
``b2``       ``[E, H]``           bias of ``w2``
===========  ===================  ============================================

``E`` is the number of experts held by this rank (all of them without expert
parallelism). For the quantized schemes the packed weight and scale layouts are
documented in :mod:`moe_core.quant`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .errors import MoEInputError

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_MODES",
    "GATED_ACTIVATIONS",
    "QUANT_SCHEMES",
    "ExpertWeights",
    "MoESpec",
    "QuantScheme",
]

#: Every quantization scheme name a :class:`QuantScheme` accepts.
QUANT_SCHEMES = ("bf16", "fp16", "fp32", "fp8", "fp8_block", "mxfp4", "nvfp4")

#: Activation functions; the gated ones compute ``act(gate) * up``.
ACTIVATIONS = ("silu", "gelu", "swiglu_oai", "relu2")
GATED_ACTIVATIONS = ("silu", "gelu", "swiglu_oai")

#: Allowed activation-quantization modes per scheme; the first is the default.
ACTIVATION_MODES: dict[str, tuple[str, ...]] = {
    "bf16": ("none",),
    "fp16": ("none",),
    "fp32": ("none",),
    "fp8": ("fp8_per_token", "fp8_per_tensor"),
    "fp8_block": ("fp8_group",),
    "mxfp4": ("none", "fp8_per_tensor"),
    "nvfp4": ("nvfp4", "none"),
}

_WEIGHT_SCALES = {"fp8": ("per_channel", "per_tensor")}
_UNQUANTIZED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _UNQUANTIZED_DTYPES.items()}

#: Defaults of gpt-oss's clamped SwiGLU.
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


@dataclass(frozen=True)
class QuantScheme:
    """How expert weights (and the activations fed to them) are quantized.

    ``name`` is one of :data:`QUANT_SCHEMES`:

    - ``bf16`` / ``fp16`` / ``fp32``: unquantized weights of that dtype.
    - ``fp8``: e4m3 weights with a ``weight_scale`` of ``per_channel`` (one per
      output row, the default) or ``per_tensor`` (one per expert); activations
      ``fp8_per_token`` (dynamic, default) or ``fp8_per_tensor`` (static scale
      given as ``a13_scale``/``a2_scale``).
    - ``fp8_block``: e4m3 weights in ``block_shape`` (128x128) blocks, activations
      dynamically quantized in 1x128 groups (``fp8_group``; DeepSeek-V3).
    - ``mxfp4``: OCP e2m1 weights with an e8m0 scale per 32 along K; activations
      ``none`` (W4A16, default) or ``fp8_per_tensor`` (W4A8, static scale).
    - ``nvfp4``: e2m1 weights with an e4m3 scale per 16 along K and an fp32
      per-expert global scale; activations ``nvfp4`` (default) or ``none``.

    ``activation`` and ``weight_scale`` left as ``None`` take the defaults above.
    """

    name: str = "bf16"
    activation: str | None = None
    weight_scale: str | None = None
    block_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in QUANT_SCHEMES:
            raise MoEInputError(f"unknown quant scheme {self.name!r}; expected one of {QUANT_SCHEMES}")
        modes = ACTIVATION_MODES[self.name]
        if self.activation is None:
            object.__setattr__(self, "activation", modes[0])
        elif self.activation not in modes:
            raise MoEInputError(
                f"quant scheme {self.name!r} does not take activation mode {self.activation!r}; "
                f"expected one of {modes}"
            )
        scales = _WEIGHT_SCALES.get(self.name)
        if self.weight_scale is None:
            object.__setattr__(self, "weight_scale", scales[0] if scales else None)
        elif scales is None or self.weight_scale not in scales:
            raise MoEInputError(
                f"quant scheme {self.name!r} does not take weight_scale {self.weight_scale!r}"
                + (f"; expected one of {scales}" if scales else "")
            )
        if self.name == "fp8_block":
            shape = tuple(self.block_shape) if self.block_shape is not None else (128, 128)
            if len(shape) != 2 or any(int(s) <= 0 for s in shape):
                raise MoEInputError(f"block_shape must be two positive ints, got {self.block_shape!r}")
            object.__setattr__(self, "block_shape", (int(shape[0]), int(shape[1])))
        elif self.block_shape is not None:
            raise MoEInputError(f"block_shape only applies to fp8_block, not {self.name!r}")

    @classmethod
    def coerce(cls, value: QuantScheme | str | None, dtype: torch.dtype) -> QuantScheme:
        """A scheme from a scheme, a scheme name, or ``None`` (unquantized in ``dtype``)."""
        if isinstance(value, QuantScheme):
            return value
        if value is None:
            if dtype not in _DTYPE_NAMES:
                raise MoEInputError(f"no unquantized scheme for dtype {dtype}")
            return cls(_DTYPE_NAMES[dtype])
        if isinstance(value, str):
            return cls.parse(value)
        raise MoEInputError(f"quant must be a QuantScheme, a scheme name or None, got {type(value).__name__}")

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """A scheme from its name or its ``str()``: ``fp8``, ``fp8/w:per_tensor/a:fp8_per_tensor``,
        ``fp8_block/a:fp8_group/b:128x128``, ``mxfp4/a:fp8_per_tensor`` (fields after ``/``:
        ``w:`` weight_scale, ``a:`` activation, ``b:`` block shape ``NxK``; omitted: the defaults)."""
        name, *fields_ = text.strip().split("/")
        kwargs: dict[str, Any] = {}
        keys = {"w": "weight_scale", "a": "activation", "b": "block_shape"}
        for part in fields_:
            key, sep, val = part.partition(":")
            if not sep or key not in keys or keys[key] in kwargs:
                raise MoEInputError(
                    f"quant scheme {text!r}: bad field {part!r} (expected w:, a: or b:, once each)"
                )
            if key == "b":
                try:
                    val = tuple(int(v) for v in val.split("x"))
                except ValueError:
                    raise MoEInputError(f"quant scheme {text!r}: block shape {val!r} is not NxK") from None
            kwargs[keys[key]] = val
        return cls(name, **kwargs)

    @property
    def is_quantized(self) -> bool:
        """True for the fp8 and fp4 schemes."""
        return self.name not in _UNQUANTIZED_DTYPES

    @property
    def weight_dtype(self) -> torch.dtype:
        """Storage dtype of ``w13``/``w2``: fp8 e4m3, packed uint8 for fp4, else the float dtype."""
        if self.name in _UNQUANTIZED_DTYPES:
            return _UNQUANTIZED_DTYPES[self.name]
        if self.name in ("fp8", "fp8_block"):
            return torch.float8_e4m3fn
        return torch.uint8

    @property
    def is_fp4(self) -> bool:
        return self.name in ("mxfp4", "nvfp4")

    @property
    def static_activation_scale(self) -> bool:
        """True when the scheme needs ``a13_scale``/``a2_scale`` in the weights."""
        return self.activation == "fp8_per_tensor"

    def __str__(self) -> str:
        parts = [self.name]
        if self.weight_scale is not None:
            parts.append(f"w:{self.weight_scale}")
        if self.activation != "none":
            parts.append(f"a:{self.activation}")
        return "/".join(parts)


def _as_tuple_map(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise MoEInputError("expert_map must be a 1-D integer tensor or a sequence of ints")
        return tuple(int(v) for v in value.tolist())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(int(v) for v in value)
    raise MoEInputError(
        f"expert_map must be a 1-D integer tensor or a sequence of ints, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer's experts, as the planner sees them.

    Args:
        num_experts: global number of experts ``E`` (the router's output width,
            including fused shared-expert slots if the routing appends them).
        top_k: experts per token (columns of ``topk_ids``).
        hidden_size: ``H``.
        intermediate_size: ``I`` per expert (after tensor-parallel sharding).
        activation: one of :data:`ACTIVATIONS`.
        swiglu_alpha, swiglu_limit: ``swiglu_oai`` parameters (default 1.702, 7.0).
        has_bias: ``b13``/``b2`` are present.
        quant: a :class:`QuantScheme`, its name, or ``None`` for unquantized
            weights in ``dtype``.
        dtype: activations and output dtype (bf16, fp16 or fp32).
        ep_size, ep_rank: expert parallelism; this rank holds a contiguous slice
            of experts (the first ``E % ep_size`` ranks one more than the rest).
        expert_map: explicit global-to-local map of length ``E`` (``-1``: not on
            this rank); overrides ``ep_size``/``ep_rank``.
        apply_router_weight_on_input: scale the input rows by the router weight
            before GEMM 1 (Llama-4, requires ``top_k == 1``) instead of scaling
            the output of GEMM 2.

    Non-local experts contribute nothing to the output.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    has_bias: bool = False
    quant: QuantScheme | str | None = None
    dtype: torch.dtype = torch.bfloat16
    ep_size: int = 1
    ep_rank: int = 0
    expert_map: tuple[int, ...] | None = field(default=None, hash=True)
    apply_router_weight_on_input: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MoEInputError(f"MoESpec.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise MoEInputError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise MoEInputError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise MoEInputError(f"MoESpec.dtype must be bfloat16, float16 or float32, got {self.dtype}")
        object.__setattr__(self, "quant", QuantScheme.coerce(self.quant, self.dtype))
        if self.activation == "swiglu_oai":
            if self.swiglu_alpha is None:
                object.__setattr__(self, "swiglu_alpha", SWIGLU_OAI_ALPHA)
            if self.swiglu_limit is None:
                object.__setattr__(self, "swiglu_limit", SWIGLU_OAI_LIMIT)
        elif self.swiglu_alpha is not None or self.swiglu_limit is not None:
            raise MoEInputError("swiglu_alpha/swiglu_limit only apply to activation='swiglu_oai'")
        if self.ep_size < 1 or not 0 <= self.ep_rank < self.ep_size:
            raise MoEInputError(
                f"need ep_size >= 1 and 0 <= ep_rank < ep_size, got {self.ep_size}, {self.ep_rank}"
            )
        if self.ep_size > self.num_experts:
            raise MoEInputError(f"ep_size={self.ep_size} exceeds num_experts={self.num_experts}")
        emap = _as_tuple_map(self.expert_map)
        if emap is not None:
            if len(emap) != self.num_experts:
                raise MoEInputError(
                    f"expert_map has {len(emap)} entries, expected num_experts={self.num_experts}"
                )
            local = sorted(v for v in emap if v >= 0)
            if any(v < -1 for v in emap) or local != list(range(len(local))):
                raise MoEInputError("expert_map values must be -1 or a permutation of 0..num_local_experts-1")
            if not local:
                raise MoEInputError("expert_map maps no expert to this rank")
        object.__setattr__(self, "expert_map", emap)
        if self.apply_router_weight_on_input and self.top_k != 1:
            raise MoEInputError("apply_router_weight_on_input requires top_k == 1")
        if self.quant.is_fp4:
            group = 32 if self.quant.name == "mxfp4" else 16
            if self.hidden_size % group or self.intermediate_size % group:
                raise MoEInputError(
                    f"{self.quant.name} needs hidden_size and intermediate_size divisible by {group}, "
                    f"got H={self.hidden_size}, I={self.intermediate_size}"
                )

    # -- derived ---------------------------------------------------------------------------

    @property
    def is_gated(self) -> bool:
        """True when GEMM 1 produces gate and up halves (``w13`` has ``2I`` rows)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def w13_rows(self) -> int:
        """Rows of ``w13`` per expert: ``2I`` gated, ``I`` otherwise."""
        return 2 * self.intermediate_size if self.is_gated else self.intermediate_size

    @property
    def is_expert_parallel(self) -> bool:
        return self.expert_map is not None or self.ep_size > 1

    def global_to_local(self) -> tuple[int, ...]:
        """Map from global expert id to this rank's local id (``-1``: not local)."""
        if self.expert_map is not None:
            return self.expert_map
        base, extra = divmod(self.num_experts, self.ep_size)
        start = self.ep_rank * base + min(self.ep_rank, extra)
        count = base + (1 if self.ep_rank < extra else 0)
        return tuple(i - start if start <= i < start + count else -1 for i in range(self.num_experts))

    @property
    def num_local_experts(self) -> int:
        """Experts held by this rank: the leading dimension of every weight."""
        if not self.is_expert_parallel:
            return self.num_experts
        return sum(1 for v in self.global_to_local() if v >= 0)

    def expert_map_tensor(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The global-to-local map as an int32 tensor, or ``None`` without EP."""
        if not self.is_expert_parallel:
            return None
        return torch.tensor(self.global_to_local(), dtype=torch.int32, device=device)

    def replace(self, **changes: Any) -> MoESpec:
        """A copy with some fields changed (validated again).

        Changing ``dtype`` of an unquantized spec (without giving ``quant``) changes its
        scheme with it: ``fp32`` spec ``.replace(dtype=torch.bfloat16)`` is a ``bf16`` spec.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if "dtype" in changes and "quant" not in changes and not self.quant.is_quantized:
            values["quant"] = None
        values.update(changes)
        return MoESpec(**values)

    def describe(self) -> str:
        """One line: ``E=.. k=.. H=.. I=.. silu bf16 quant=..``."""
        text = (
            f"E={self.num_experts} k={self.top_k} H={self.hidden_size} I={self.intermediate_size} "
            f"{self.activation} dtype={str(self.dtype).removeprefix('torch.')} quant={self.quant}"
        )
        if self.has_bias:
            text += " bias"
        if self.is_expert_parallel:
            text += f" ep(local={self.num_local_experts})"
        if self.apply_router_weight_on_input:
            text += " weight-on-input"
        return text


_WEIGHT_FIELDS = (
    "w13",
    "w2",
    "b13",
    "b2",
    "w13_scale",
    "w2_scale",
    "a13_scale",
    "a2_scale",
    "w13_global_scale",
    "w2_global_scale",
)


@dataclass
class ExpertWeights:
    """Expert weights in the canonical layout (see the module docstring).

    Scales, by scheme (``E`` local experts, ``N`` output rows, ``K`` input columns):

    - ``fp8``: ``*_scale`` float32 ``[E]`` (per_tensor) or ``[E, N]`` (per_channel).
    - ``fp8_block``: ``*_scale`` float32 ``[E, ceil(N/bn), ceil(K/bk)]``.
    - ``mxfp4``: ``w*`` uint8 ``[E, N, K/2]``; ``*_scale`` uint8 e8m0 ``[E, N, K/32]``.
    - ``nvfp4``: ``w*`` uint8 ``[E, N, K/2]``; ``*_scale`` float8_e4m3fn
      ``[E, N, K/16]``; ``*_global_scale`` float32 ``[E]``.
    - ``a13_scale`` / ``a2_scale``: float32 scalars (shape ``[]`` or ``[1]``): static
      activation scales of the inputs of GEMM 1 / GEMM 2 (``fp8_per_tensor``), or
      the nvfp4 activation global scales (dynamic when absent).

    Dequantized value = stored value x scale (x global scale for nvfp4).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    w13_global_scale: torch.Tensor | None = None
    w2_global_scale: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, by field name, in a fixed order."""
        return {name: getattr(self, name) for name in _WEIGHT_FIELDS if getattr(self, name) is not None}

    def to(self, device: torch.device | str) -> ExpertWeights:
        """A copy with every tensor moved to ``device``."""
        return ExpertWeights(**{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return self.w13.device
