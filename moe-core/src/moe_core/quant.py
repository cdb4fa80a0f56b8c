"""Reference quantizers: fp8 e4m3, mxfp4 and nvfp4, in pure torch.

Everything here is vectorized float32 math on any device (inputs of any float
dtype are converted to float32 first). It defines the packed layouts that
:class:`moe_core.ExpertWeights` carries, and it is what the reference backend
uses to quantize high-precision weights and to model activation quantization.

Weights are ``[..., N, K]`` (the leading dims are usually the experts ``E``);
every quantization group runs along ``K``, the last dim. Activations are
``[T, K]``. ``ceil`` below is ceiling division.

fp8 (``float8_e4m3fn``, finite range ±448)
    ``q = fp8(clamp(x / scale, -448, 448))`` (round to nearest even);
    dequantized ``float(q) * scale`` (float32, scale broadcast over its group).

    =====================  ===================================  =================
    granularity            ``scale`` (float32)                  group
    =====================  ===================================  =================
    per_tensor (weights)   ``[...]`` (``[E]``: one per expert)  the whole [N, K]
    per_channel (weights)  ``[..., N]``                         one row of K
    block ``(bn, bk)``     ``[..., ceil(N/bn), ceil(K/bk)]``    bn x bk tile
    per_token (acts)       ``[T, 1]``                           one row of K
    per_tensor (acts)      ``[]`` or ``[1]``, given (static)    the whole tensor
    group ``g`` (acts)     ``[T, ceil(K/g)]``                   1 x g
    =====================  ===================================  =================

    Blocks and groups start at index 0; the last ones along N and K may be
    partial (N, K need not be multiples of the block). Dynamic scales are
    ``amax / 448`` of the group, *rounded toward zero to 21 significant bits*
    (relative change < 2**-20) so that ``448 * scale`` is exact in float32: then
    ``dequantize(quantize(x))`` is a fixed point of quantization (idempotent),
    also for any other quantizer computing ``amax / 448``. An all-zero group
    gets ``scale = 1`` (any positive scale dequantizes zeros exactly; 1 avoids
    0/0).

e2m1 (fp4) codes, shared by mxfp4 and nvfp4
    A code is 4 bits: bit 3 the sign, bits 0-2 the magnitude index into
    :data:`E2M1_VALUES` ``(0, 0.5, 1, 1.5, 2, 3, 4, 6)``. Rounding is to the
    nearest value, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at ±6; the sign is kept
    even when the magnitude rounds to 0 (code 8 is -0). Packed: uint8
    ``[..., K/2]``, byte ``j`` holds element ``2j`` in its LOW nibble and element
    ``2j+1`` in its HIGH nibble: ``byte = code[2j] | code[2j+1] << 4``.

mxfp4 (OCP Microscaling v1.0; ``K % 32 == 0``)
    ``packed`` uint8 ``[..., K/2]``, ``scale`` uint8 e8m0 ``[..., K/32]``, one per
    32 consecutive elements along K. Byte ``b`` means ``2**(b - 127)`` (255 is
    NaN and never produced). The block exponent is
    ``floor(log2(amax)) - 2`` (2 = emax of e2m1) clamped to ``[-127, 127]``; an
    all-zero block gets the smallest, ``-127`` (byte 0). Elements
    ``x / 2**exp`` are rounded to e2m1 (values of ``amax / 2**exp`` in [6, 8)
    saturate to 6, as in the OCP spec). Dequantized
    ``e2m1(code) * 2**(b - 127)``, exact in float32.

nvfp4 (``K % 16 == 0``)
    ``packed`` uint8 ``[..., K/2]``; ``scale`` float8_e4m3fn ``[..., K/16]``, one
    per 16 consecutive elements along K; ``global_scale`` float32, one per
    leading index: ``[...]`` for weights ``[..., N, K]`` (``[E]``: per expert),
    a scalar ``[]`` for activations. Dequantized (float32, left to right)::

        e2m1(code) * float(scale) * global_scale

    Note: this ``global_scale`` is the *dequantization* multiplier; FlashInfer's
    ``global_sf`` is its reciprocal (``448 * 6 / amax``). By default
    ``global_scale = amax / (448 * 6)`` over each weight matrix ``[N, K]`` (over
    the whole tensor for activations), rounded toward zero to 19 significant
    bits so that ``2688 * global_scale`` is exact (see fp8 above), and 1 when
    amax is 0. Block scale ``= fp8(min(block_amax / 6 / global_scale, 448))``
    (round to nearest even); elements ``x / (float(scale) * global_scale)`` are
    rounded to e2m1 (0 where that divisor is 0). ``dequantize(quantize(x))`` is a
    fixed point of quantization for every block whose e4m3 scale is normal
    (>= 2**-6); a block with a subnormal scale (its amax below about 2**-15 of
    the matrix amax) may round to a smaller scale when quantized again.

Inputs must be finite: NaN and inf have no defined encoding here.
Results are bit-identical on every device: divisions by constants go through
device tensors (CUDA turns ``x / 448.0`` into ``x * (1 / 448.0)``) and powers of
two are built from their bits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .errors import MoEInputError
from .spec import ExpertWeights, QuantScheme

__all__ = [
    "E2M1_VALUES",
    "FP4_MAX",
    "FP8_DTYPE",
    "FP8_MAX",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "dequantize_fp8",
    "dequantize_fp8_block",
    "dequantize_fp8_group",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "dequantize_tensor",
    "dequantize_weights",
    "e2m1_to_float",
    "e8m0_to_float",
    "fake_quantize_activation",
    "float_to_e2m1",
    "is_high_precision",
    "pack_e2m1",
    "quantize_fp8",
    "quantize_fp8_block",
    "quantize_fp8_group",
    "quantize_fp8_per_tensor",
    "quantize_fp8_per_token",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "quantize_nvfp4_activation",
    "quantize_tensor",
    "quantize_weights",
    "unpack_e2m1",
]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn magnitude.
FP8_MAX = 448.0
#: Largest e2m1 magnitude.
FP4_MAX = 6.0
#: The non-negative e2m1 values, indexed by the 3-bit magnitude code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Elements per scale along K.
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16

# Midpoints between consecutive E2M1_VALUES: midpoint i lies between codes i and i+1.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E8M0_BIAS = 127
_E2M1_EMAX = 2


# -- helpers -----------------------------------------------------------------------------------


def _float32(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise MoEInputError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise MoEInputError(f"{name} must have a floating dtype, got {x.dtype}")
    return x.float()


def _check_dtype(x: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise MoEInputError(f"{name} must be a {dtype} tensor, got {got}")


def _check_dim(x: torch.Tensor, dim: int, name: str, layout: str) -> None:
    if x.dim() < dim:
        raise MoEInputError(f"{name} must be {layout} (at least {dim}-D), got shape {tuple(x.shape)}")


def _check_multiple(k: int, group: int, what: str) -> None:
    if k % group:
        raise MoEInputError(f"{what} needs K (the last dim) divisible by {group}, got K={k}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _abs_amax(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """``|x|.amax(dim)``, zeros for an empty ``x`` (``amax`` refuses empty reductions)."""
    return x.abs().amax(dim=dim) if x.numel() else x.abs().sum(dim=dim)


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device (CUDA multiplies by the reciprocal of a Python scalar)."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**n`` for integers ``n`` in [-127, 127], built from the bits (no libm ``exp2``)."""
    n = n.to(torch.int32)
    bits = torch.where(n > -127, (n + 127) << 23, 1 << 22)  # 2**-127 is subnormal: mantissa bit 22
    return bits.view(torch.float32)


def _trim_mantissa(value: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``value`` with its ``bits`` lowest mantissa bits cleared (rounded toward zero)."""
    return (value.contiguous().view(torch.int32) & ~((1 << bits) - 1)).view(torch.float32)


def _dynamic_scale(amax: torch.Tensor, qmax: float, bits: int) -> torch.Tensor:
    """``amax / qmax`` trimmed so ``qmax * scale`` is exact (``bits`` = bit length of qmax's odd part); 1 if 0."""
    scale = _trim_mantissa(_div(amax, qmax), bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _fp8_dynamic_scale(amax: torch.Tensor) -> torch.Tensor:
    return _dynamic_scale(amax, FP8_MAX, 3)  # 448 = 7 * 2**6


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _scale_tensor(scale: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
        raise MoEInputError(f"{name} must be a floating tensor")
    return scale.float()


def _scalar(scale: torch.Tensor, name: str) -> torch.Tensor:
    scale = _scale_tensor(scale, name)
    if scale.numel() != 1:
        raise MoEInputError(f"{name} must hold one value (shape [] or [1]), got shape {tuple(scale.shape)}")
    return scale.reshape(())


def _align(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """``scale`` with trailing singleton dims up to ``ndim``, so it broadcasts over the rest."""
    return scale.reshape(*scale.shape, *([1] * (ndim - scale.dim())))


# -- e2m1 codes --------------------------------------------------------------------------------


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode e2m1 codes: uint8 ``[...]`` (low 4 bits used) -> float32 ``[...]``."""
    _check_dtype(codes, torch.uint8, "e2m1 codes")
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    table = torch.cat([magnitudes, -magnitudes])
    return table[(codes & 0xF).long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to even code, saturating at ±6): float ``[...]`` -> uint8 codes ``[...]``."""
    x = _float32(x, "x")
    magnitude = x.abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=x.device)
    below = torch.bucketize(magnitude, mids)  # midpoints < magnitude
    at_or_below = torch.bucketize(magnitude, mids, right=True)  # midpoints <= magnitude
    # on a tie with midpoint i (= below), codes i and i+1 compete: take the even one
    code = torch.where(below % 2 == 1, at_or_below, below)
    sign = torch.signbit(x).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes, uint8 ``[..., K]`` (K even) -> uint8 ``[..., K/2]``, element ``2j`` in the low nibble."""
    _check_dtype(codes, torch.uint8, "e2m1 codes")
    _check_dim(codes, 1, "e2m1 codes", "[..., K]")
    if codes.shape[-1] % 2:
        raise MoEInputError(f"packing e2m1 needs an even last dim, got {codes.shape[-1]}")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 ``[..., K/2]`` -> uint8 codes ``[..., K]``."""
    _check_dtype(packed, torch.uint8, "packed e2m1")
    _check_dim(packed, 1, "packed e2m1", "[..., K/2]")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 bytes: uint8 ``[...]`` -> float32 ``2**(b - 127)`` (exact; 255 is NaN)."""
    _check_dtype(scale, torch.uint8, "e8m0 scale")
    return torch.where(scale == 255, torch.nan, _pow2(scale.clamp(max=254).int() - _E8M0_BIAS))


# -- fp8 weights -------------------------------------------------------------------------------


def quantize_fp8(w: torch.Tensor, granularity: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 weights: float ``[..., N, K]`` -> (fp8 ``[..., N, K]``, float32 scale).

    The scale is ``[..., N]`` for ``per_channel`` (one per row) and ``[...]`` for
    ``per_tensor`` (one per leading index: per expert for ``[E, N, K]``).
    """
    w = _float32(w, "w")
    _check_dim(w, 2, "w", "[..., N, K]")
    if granularity == "per_channel":
        scale = _fp8_dynamic_scale(_abs_amax(w, (-1,)))
        return _to_fp8(w, scale[..., None]), scale
    if granularity == "per_tensor":
        scale = _fp8_dynamic_scale(_abs_amax(w, (-2, -1)))
        return _to_fp8(w, scale[..., None, None]), scale
    raise MoEInputError(f"fp8 granularity must be 'per_channel' or 'per_tensor', got {granularity!r}")


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 ``[..., N, K]`` times its scale -> float32 ``[..., N, K]``.

    ``scale`` may be one value (``[]``/``[1]``), per leading index ``[...]``
    (per_tensor), per row ``[..., N]`` (per_channel) or ``[..., N, 1]``
    (per_token), and is broadcast over the rest.
    """
    _check_dtype(q, FP8_DTYPE, "q")
    scale = _scale_tensor(scale, "scale")
    shape = tuple(q.shape)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif tuple(scale.shape) in (shape[:-1], shape[:-2], (*shape[:-1], 1)):
        scale = _align(scale, q.dim())
    else:
        raise MoEInputError(
            f"fp8 scale of shape {tuple(scale.shape)} does not fit q of shape {shape}: expected "
            f"{list(shape[:-2])} (per tensor), {list(shape[:-1])} (per channel) or one value"
        )
    return q.float() * scale


def _block_shape(block_shape: tuple[int, int]) -> tuple[int, int]:
    if len(block_shape) != 2 or any(isinstance(b, bool) or int(b) != b or b <= 0 for b in block_shape):
        raise MoEInputError(f"block_shape must be two positive ints, got {block_shape!r}")
    return int(block_shape[0]), int(block_shape[1])


def _expand_blocks(scale: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    """Block scales ``[..., nb, kb]`` -> per element ``[..., n, k]``."""
    return scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :n, :k]


def quantize_fp8_block(
    w: torch.Tensor, block_shape: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 in ``(bn, bk)`` tiles: float ``[..., N, K]`` -> (fp8 ``[..., N, K]``, float32 ``[..., ceil(N/bn), ceil(K/bk)]``).

    N and K need not be multiples of the tile; edge tiles are partial.
    """
    w = _float32(w, "w")
    _check_dim(w, 2, "w", "[..., N, K]")
    bn, bk = _block_shape(block_shape)
    n, k = w.shape[-2:]
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    padded = F.pad(w.abs(), (0, kb * bk - k, 0, nb * bn - n))
    tiles = padded.reshape(*w.shape[:-2], nb, bn, kb, bk)
    scale = _fp8_dynamic_scale(_abs_amax(tiles, (-3, -1)))
    return _to_fp8(w, _expand_blocks(scale, (bn, bk), n, k)), scale


def dequantize_fp8_block(
    q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """fp8 ``[..., N, K]`` with tile scales ``[..., ceil(N/bn), ceil(K/bk)]`` -> float32 ``[..., N, K]``."""
    _check_dtype(q, FP8_DTYPE, "q")
    _check_dim(q, 2, "q", "[..., N, K]")
    scale = _scale_tensor(scale, "scale")
    bn, bk = _block_shape(block_shape)
    n, k = q.shape[-2:]
    want = (*q.shape[:-2], _cdiv(n, bn), _cdiv(k, bk))
    if tuple(scale.shape) != want:
        raise MoEInputError(
            f"fp8 block scale must be {list(want)} for q {list(q.shape)} and block {(bn, bk)}, "
            f"got {list(scale.shape)}"
        )
    return q.float() * _expand_blocks(scale, (bn, bk), n, k)


# -- fp8 activations ---------------------------------------------------------------------------


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: float ``[T, K]`` -> (fp8 ``[T, K]``, float32 ``[T, 1]``)."""
    x = _float32(x, "x")
    _check_dim(x, 1, "x", "[T, K]")
    scale = _fp8_dynamic_scale(_abs_amax(x, (-1,))[..., None])
    return _to_fp8(x, scale), scale


def quantize_fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor fp8 with a given scale (shape ``[]`` or ``[1]``): float ``[T, K]`` -> fp8 ``[T, K]``.

    Dequantize with ``dequantize_fp8(q, scale)``.
    """
    x = _float32(x, "x")
    return _to_fp8(x, _scalar(scale, "static activation scale").to(x.device))


def quantize_fp8_group(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 in 1 x ``group_size`` groups: float ``[T, K]`` -> (fp8 ``[T, K]``, float32 ``[T, ceil(K/g)]``).

    The last group along K may be partial (DeepSeek-V3's activation quantization).
    """
    x = _float32(x, "x")
    _check_dim(x, 1, "x", "[T, K]")
    q, scale = quantize_fp8_block(x.unsqueeze(-2), (1, group_size))
    return q.squeeze(-2), scale.squeeze(-2)


def dequantize_fp8_group(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """fp8 ``[T, K]`` with group scales ``[T, ceil(K/g)]`` -> float32 ``[T, K]``."""
    _check_dtype(q, FP8_DTYPE, "q")
    _check_dim(q, 1, "q", "[T, K]")
    scale = _scale_tensor(scale, "scale")
    _check_dim(scale, 1, "scale", "[T, ceil(K/g)]")
    return dequantize_fp8_block(q.unsqueeze(-2), scale.unsqueeze(-2), (1, group_size)).squeeze(-2)


# -- mxfp4 -------------------------------------------------------------------------------------


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP mxfp4: float ``[..., K]`` (K % 32 == 0) -> (uint8 packed ``[..., K/2]``, uint8 e8m0 ``[..., K/32]``)."""
    w = _float32(w, "w")
    _check_dim(w, 1, "w", "[..., K]")
    _check_multiple(w.shape[-1], MXFP4_BLOCK, "mxfp4")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = _abs_amax(blocks, (-1,))
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1): floor(log2 amax) = exponent - 1
    shared = torch.where(amax > 0, exponent - 1 - _E2M1_EMAX, -_E8M0_BIAS).clamp(-_E8M0_BIAS, _E8M0_BIAS)
    codes = float_to_e2m1(blocks * _pow2(-shared)[..., None])  # exact power-of-two scaling
    return pack_e2m1(codes.flatten(-2)), (shared + _E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 packed ``[..., K/2]`` with uint8 e8m0 ``[..., K/32]`` -> float32 ``[..., K]``."""
    _check_dtype(packed, torch.uint8, "mxfp4 packed weight")
    _check_dtype(scale, torch.uint8, "mxfp4 scale (e8m0)")
    _check_dim(packed, 1, "mxfp4 packed weight", "[..., K/2]")
    want = (*packed.shape[:-1], packed.shape[-1] * 2 // MXFP4_BLOCK)
    if packed.shape[-1] * 2 % MXFP4_BLOCK or tuple(scale.shape) != want:
        raise MoEInputError(
            f"mxfp4 scale must be [..., K/32] = {list(want)} for packed {list(packed.shape)} "
            f"(K = 2 x last dim, a multiple of 32), got {list(scale.shape)}"
        )
    values = e2m1_to_float(unpack_e2m1(packed)).unflatten(-1, (-1, MXFP4_BLOCK))
    return (values * e8m0_to_float(scale)[..., None]).flatten(-2)


# -- nvfp4 -------------------------------------------------------------------------------------


def _nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return _dynamic_scale(amax, FP8_MAX * FP4_MAX, 5)  # 2688 = 21 * 2**7


def _nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[..., K]``, global scale aligned to ``[..., K/16]`` -> (packed, e4m3 block scales)."""
    blocks = x.unflatten(-1, (-1, NVFP4_BLOCK))
    scale = (_div(_abs_amax(blocks, (-1,)), FP4_MAX) / global_scale).clamp(max=FP8_MAX).to(FP8_DTYPE)
    divisor = (scale.float() * global_scale)[..., None]
    scaled = torch.where(divisor > 0, blocks / divisor, torch.zeros_like(blocks))
    return pack_e2m1(float_to_e2m1(scaled).flatten(-2)), scale


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nvfp4 weights: float ``[..., N, K]`` (K % 16 == 0) -> (uint8 ``[..., N, K/2]``, e4m3 ``[..., N, K/16]``, float32 ``[...]``).

    ``global_scale`` (the dequantization multiplier, shape ``[...]`` or one
    value, positive) defaults to ``amax([N, K]) / (448 * 6)`` per leading index.
    """
    w = _float32(w, "w")
    _check_dim(w, 2, "w", "[..., N, K]")
    _check_multiple(w.shape[-1], NVFP4_BLOCK, "nvfp4")
    lead = tuple(w.shape[:-2])
    if global_scale is None:
        global_scale = _nvfp4_global_scale(_abs_amax(w, (-2, -1)))
    else:
        global_scale = _scale_tensor(global_scale, "global_scale").to(w.device)
        if global_scale.numel() == 1:
            global_scale = global_scale.reshape(()).expand(lead).clone()
        elif tuple(global_scale.shape) != lead:
            raise MoEInputError(
                f"nvfp4 global_scale must be {list(lead)} or one value, got {list(global_scale.shape)}"
            )
    packed, scale = _nvfp4_quantize(w, _align(global_scale, w.dim()))
    return packed, scale, global_scale


def quantize_nvfp4_activation(
    x: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nvfp4 activations: float ``[T, K]`` -> (uint8 ``[T, K/2]``, e4m3 ``[T, K/16]``, float32 ``[]``).

    One global scale for the whole tensor: ``global_scale`` if given (static,
    shape ``[]`` or ``[1]``), else ``amax(x) / (448 * 6)`` (dynamic).
    """
    x = _float32(x, "x")
    _check_dim(x, 1, "x", "[T, K]")
    _check_multiple(x.shape[-1], NVFP4_BLOCK, "nvfp4")
    if global_scale is None:
        global_scale = _nvfp4_global_scale(_abs_amax(x, tuple(range(x.dim()))))
    else:
        global_scale = _scalar(global_scale, "nvfp4 activation global_scale").to(x.device)
    packed, scale = _nvfp4_quantize(x, global_scale)
    return packed, scale, global_scale


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., N, K/2]``, e4m3 ``[..., N, K/16]``, float32 ``[...]`` (or one value) -> float32 ``[..., N, K]``.

    ``e2m1 * float(scale) * global_scale``; for activations ``[T, K/2]`` the
    global scale is one value.
    """
    _check_dtype(packed, torch.uint8, "nvfp4 packed weight")
    _check_dtype(scale, FP8_DTYPE, "nvfp4 scale")
    _check_dim(packed, 1, "nvfp4 packed weight", "[..., K/2]")
    want = (*packed.shape[:-1], packed.shape[-1] * 2 // NVFP4_BLOCK)
    if packed.shape[-1] * 2 % NVFP4_BLOCK or tuple(scale.shape) != want:
        raise MoEInputError(
            f"nvfp4 scale must be [..., K/16] = {list(want)} for packed {list(packed.shape)} "
            f"(K = 2 x last dim, a multiple of 16), got {list(scale.shape)}"
        )
    global_scale = _scale_tensor(global_scale, "global_scale")
    if global_scale.numel() == 1:
        global_scale = global_scale.reshape(())
    elif tuple(global_scale.shape) == tuple(packed.shape[:-2]):
        global_scale = _align(global_scale, packed.dim())
    else:
        raise MoEInputError(
            f"nvfp4 global_scale must be {list(packed.shape[:-2])} or one value, "
            f"got {list(global_scale.shape)}"
        )
    values = e2m1_to_float(unpack_e2m1(packed)).unflatten(-1, (-1, NVFP4_BLOCK))
    return (values * scale.float()[..., None]).flatten(-2) * global_scale


# -- schemes -----------------------------------------------------------------------------------


def is_high_precision(t: torch.Tensor) -> bool:
    """True for a floating tensor wider than a byte (not fp8/fp4): weights still to be quantized."""
    return t.dtype.is_floating_point and t.dtype.itemsize >= 2


def _scheme(scheme: QuantScheme | str) -> QuantScheme:
    if isinstance(scheme, str):
        return QuantScheme(scheme)
    if not isinstance(scheme, QuantScheme):
        raise MoEInputError(f"scheme must be a QuantScheme or a scheme name, got {type(scheme).__name__}")
    return scheme


#: block-scaled weights larger than this many elements are quantized a few experts at a time
_CHUNK_ELEMENTS = 1 << 27


def quantize_tensor(
    w: torch.Tensor, scheme: QuantScheme | str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One weight ``[..., N, K]`` in ``scheme``'s storage: ``(w, scale, global_scale)``.

    Unquantized schemes cast to their dtype (no scales); ``global_scale`` is
    only set for nvfp4. Layouts as in the module docstring.
    """
    scheme = _scheme(scheme)
    if not isinstance(w, torch.Tensor) or not is_high_precision(w):
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise MoEInputError(f"weights to quantize must be high precision (bf16/fp16/fp32/fp64), got {got}")
    name = scheme.name
    if not scheme.is_quantized:
        return w.to(scheme.weight_dtype), None, None
    if name == "fp8":
        return (*quantize_fp8(w, scheme.weight_scale), None)
    if name in ("fp8_block", "mxfp4"):
        quantize = (
            (lambda t: quantize_fp8_block(t, scheme.block_shape)) if name == "fp8_block" else quantize_mxfp4
        )
        if w.dim() < 3 or w.numel() <= _CHUNK_ELEMENTS:
            return (*quantize(w), None)
        # blocks never cross experts: quantize a few experts at a time (bounded temporaries)
        step = max(1, _CHUNK_ELEMENTS // w[0].numel())
        parts = [quantize(w[i : i + step]) for i in range(0, w.shape[0], step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None
    return quantize_nvfp4(w)


def dequantize_tensor(
    q: torch.Tensor,
    scale: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    scheme: QuantScheme | str,
) -> torch.Tensor:
    """One stored weight of ``scheme`` -> float32 ``[..., N, K]``.

    Works on any leading slice, e.g. one expert:
    ``dequantize_tensor(w13[e], w13_scale[e], w13_global_scale[e], scheme)``
    (an fp8 per-tensor scale is then 0-d). Unquantized schemes ignore the
    scales and return ``q.float()``.
    """
    scheme = _scheme(scheme)
    if not scheme.is_quantized:
        if not is_high_precision(q):
            raise MoEInputError(f"scheme {scheme.name!r} stores float weights, got {q.dtype}")
        return q.float()
    if q.dtype != scheme.weight_dtype:
        raise MoEInputError(f"{scheme.name} weights must be stored as {scheme.weight_dtype}, got {q.dtype}")
    if scale is None:
        raise MoEInputError(f"{scheme.name} weights need their scale")
    if scheme.name == "fp8":
        return dequantize_fp8(q, scale)
    if scheme.name == "fp8_block":
        return dequantize_fp8_block(q, scale, scheme.block_shape)
    if scheme.name == "mxfp4":
        return dequantize_mxfp4(q, scale)
    if global_scale is None:
        raise MoEInputError("nvfp4 weights need their global scale")
    return dequantize_nvfp4(q, scale, global_scale)


def quantize_weights(weights: ExpertWeights, scheme: QuantScheme | str) -> ExpertWeights:
    """High-precision canonical weights -> weights stored per ``scheme``, scale fields filled.

    ``w13``/``w2`` and their ``*_scale``/``*_global_scale`` are replaced (scales
    ``None`` where the scheme has none); biases and the activation scales
    ``a13_scale``/``a2_scale`` are kept as given (static fp8 activation scales
    cannot be derived from weights).
    """
    scheme = _scheme(scheme)
    changes: dict[str, torch.Tensor | None] = {}
    for name in ("w13", "w2"):
        q, scale, global_scale = quantize_tensor(getattr(weights, name), scheme)
        changes.update({name: q, f"{name}_scale": scale, f"{name}_global_scale": global_scale})
    return dataclasses.replace(weights, **changes)


def dequantize_weights(weights: ExpertWeights, scheme: QuantScheme | str) -> ExpertWeights:
    """Weights stored per ``scheme`` -> float32 ``w13``/``w2`` (and biases), weight scales cleared.

    The activation scales ``a13_scale``/``a2_scale`` are kept as given.
    """
    scheme = _scheme(scheme)
    changes: dict[str, torch.Tensor | None] = {}
    for name in ("w13", "w2"):
        scale, global_scale = getattr(weights, f"{name}_scale"), getattr(weights, f"{name}_global_scale")
        changes[name] = dequantize_tensor(getattr(weights, name), scale, global_scale, scheme)
        changes.update({f"{name}_scale": None, f"{name}_global_scale": None})
    for name in ("b13", "b2"):
        bias = getattr(weights, name)
        changes[name] = bias.float() if bias is not None else None
    return dataclasses.replace(weights, **changes)


def fake_quantize_activation(
    x: torch.Tensor, scheme: QuantScheme | str, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize activations ``[T, K]`` per ``scheme.activation`` -> float32 ``[T, K]``.

    ``none``: ``x.float()``; ``fp8_per_token``; ``fp8_per_tensor`` (needs
    ``static_scale``); ``fp8_group`` (groups of ``scheme.block_shape[1]``);
    ``nvfp4`` (``static_scale`` is the global scale if given, else dynamic).
    """
    scheme = _scheme(scheme)
    mode = scheme.activation
    x = _float32(x, "x")
    if mode == "none":
        return x
    if mode == "fp8_per_token":
        return dequantize_fp8(*quantize_fp8_per_token(x))
    if mode == "fp8_per_tensor":
        if static_scale is None:
            raise MoEInputError(f"{scheme} needs a static activation scale (a13_scale/a2_scale)")
        return dequantize_fp8(quantize_fp8_per_tensor(x, static_scale), static_scale.to(x.device))
    if mode == "fp8_group":
        group = scheme.block_shape[1]
        return dequantize_fp8_group(*quantize_fp8_group(x, group), group)
    return dequantize_nvfp4(*quantize_nvfp4_activation(x, static_scale))
