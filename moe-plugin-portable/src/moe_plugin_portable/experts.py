"""The portable fused MoE (family ``experts``): Triton grouped GEMMs on expert-sorted tokens.

``portable.triton.fused_moe`` runs, for ``T`` tokens and ``k`` slots, either the decode
path (few tokens on mostly distinct experts, :func:`moe_plugin_portable.configs.use_decode`):

1. GEMM 1 per (entry, N block), GEMV-like (no sorting), bias and activation fused,
   into a float32 intermediate ``[T * k, I]``;
2. GEMM 2 per (token, H block) over the token's k slots in slot order, bias,
   router weight and the combine fused, written to the output (2 launches);

or the sorted path:

1. ``align_block_size`` (the sorting contract; this plugin's Triton kernel on
   a GPU) with ``block_m`` from the config for ``T``;
2. GEMM 1 with bias and activation fused in its epilogue (gate and up in one
   program), written at the sorted positions;
3. GEMM 2 with bias and router weight fused, one row per (token, slot);
4. a deterministic combine over the ``k`` slots (skipped when ``k == 1``
   without expert parallelism: GEMM 2 then writes the output directly).

No float atomics, no host synchronisation; every launch size is a function
of ``T`` alone, so the layer captures in a CUDA graph.

Quantized schemes (one kernel entry for all: the same launches with
constexpr variants of the same kernels, so one ``prepare``/``apply`` and one
config table serve every scheme):

=================  ===================  ===========================================
scheme             GEMM inputs          activation quantization
=================  ===================  ===========================================
fp8 per_token      fp8 x fp8 ``dot``    pre-pass over the T tokens; GEMM 1 writes
                                        the intermediate in the activation dtype,
                                        a pre-pass over its sorted rows quantizes it
fp8 per_tensor     fp8 x fp8 ``dot``    pre-pass over the tokens (static a13_scale);
                                        fused in GEMM 1's epilogue (static a2_scale)
fp8_block          fp8 x fp8 ``dot``,   pre-pass over the tokens (1 x bk groups);
                   scaled per K step    fused in GEMM 1's epilogue when its
                                        ``block_n`` is a multiple of bk, else a
                                        pre-pass over the sorted rows
mxfp4 W4A16        bf16 x e2m1,         none (bf16 activations only)
                   dequantized to bf16
mxfp4 W4A8         fp8 x e2m1, both     as fp8 per_tensor
                   to bf16 (exact)
=================  ===================  ===========================================

The fp8 quantization (pre-passes and GEMM 1's epilogue) rounds exactly as
``moe_core.quant`` does: same scales, same codes.

Prepared layout (``prepare``, once per layer; high-precision canonical
weights are first quantized with ``moe_core.quant``'s reference quantizers):
the canonical tensors, contiguous. The GEMMs read ``[BLOCK_K, BLOCK_N]``
tiles of ``w [E, N, K]`` rows with K contiguous, which is the K-major B
operand that fp8 wgmma and MFMA want, so no re-layout is needed: fp8
``w13 [E, 2I, H]``/``w2 [E, H, I]`` e4m3 with float32 scales ``[E, N]``
(per_channel), ``[E]`` (per_tensor) or ``[E, ceil(N/bn), ceil(K/bk)]``
(blocks); mxfp4 ``[E, N, K/2]`` bytes swizzled (:func:`swizzle_mxfp4`: each
16-byte group, one e8m0 block, as its 4 x 4 transpose; the GEMMs read
``[BLOCK_N, BLOCK_K/2]`` rows and compute transposed tiles), e8m0 scales
``[E, N, K/32]`` as given; static
activation scales ``a13_scale``/``a2_scale`` as float32 ``[1]``; biases as given
(added in float32); the expert map as an int32 device tensor.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights, QuantScheme
from moe_core import quant as mq
from moe_core.env import getenv
from moe_core.registry import dispatch_op
from moe_core.sorting import SortingRequest, align_block_size, max_padded_len

from ._common import PRIORITY, interpreting, triton_refusal
from ._launch import run_launch
from .configs import DecodeConfig, GemmConfig, MoEConfig, gemm2_split, lookup_config, lookup_decode

__all__ = [
    "QUANT_SCHEMES",
    "QUANT_VARIANTS",
    "Launch",
    "SortedBlocks",
    "combine_launch",
    "decode_launches",
    "fused_moe",
    "fused_moe_launches",
    "gemm1_launch",
    "gemm2_launch",
    "kernel_entries",
    "launch_combine",
    "launch_gemm1",
    "launch_gemm2",
    "quantize_launch",
    "sort_tokens",
]

_ACTIVATIONS = ("silu", "gelu", "swiglu_oai", "relu2")
#: quant schemes of ``portable.triton.fused_moe``
QUANT_SCHEMES = ("bf16", "fp16", "fp8", "fp8_block", "mxfp4")
#: named quantized variants, for tools (``profile --quant``, ``benchmarks/run_portable.py --quant``)
QUANT_VARIANTS: dict[str, QuantScheme] = {
    "fp8": QuantScheme("fp8"),  # per-channel weights, dynamic per-token activations
    "fp8_tensor": QuantScheme("fp8", weight_scale="per_tensor", activation="fp8_per_tensor"),
    "fp8_block": QuantScheme("fp8_block"),  # 128x128 weight blocks, 1x128 activation groups
    "mxfp4": QuantScheme("mxfp4"),  # W4A16
    "mxfp4_w4a8": QuantScheme("mxfp4", activation="fp8_per_tensor"),
}
_COMBINE_BLOCK = 1024
_QUANT_BLOCK = 1024  # columns per program (or per loop step) of the quantization pre-pass
#: rows up to this many columns are quantized per token from one load (8 warps at 8192: 32 values
#: a thread); a row of 7168 looped over 1024 columns twice took 5.8 us at T=1 on the H100, against
#: 2.4 us for fp8_block's one load per group (benchmarks/results/h100-decode-stages-2026-12-07.md)
_ROW_BLOCK = 8192
_FP8 = torch.float8_e4m3fn
#: AMD architectures whose Triton backend has the OCP e4m3 (``float8e4nv``) dot
_FP8_AMD = ("gfx942", "gfx950", "gfx1200", "gfx1201")

#: One kernel launch, described without running it: ``(kernel, grid, args, kwargs)``;
#: ``kernel[grid](*args, **kwargs)`` runs it (``moe_plugin_portable.profile`` compiles it offline).
Launch = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]


_KERNELS: list[Any] = []


def _kernels() -> Any:
    """The kernel module (imported on first use: importing Triton decides interpreted or compiled)."""
    if not _KERNELS:
        from ._details import _fused_moe

        _KERNELS.append(_fused_moe)
    return _KERNELS[0]


@functools.cache
def _mma_kernels() -> Any:
    """The Gluon tensor-core decode kernels (``_details/_decode_mma.py``), imported on first use;
    ``None`` where this Triton has no Gluon (or not the parts they use)."""
    try:
        from ._details import _decode_mma
    except (ImportError, AttributeError):
        return None
    return _decode_mma


def _mma_capable(device: torch.device) -> bool:
    """Whether ``device`` runs the Gluon decode kernels: compiled (not interpreted) on NVIDIA sm_80+."""
    return (
        device.type == "cuda"
        and torch.version.hip is None
        and not interpreting()
        and _capability(device) >= (8, 0)
    )


def _mma_fits(spec: MoESpec, cfg: GemmConfig, kw: dict[str, Any]) -> bool:
    """Whether a decode launch of ``cfg`` (its constexprs ``kw``) is one the tensor-core kernels
    take: ``cfg.mma``; bf16/fp16 weights and activations, fp8 weights with pre-quantized
    activations, mxfp4 weights with bf16 or pre-quantized activations; ``block_n`` a multiple of
    ``16 * num_warps``, ``block_k`` of the operand's 4 chunks per row: 64 for fp8 (16 codes per
    thread and chunk), 128 for mxfp4 (16 bytes), 32 for bf16/fp16 (8 elements)."""
    if not cfg.mma or spec.dtype not in (torch.bfloat16, torch.float16):
        return False
    b_quant, a_quant, pre = kw["B_QUANT"], kw["A_QUANT"], kw["A_PRE"]
    fp8 = b_quant in (1, 2, 3)
    if not ((b_quant == 0 and a_quant == 0) or (fp8 and pre) or (b_quant == 4 and (a_quant == 0 or pre))):
        return False
    step = 64 if fp8 else (128 if b_quant == 4 else 32)
    return kw["BLOCK_N"] % (16 * kw["num_warps"]) == 0 and kw["BLOCK_K"] % step == 0


def _supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    reason = triton_refusal(device)
    if reason:
        return reason
    scheme = spec.quant
    if not scheme.is_quantized:
        if scheme.weight_dtype != spec.dtype:
            return f"weights ({scheme.name}) and activations ({spec.dtype}) must share a dtype"
        return None
    if spec.dtype not in (torch.bfloat16, torch.float16):
        return f"{scheme.name} weights need bf16 or fp16 activations, got {spec.dtype}"
    if scheme.name in ("fp8", "fp8_block"):
        if device.vendor == "nvidia" and device.capability is not None and device.capability < (8, 9):
            return f"fp8 e4m3 dot needs sm_89 or newer (Triton), got {device.arch}"
        if device.vendor == "amd" and device.arch not in _FP8_AMD:
            return f"fp8 e4m3 dot needs one of {', '.join(_FP8_AMD)} (Triton), got {device.arch}"
    if scheme.name == "fp8_block":
        bk = scheme.block_shape[1]
        if bk < 32 or bk & (bk - 1):
            return (
                f"fp8_block needs a power-of-two block K >= 32 (K steps divide it), got {scheme.block_shape}"
            )
    if scheme.name == "mxfp4" and scheme.activation == "none" and spec.dtype != torch.bfloat16:
        return "mxfp4 W4A16 needs bf16 activations (its weights dequantize to bf16, exactly)"
    return None


def swizzle_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """mxfp4 bytes ``[..., K/2]`` (``K/2`` a multiple of 16) with every 16-byte group (the 32
    elements of one e8m0 scale) stored as its 4 x 4 transpose: byte ``4q + i`` of a group holds
    canonical byte ``4i + q``. Its own inverse. A new contiguous tensor.

    A thread of NVIDIA's MMA operand layouts (``mma.sync``, wgmma's register A) holds canonical
    bytes ``q, q + 4, q + 8, q + 12`` of each group: after the swizzle one 32-bit word, which the
    GEMMs load as such instead of byte by byte."""
    if w.shape[-1] % 16:
        raise ValueError(f"mxfp4 rows of {w.shape[-1]} bytes are not whole 16-byte groups")
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 16, 4, 4)
    return groups.transpose(-1, -2).contiguous().reshape(w.shape)


def _prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> dict[str, torch.Tensor]:
    """The kernels' layout (module docstring); high-precision weights of a quantized spec are quantized."""
    if spec.quant.is_quantized and mq.is_high_precision(weights.w13):
        weights = mq.quantize_weights(weights, spec.quant)
    tensors = {name: t.contiguous() for name, t in weights.tensors().items()}
    for name in ("a13_scale", "a2_scale"):
        if name in tensors:
            tensors[name] = tensors[name].reshape(1).float()
    for name in ("w13_scale", "w2_scale"):
        if name in tensors and spec.quant.name in ("fp8", "fp8_block"):
            tensors[name] = tensors[name].float().contiguous()
    if spec.quant.name == "mxfp4":
        tensors["w13"], tensors["w2"] = swizzle_mxfp4(tensors["w13"]), swizzle_mxfp4(tensors["w2"])
    emap = spec.expert_map_tensor(weights.device)
    if emap is not None:
        tensors["expert_map"] = emap
    return tensors


class SortedBlocks(NamedTuple):
    """``align_block_size`` output for one ``block_m``."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int


def sort_tokens(
    spec: MoESpec, topk_ids: torch.Tensor, tensors: dict[str, torch.Tensor], block_m: int
) -> SortedBlocks:
    """Group the (token, slot) entries by local expert in blocks of ``block_m``.

    ``topk_ids`` as ``moe_apply`` checked them (int32/int64 ``[T, k]``, ``T > 0``) and the
    prepared expert map: the best ``align_block_size`` kernel is dispatched directly, without
    ``moe_core.sorting``'s re-validation (host time); anything else goes through it.
    """
    emap = tensors.get("expert_map")
    kwargs = {"num_experts": spec.num_experts, "block_size": block_m, "expert_map": emap}
    n = topk_ids.numel()
    impl = None
    if n and topk_ids.dim() == 2 and max_padded_len(n, spec.num_experts, block_m) < 2**31:
        request = SortingRequest(
            "align_block_size", spec.num_experts, topk_ids.shape[1], block_m, topk_ids.dtype, emap is not None
        )
        impl = dispatch_op("sorting", "align_block_size", topk_ids.device, request)
    sorted_ids, expert_ids, num_padded = (impl or align_block_size)(topk_ids, **kwargs)
    return SortedBlocks(sorted_ids, expert_ids, num_padded, block_m)


def _a_quant(spec: MoESpec, a: torch.Tensor) -> int:
    """``A_QUANT`` of a GEMM whose input is ``a`` (fp8: quantized per the scheme's activation mode)."""
    return _kernels().A_QUANTS[spec.quant.activation] if a.dtype == _FP8 else 0


def _b_quant(spec: MoESpec) -> int:
    B_QUANTS = _kernels().B_QUANTS
    scheme = spec.quant
    if scheme.name == "fp8":
        return B_QUANTS["fp8_channel" if scheme.weight_scale == "per_channel" else "fp8_tensor"]
    return B_QUANTS.get(scheme.name, 0)


def _groups(spec: MoESpec) -> tuple[int, int]:
    """``(GROUP_N, GROUP_K)``: fp8_block's weight block (its K is also the activation group), else 1s."""
    return tuple(spec.quant.block_shape) if spec.quant.name == "fp8_block" else (1, 1)


def _scale_strides(scale: torch.Tensor | None) -> tuple[int, int]:
    """Strides of a weight scale along (expert, row): ``[E]``, ``[E, N]``, ``[E, nb, kb]``."""
    if scale is None:
        return 0, 0
    return scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0


#: Without a tuned choice, mxfp4 tiles of at most this many rows go through ``tl.dot_scaled`` and
#: taller ones through the explicit dequantization. 0: always the dequantization (H200, triton 3.6,
#: transposed tiles: the tuner kept it in 19 of 20 GEMMs of gpt-oss-120b and deepseek-v3-tp8 W4A16
#: at T = 1..2048, and dot_scaled was slower in every A/B case).
MX_DOT_MAX_BLOCK_M = 0


def _mx_dot(spec: MoESpec, interpret: bool | None, block_m: int, tuned: bool | None = None) -> bool:
    """mxfp4 through ``tl.dot_scaled`` in compiled kernels: ``MOE_PORTABLE_MXFP4=dot_scaled`` /
    ``dequant`` forces one way; ``auto`` (the default) takes the tuned config's ``mx_dot``
    (``tuned``) where it is set, else the row rule (tiles of up to :data:`MX_DOT_MAX_BLOCK_M`
    rows). The interpreter always dequantizes: its ``dot_scaled`` rounds the bf16 operand
    through fp16."""
    if spec.quant.name != "mxfp4" or (interpreting() if interpret is None else interpret):
        return False
    mode = getenv("MOE_PORTABLE_MXFP4", "auto")
    if mode not in ("auto", "dot_scaled", "dequant"):
        raise ValueError(f"MOE_PORTABLE_MXFP4 must be auto, dot_scaled or dequant, got {mode!r}")
    if mode != "auto":
        return mode == "dot_scaled"
    return tuned if tuned is not None else block_m <= MX_DOT_MAX_BLOCK_M


def _mx_ptx(
    spec: MoESpec, device: torch.device, interpret: bool | None, *, nvidia: bool | None = None
) -> bool:
    """mxfp4 tiles dequantized by PTX (``MXFP4_TO_BF16_PTX``): compiled kernels on NVIDIA sm_80
    and newer (``nvidia``: whether ``device`` is one; default: asked of it);
    ``MOE_PORTABLE_MX_PTX=0`` keeps the portable Triton dequantization."""
    if spec.quant.name != "mxfp4" or (interpreting() if interpret is None else interpret):
        return False
    if getenv("MOE_PORTABLE_MX_PTX", "1") == "0":
        return False
    if nvidia is None:
        nvidia = device.type == "cuda" and torch.version.hip is None and _capability(device) >= (8, 0)
    return nvidia


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _block_k(spec: MoESpec, cfg: GemmConfig) -> int:
    """The K step: the config's, but a divisor of fp8_block's K block and a multiple of 32 for mxfp4."""
    bk = cfg.block_k
    if spec.quant.name == "fp8_block":
        bk = min(bk, spec.quant.block_shape[1])
    elif spec.quant.name == "mxfp4":
        bk = max(bk, 32)
    return bk


def launch_gemm1(
    spec: MoESpec,
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    inter_buf: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    inter_scale: torch.Tensor | None = None,
) -> None:
    """``inter_buf[p] = act(x[token(p)] @ w13[e].T + b13[e])`` at every valid sorted position ``p``."""
    _run(
        gemm1_launch(
            spec, x, tensors, blocks, topk_weights, cfg, inter_buf, x_scale=x_scale, inter_scale=inter_scale
        )
    )


def gemm1_launch(
    spec: MoESpec,
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    inter_buf: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    inter_scale: torch.Tensor | None = None,
    interpret: bool | None = None,
) -> Launch:
    """The launch of :func:`launch_gemm1` (``interpret``: for the interpreter; default: as now).

    Quantized: ``x`` fp8 with its scales ``x_scale`` (``[T]`` per token, ``[T, groups]``, or
    the static ``a13_scale``); an fp8 ``inter_buf`` is quantized in the epilogue, with the
    static ``a2_scale`` or into the group scales ``inter_scale [rows, cdiv(I, bk)]``.
    """
    kernels = _kernels()

    H, inter = spec.hidden_size, spec.intermediate_size
    w13, b13 = tensors["w13"], tensors.get("b13")
    w_scale = tensors.get("w13_scale")
    a_quant = _a_quant(spec, x)
    out_quant = 0
    out_scale = inter_scale
    if inter_buf.dtype == _FP8:
        out_quant = kernels.OUT_QUANTS["fp8_group" if spec.quant.activation == "fp8_group" else "fp8_tensor"]
        if out_quant == kernels.OUT_QUANTS["fp8_tensor"]:
            out_scale = tensors["a2_scale"]
    group_n, group_k = _groups(spec)
    block_k = _block_k(spec, cfg)
    grid = (blocks.expert_ids.numel() * triton_cdiv(inter, cfg.block_n),)
    args = (
        x,
        w13,
        b13 if b13 is not None else w13,
        inter_buf,
        blocks.sorted_ids,
        blocks.expert_ids,
        blocks.num_padded,
        topk_weights,
        x_scale if x_scale is not None else topk_weights,
        w_scale if w_scale is not None else topk_weights,
        out_scale if out_scale is not None else topk_weights,
        x.shape[0] * spec.top_k,
        H,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        b13.stride(0) if b13 is not None else 0,
        inter_buf.stride(0),
        x_scale.stride(0) if x_scale is not None and x_scale.dim() > 1 else 1,
        *_scale_strides(w_scale),
        inter_scale.stride(0) if inter_scale is not None else 0,
        float(spec.swiglu_alpha or 0.0),
        float(spec.swiglu_limit or 0.0),
    )
    kwargs = dict(
        TOP_K=spec.top_k,
        GATED=spec.is_gated,
        ACTIVATION=kernels.ACTIVATIONS[spec.activation],
        HAS_BIAS=b13 is not None,
        # a quantized input had the weight applied before its quantization (the reference's order)
        WEIGHT_ON_INPUT=spec.apply_router_weight_on_input and not a_quant,
        A_QUANT=a_quant,
        B_QUANT=_b_quant(spec),
        OUT_QUANT=out_quant,
        GROUP_N=group_n,
        GROUP_K=group_k,
        BLOCK_M=blocks.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=H % block_k == 0,
        # the interpreter multiplies bf16 as integers
        UPCAST=interpreting() if interpret is None else interpret,
        MX_DOT=_mx_dot(spec, interpret, blocks.block_m, cfg.mx_dot),
        MX_PTX=_mx_ptx(spec, x.device, interpret),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return kernels.moe_gemm1, grid, args, kwargs


def launch_gemm2(
    spec: MoESpec,
    inter_buf: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    y: torch.Tensor,
    row_is_token: bool,
    *,
    inter_scale: torch.Tensor | None = None,
) -> None:
    """``y[entry(p)] = w(p) * (inter_buf[p] @ w2[e].T + b2[e])`` (row ``token`` when ``row_is_token``)."""
    _run(
        gemm2_launch(
            spec, inter_buf, tensors, blocks, topk_weights, cfg, y, row_is_token, inter_scale=inter_scale
        )
    )


def gemm2_launch(
    spec: MoESpec,
    inter_buf: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    y: torch.Tensor,
    row_is_token: bool,
    *,
    inter_scale: torch.Tensor | None = None,
    interpret: bool | None = None,
) -> Launch:
    """The launch of :func:`launch_gemm2` (``interpret``: for the interpreter; default: as now).

    Quantized: ``inter_buf`` fp8 with ``inter_scale`` per sorted row ``[rows]``, per group
    ``[rows, groups]`` or the static ``a2_scale`` (the default for a static scheme).
    """
    kernels = _kernels()

    H, inter = spec.hidden_size, spec.intermediate_size
    w2, b2 = tensors["w2"], tensors.get("b2")
    w_scale = tensors.get("w2_scale")
    a_quant = _a_quant(spec, inter_buf)
    if inter_scale is None and a_quant == kernels.A_QUANTS["fp8_per_tensor"]:
        inter_scale = tensors["a2_scale"]
    group_n, group_k = _groups(spec)
    block_k = _block_k(spec, cfg)
    grid = (blocks.expert_ids.numel() * triton_cdiv(H, cfg.block_n),)
    args = (
        inter_buf,
        w2,
        b2 if b2 is not None else w2,
        y,
        blocks.sorted_ids,
        blocks.expert_ids,
        blocks.num_padded,
        topk_weights,
        inter_scale if inter_scale is not None else topk_weights,
        w_scale if w_scale is not None else topk_weights,
        topk_weights.numel(),
        inter,
        H,
        inter_buf.stride(0),
        w2.stride(0),
        w2.stride(1),
        b2.stride(0) if b2 is not None else 0,
        y.stride(0),
        inter_scale.stride(0) if inter_scale is not None and inter_scale.dim() > 1 else 1,
        *_scale_strides(w_scale),
    )
    kwargs = dict(
        TOP_K=spec.top_k,
        HAS_BIAS=b2 is not None,
        APPLY_WEIGHT=not spec.apply_router_weight_on_input,
        ROW_IS_TOKEN=row_is_token,
        A_QUANT=a_quant,
        B_QUANT=_b_quant(spec),
        GROUP_N=group_n,
        GROUP_K=group_k,
        BLOCK_M=blocks.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=inter % block_k == 0,
        UPCAST=interpreting() if interpret is None else interpret,
        MX_DOT=_mx_dot(spec, interpret, blocks.block_m, cfg.mx_dot),
        MX_PTX=_mx_ptx(spec, inter_buf.device, interpret),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return kernels.moe_gemm2, grid, args, kwargs


def quantize_launch(
    spec: MoESpec,
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    blocks: SortedBlocks | None = None,
    num_entries: int = 0,
    topk_weights: torch.Tensor | None = None,
    static_scale: torch.Tensor | None = None,
) -> Launch:
    """The fp8 quantization pre-pass ``q, scale = quantize(x)`` per the scheme's activation mode.

    Rows of ``x``: the tokens, or (``blocks`` given) the sorted positions of the intermediate,
    where padding and rows past ``num_padded`` are skipped. ``scale``: ``[rows]`` per row,
    ``[rows, groups]`` per group; the static mode reads ``static_scale`` instead.
    ``topk_weights`` (top-1 weights on the input): rows are scaled by them first.
    """
    kernels = _kernels()

    mode = kernels.A_QUANTS[spec.quant.activation]
    rows, K = x.shape
    one_pass, warps = False, 4
    if mode == kernels.A_QUANTS["fp8_per_token"]:
        one_pass = _next_pow2(K) <= _ROW_BLOCK
        block, grid = (_next_pow2(K) if one_pass else _QUANT_BLOCK), (rows, 1)
        warps = max(4, block // 1024)
    elif mode == kernels.A_QUANTS["fp8_group"]:
        block = spec.quant.block_shape[1]
        grid = (rows, triton_cdiv(K, block))
    else:
        block = min(_QUANT_BLOCK, _next_pow2(K))
        grid = (rows, triton_cdiv(K, block))
    sorted_ids = blocks.sorted_ids if blocks is not None else x
    args = (
        x,
        q,
        scale if scale is not None else x,
        static_scale if static_scale is not None else x,
        sorted_ids,
        blocks.num_padded if blocks is not None else x,
        topk_weights if topk_weights is not None else x,
        num_entries,
        K,
        x.stride(0),
        q.stride(0),
        scale.stride(0) if scale is not None else 0,
    )
    kwargs = dict(
        MODE=mode, SORTED=blocks is not None, WEIGHT=topk_weights is not None, BLOCK=block, num_warps=warps
    )
    if one_pass:  # (absent otherwise: the other modes' compiled variants stay as they were)
        kwargs["ONE_PASS"] = True
    return kernels.moe_quant_fp8, grid, args, kwargs


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _scale_buffer(spec: MoESpec, rows: int, K: int, device: torch.device) -> torch.Tensor | None:
    """Dynamic activation scales of ``rows x K``: ``[rows]`` per token, ``[rows, groups]``; static: none."""
    mode = spec.quant.activation
    if mode == "fp8_per_token":
        return torch.empty(rows, dtype=torch.float32, device=device)
    if mode == "fp8_group":
        return torch.empty(
            rows, triton_cdiv(K, spec.quant.block_shape[1]), dtype=torch.float32, device=device
        )
    return None


def launch_combine(
    spec: MoESpec,
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    out: torch.Tensor,
) -> None:
    """``out[t] = sum of y[t * k + j]`` over the slots ``j`` whose expert is local."""
    _run(combine_launch(spec, y, topk_ids, tensors, out))


def combine_launch(
    spec: MoESpec,
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    out: torch.Tensor,
) -> Launch:
    """The launch of :func:`launch_combine`."""
    kernels = _kernels()

    T, H = out.shape
    emap = tensors.get("expert_map")
    block = min(_COMBINE_BLOCK, max(128, 1 << (H - 1).bit_length()))
    args = (y, out, topk_ids, emap if emap is not None else topk_ids, H, spec.num_experts)
    kwargs = dict(TOP_K=spec.top_k, HAS_MAP=emap is not None, BLOCK_N=block, num_warps=4)
    return kernels.moe_combine, (T, triton_cdiv(H, block)), args, kwargs


def _run(launch: Launch) -> None:
    run_launch(*launch)


def decode_launches(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    cfg: DecodeConfig,
    *,
    warp_size: int | None = None,
    mma: bool | None = None,
    prefetch: bool | None = None,
) -> list[Launch]:
    """The decode path's launches into ``out [T, H]`` (allocates the intermediate, runs nothing):
    GEMM 1 and GEMM 2, each after its input's quantization pre-pass where its config says
    ``prequant`` and the activations are fp8. ``warp_size``: the target's lanes per warp (default:
    the device's; 64 on AMD), which decides how pre-quantized codes are read (:func:`_a_pre`).
    ``mma``: whether the target runs the tensor-core kernels (default: :func:`_mma_capable`),
    which then take the GEMMs whose config says ``mma`` and fits them (:func:`_mma_fits`).
    ``cfg.chain``: both GEMMs in one launch (``moe_decode_chain``) where neither is pre-quantized
    nor on the tensor-core kernels (else the two launches), its GEMM 2 programs prefetching their
    weights toward L2 with ``cfg.prefetch`` where the target can (``prefetch``, default: NVIDIA,
    compiled).

    ``topk_weights``/``topk_ids`` contiguous ``[T, k]``. Every scheme of :data:`QUANT_SCHEMES`:
    activations are quantized inside the GEMMs (per token over the whole row, static, or per
    K step of fp8_block's group, which is then the K step) unless pre-quantized; the
    intermediate stays float32.
    """
    T, H = hidden_states.shape
    inter_size, k = spec.intermediate_size, spec.top_k
    w13, b13, w2, b2 = tensors["w13"], tensors.get("b13"), tensors["w2"], tensors.get("b2")
    ws13, ws2 = tensors.get("w13_scale"), tensors.get("w2_scale")
    emap = tensors.get("expert_map")
    if warp_size is None:
        warp_size = 64 if torch.version.hip and hidden_states.device.type == "cuda" else 32
    if (cfg.gemm1.mma or cfg.gemm2.mma) and mma is None:
        mma = _mma_capable(hidden_states.device)
    kernel1, kw1, kernel2, kw2 = _decode_kwargs(
        spec, cfg, b13 is not None, emap is not None, warp_size, bool(mma) and _mma_kernels() is not None
    )
    dummy = topk_weights
    ids_or_map = emap if emap is not None else topk_ids
    device = hidden_states.device
    inter = torch.empty(T * k, inter_size, dtype=torch.float32, device=device)
    pre1 = pre2 = None
    x, a1_scale, a1_stride = hidden_states, tensors.get("a13_scale", dummy), 0
    a2_in, a2_scale, a2_stride = inter, tensors.get("a2_scale", dummy), 0
    if kw1.get("A_PRE"):
        x, pre1, a1_scale, a1_stride = _prequant(spec, hidden_states, tensors.get("a13_scale"), topk_weights)
    if kw2.get("A_PRE"):
        a2_in, pre2, a2_scale, a2_stride = _prequant(spec, inter, tensors.get("a2_scale"), None)
    tiles1, tiles2 = triton_cdiv(inter_size, cfg.gemm1.block_n), triton_cdiv(H, cfg.gemm2.block_n)
    split1, split2 = kw1["SPLIT"], kw2["SLOT_GROUPS"] * kw2["K_SPLITS"]
    # partials and counters only where split (else any tensor: never read)
    part1 = (
        torch.empty(split1, T * k, 2 * inter_size, dtype=torch.float32, device=device)
        if split1 > 1
        else inter
    )
    part2 = torch.empty(split2, T, H, dtype=torch.float32, device=device) if split2 > 1 else inter
    off2 = -(-T * k * tiles1 // 32) * 32 if split1 > 1 else 0  # 128-byte aligned
    counts = inter  # never read unless split (or chained): no stream lookup on the plain path
    n_split = off2 + (T * tiles2 if split2 > 1 else 0)
    chain_at = -(-n_split // 32) * 32  # the chained launch's ticket and ready counters
    if split1 > 1 or split2 > 1 or cfg.chain:
        counts = _split_counters(device, chain_at + 32 + T * k if cfg.chain else n_split)
    gemm1 = (
        kernel1,
        (T * k, tiles1, split1),
        (
            x,
            w13,
            b13 if b13 is not None else w13,
            inter,
            topk_ids,
            ids_or_map,
            topk_weights,
            ws13 if ws13 is not None else dummy,
            a1_scale,
            part1,
            counts,
            spec.num_experts,
            H,
            inter_size,
            x.stride(0),
            w13.stride(0),
            w13.stride(1),
            b13.stride(0) if b13 is not None else 0,
            inter.stride(0),
            *_scale_strides(ws13),
            part1.stride(0),
            a1_stride,
            float(spec.swiglu_alpha or 0.0),
            float(spec.swiglu_limit or 0.0),
        ),
        kw1,
    )
    gemm2 = (
        kernel2,
        (T, tiles2, split2),
        (
            a2_in,
            w2,
            b2 if b2 is not None else w2,
            out,
            topk_ids,
            ids_or_map,
            topk_weights,
            ws2 if ws2 is not None else dummy,
            a2_scale,
            part2,
            counts[off2:] if off2 else counts,
            spec.num_experts,
            inter_size,
            H,
            a2_in.stride(0),
            w2.stride(0),
            w2.stride(1),
            b2.stride(0) if b2 is not None else 0,
            out.stride(0),
            *_scale_strides(ws2),
            part2.stride(0),
            a2_stride,
        ),
        kw2,
    )
    if cfg.chain and pre1 is None and pre2 is None and _is_gemv(kernel1, kernel2):
        sync, ready = counts[chain_at : chain_at + 2], counts[chain_at + 32 : chain_at + 32 + T * k]
        return [_chain_launch(gemm1, gemm2, T, sync, ready, device, prefetch if cfg.prefetch else False)]
    return [launch for launch in (pre1, gemm1, pre2, gemm2) if launch is not None]


def _is_gemv(*kernels: Any) -> bool:
    """Whether every kernel is one of the Triton decode GEMVs (not the tensor-core ones)."""
    return all(kernel.__name__ in ("moe_decode_gemm1", "moe_decode_gemm2") for kernel in kernels)


#: GEMM 2's constexprs in ``moe_decode_chain``'s names (the rest are GEMM 1's, shared or not)
_CHAIN_KW2 = {"BLOCK_N": "BLOCK_N2", "BLOCK_K": "BLOCK_K2", "ROW_BLOCK": "ROW_BLOCK2", "A_PRE": "A_PRE2"}
_CHAIN_OWN2 = ("APPLY_WEIGHT", "SLOT_GROUPS", "K_SPLITS")
#: positions of GEMM 2's arguments that ``moe_decode_chain`` takes from GEMM 1's (the intermediate,
#: the routing, the expert count, ``K = I``, the intermediate's row stride)
_CHAIN_SHARED2 = frozenset({0, 4, 5, 6, 11, 12, 14})


def _chain_launch(
    gemm1: Launch,
    gemm2: Launch,
    T: int,
    sync: torch.Tensor,
    ready: torch.Tensor,
    device: torch.device,
    prefetch: bool | None,
) -> Launch:
    """The two decode GEMV launches as one ``moe_decode_chain`` launch: GEMM 1's programs, then
    GEMM 2's, in a 1-D grid, with its ticket counters ``sync [2]`` and ``ready [T * k]`` (0 between
    launches); the larger of the two configs' warps and stages."""
    (_, grid1, args1, kw1), (_, grid2, args2, kw2) = gemm1, gemm2
    if prefetch is None:
        prefetch = device.type == "cuda" and torch.version.hip is None and not interpreting()
    kw = {key: value for key, value in kw1.items() if key not in ("num_warps", "num_stages")}
    kw.update({_CHAIN_KW2[key]: kw2[key] for key in _CHAIN_KW2})
    kw.update({key: kw2[key] for key in _CHAIN_OWN2})
    kw.update(
        PREFETCH=bool(prefetch),
        num_warps=max(kw1["num_warps"], kw2["num_warps"]),
        num_stages=max(kw1["num_stages"], kw2["num_stages"]),
    )
    programs = grid1[0] * grid1[1] * grid1[2] + grid2[0] * grid2[1] * grid2[2]
    own2 = [a for i, a in enumerate(args2) if i not in _CHAIN_SHARED2]
    args = (*args1, *own2, sync, ready, T, grid1[1], grid2[1])
    return _kernels().moe_decode_chain, (programs, 1, 1), args, kw


def _prequant(
    spec: MoESpec, rows: torch.Tensor, static: torch.Tensor | None, topk_weights: torch.Tensor | None
) -> tuple[torch.Tensor, Launch, torch.Tensor, int]:
    """A decode GEMM's input pre-pass: ``(fp8 rows, its launch, the scales to read, their row
    stride)``; ``topk_weights``: GEMM 1's input with the router weight on the input (top-1)."""
    n, K = rows.shape
    q = torch.empty(n, K, dtype=_FP8, device=rows.device)
    scale = _scale_buffer(spec, n, K, rows.device)
    on_input = topk_weights if topk_weights is not None and spec.apply_router_weight_on_input else None
    launch = quantize_launch(spec, rows, q, scale, topk_weights=on_input, static_scale=static)
    if scale is None:  # static: the kernels read the one scale
        assert static is not None
        return q, launch, static, 0
    return q, launch, scale, scale.stride(0)


#: (device, stream) -> int32 counters of the split decode launches, all 0 between launches
_COUNTERS: dict[tuple[Any, ...], torch.Tensor] = {}
#: every counter buffer ever handed out: a CUDA graph that captured one keeps using it
_KEEP: list[torch.Tensor] = []
_MIN_COUNTERS = 1 << 18


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zero int32 counters for the split decode launches on the current stream.

    Each launch leaves them at 0 (the last program of a tile resets its counter), so one
    buffer per stream serves every launch in stream order, and launches on different streams
    (which may run concurrently) get different buffers. A CUDA graph replays on the buffer of
    the stream it was captured on: graphs captured on one stream must not be replayed
    concurrently. A buffer too small is replaced by a bigger zero one (at least 256 Ki
    counters: 1 MiB; the old one is kept, captured graphs may hold it)."""
    if device.type == "cuda":
        key: tuple[Any, ...] = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
        _KEEP.append(buf)
    return buf


def _decode_block_k(spec: MoESpec, cfg: GemmConfig) -> int:
    """A decode launch's K step: fp8_block's K block (one activation group and one weight scale
    per step), 32 to 512 for mxfp4 (at most 256 with fp8 activations: 512 spilled on sm90), else
    the config's."""
    if spec.quant.name == "fp8_block":
        return spec.quant.block_shape[1]
    if spec.quant.name == "mxfp4":
        return min(max(cfg.block_k, 32), 256 if spec.quant.activation != "none" else 512)
    return cfg.block_k


def _row_block(k: int) -> int:
    """The decode kernels' step for a per-token amax over a row of ``k``: ``k`` rounded up to a
    power of two, at most 4096 (a wider step raised sm90 GEMM 1's registers from 64 to 95): one or
    two load latencies for the benchmark shapes, not ``k / BLOCK_K``."""
    return min(4096, 1 << max(0, k - 1).bit_length())


#: weights per lane of a decode tile up to which pre-quantized activations are read in the
#: tile's layout (``A_PRE`` 2). Static loops, deepseek-v3-tp8: on sm_90, 8 and 16 per lane are
#: 3-21% shorter and 32 per lane 12% longer (fp8 per-token GEMM 2); on gfx950, 8 and 16 per lane
#: (64-lane waves) are equal or 21-48% shorter.
_A_TILE_MAX = 16


def _a_pre(spec: MoESpec, cfg: GemmConfig, block_k: int, a_quant: int, warp_size: int) -> int:
    """A decode launch's ``A_PRE``: 0 (quantized in the kernel, or bf16 activations), 1 (read
    pre-quantized), 2 (read pre-quantized in the weight tile's layout: few weights per lane)."""
    if not (cfg.prequant and a_quant):
        return 0
    lanes = warp_size * cfg.num_warps
    tile = spec.quant.name != "mxfp4" and cfg.block_n * block_k <= _A_TILE_MAX * lanes
    return 2 if tile else 1


@functools.lru_cache(maxsize=1024)
def _decode_kwargs(
    spec: MoESpec, cfg: DecodeConfig, has_bias: bool, has_map: bool, warp_size: int = 32, mma: bool = False
) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """The decode launches' kernels, constexprs and options: ``(GEMM 1's kernel, its keyword
    arguments, GEMM 2's, its)`` (shared dicts: callers must not modify them); ``mma``: the
    target runs the tensor-core kernels, which take the GEMMs that :func:`_mma_fits`."""
    kernels = _kernels()
    common = dict(
        HAS_BIAS=has_bias,
        HAS_MAP=has_map,
        A_QUANT=kernels.A_QUANTS[spec.quant.activation],
        B_QUANT=_b_quant(spec),
        GROUP_N=_groups(spec)[0],
    )
    g1, g2 = cfg.gemm1, cfg.gemm2
    block_k1 = _decode_block_k(spec, g1)
    kw1 = dict(
        TOP_K=spec.top_k,
        GATED=spec.is_gated,
        ACTIVATION=kernels.ACTIVATIONS[spec.activation],
        **common,
        WEIGHT_ON_INPUT=spec.apply_router_weight_on_input,
        BLOCK_N=g1.block_n,
        BLOCK_K=block_k1,
        ROW_BLOCK=_row_block(spec.hidden_size),
        SPLIT=max(1, min(g1.split, triton_cdiv(spec.hidden_size, block_k1))),
        A_PRE=_a_pre(spec, g1, block_k1, common["A_QUANT"], warp_size),
        num_warps=g1.num_warps,
        num_stages=g1.num_stages,
    )
    kw2 = dict(
        TOP_K=spec.top_k,
        **common,
        APPLY_WEIGHT=not spec.apply_router_weight_on_input,
        BLOCK_N=g2.block_n,
        BLOCK_K=_decode_block_k(spec, g2),
        ROW_BLOCK=_row_block(spec.intermediate_size),
        **dict(zip(("SLOT_GROUPS", "K_SPLITS"), gemm2_split(g2.split, spec.top_k))),
        A_PRE=_a_pre(spec, g2, _decode_block_k(spec, g2), common["A_QUANT"], warp_size),
        num_warps=g2.num_warps,
        num_stages=g2.num_stages,
    )
    kernel1, kernel2 = kernels.moe_decode_gemm1, kernels.moe_decode_gemm2
    if mma and _mma_fits(spec, g1, kw1):
        kernel1 = _mma_kernels().moe_decode_mma_gemm1
        kw1["EVEN_K"] = spec.hidden_size % kw1["BLOCK_K"] == 0
    if mma and _mma_fits(spec, g2, kw2):
        kernel2 = _mma_kernels().moe_decode_mma_gemm2
        kw2["EVEN_K"] = spec.intermediate_size % kw2["BLOCK_K"] == 0
    return kernel1, kw1, kernel2, kw2


@functools.lru_cache(maxsize=1024)
def _configs(
    spec: MoESpec, num_tokens: int, device: torch.device, _env: tuple[str | None, ...]
) -> tuple[DecodeConfig | None, MoEConfig | None]:
    """``(decode config or None, sorted-path config or None)`` for a call (``_env``: the
    environment variables the lookups read, so that changing them is seen, and whether the
    call is being captured in a CUDA graph, the last item)."""
    decode = lookup_decode(spec, num_tokens, device, capturing=_env[-1] == "capturing")
    return decode, None if decode is not None else lookup_config(spec, num_tokens, device)


def _env_key(device: torch.device) -> tuple[str | None, ...]:
    get = getenv  # (per call: os.environ.get of an unset name costs 0.7 us)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return (
        get("MOE_PORTABLE_DECODE"),
        get("MOE_PORTABLE_CONFIG_DIR"),
        get("MOE_PORTABLE_PREQUANT"),
        get("MOE_PORTABLE_DECODE_MMA"),
        get("MOE_PORTABLE_DECODE_CHAIN"),
        "capturing" if capturing else "eager",
    )


def fused_moe(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    config: MoEConfig | DecodeConfig | None = None,
) -> torch.Tensor:
    """Run the fused MoE into ``out [T, H]``; ``config`` overrides the table/heuristic (tuning):
    a :class:`DecodeConfig` runs the decode path, a :class:`MoEConfig` the sorted path."""
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()
    if config is None:
        decode, cfg = _configs(
            spec, hidden_states.shape[0], hidden_states.device, _env_key(hidden_states.device)
        )
    else:
        decode, cfg = (config, None) if isinstance(config, DecodeConfig) else (None, config)
    if decode is not None:
        for launch in decode_launches(spec, hidden_states, tensors, topk_weights, topk_ids, out, decode):
            run_launch(*launch)
        return out
    assert cfg is not None
    blocks = sort_tokens(spec, topk_ids, tensors, cfg.block_m)
    for launch in fused_moe_launches(spec, hidden_states, tensors, topk_weights, topk_ids, out, cfg, blocks):
        _run(launch)
    return out


def fused_moe_launches(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    cfg: MoEConfig,
    blocks: SortedBlocks,
    *,
    interpret: bool | None = None,
) -> list[Launch]:
    """The launches of :func:`fused_moe` after sorting, in order (allocates their buffers, runs nothing).

    Quantized activations add a pre-pass before GEMM 1 (the tokens) and, for dynamic per-row
    scales or groups that GEMM 1's tile cannot hold, one before GEMM 2 (module docstring).
    """
    T, H = hidden_states.shape
    I = spec.intermediate_size  # noqa: E741
    device = hidden_states.device
    mode = spec.quant.activation
    rows = blocks.sorted_ids.numel()
    launches: list[Launch] = []
    x, x_scale = hidden_states, None
    if mode != "none":  # GEMM 1's input: the T tokens
        x = torch.empty(T, H, dtype=_FP8, device=device)
        x_scale = _scale_buffer(spec, T, H, device)
        static = tensors.get("a13_scale")
        on_input = topk_weights if spec.apply_router_weight_on_input else None
        launches.append(
            quantize_launch(spec, hidden_states, x, x_scale, topk_weights=on_input, static_scale=static)
        )
        x_scale = x_scale if x_scale is not None else static
    # GEMM 1 quantizes its output when a tile holds whole scale groups (static: always)
    fused = mode == "fp8_per_tensor" or (
        mode == "fp8_group" and cfg.gemm1.block_n % spec.quant.block_shape[1] == 0
    )
    # the intermediate that a pre-pass quantizes stays float32: rounding it to bf16 first would
    # flip a few percent of its fp8 codes against the reference (double rounding)
    inter_dtype = _FP8 if fused else (torch.float32 if mode != "none" else hidden_states.dtype)
    inter_buf = torch.empty(rows, I, dtype=inter_dtype, device=device)
    inter_scale = _scale_buffer(spec, rows, I, device) if mode == "fp8_group" and fused else None
    launches.append(
        gemm1_launch(
            spec,
            x,
            tensors,
            blocks,
            topk_weights,
            cfg.gemm1,
            inter_buf,
            x_scale=x_scale,
            inter_scale=inter_scale,
            interpret=interpret,
        )
    )
    if mode != "none" and not fused:  # GEMM 2's input: the sorted rows of the intermediate
        a2 = torch.empty(rows, I, dtype=_FP8, device=device)
        inter_scale = _scale_buffer(spec, rows, I, device)
        launches.append(
            quantize_launch(spec, inter_buf, a2, inter_scale, blocks=blocks, num_entries=T * spec.top_k)
        )
        inter_buf = a2
    direct = spec.top_k == 1 and "expert_map" not in tensors
    y = out if direct else torch.empty(T * spec.top_k, H, dtype=out.dtype, device=device)
    launches.append(
        gemm2_launch(
            spec,
            inter_buf,
            tensors,
            blocks,
            topk_weights,
            cfg.gemm2,
            y,
            direct,
            inter_scale=inter_scale,
            interpret=interpret,
        )
    )
    if not direct:
        launches.append(combine_launch(spec, y, topk_ids, tensors, out))
    return launches


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    fused_moe(spec, hidden_states, prepared.tensors, topk_weights, topk_ids, out)


def kernel_entries() -> list[Any]:
    """The experts kernels of this plugin."""
    return [
        KernelEntry(
            name="portable.triton.fused_moe",
            family="experts",
            apply=_apply,
            prepare=_prepare,
            supports=_supports,
            quant=frozenset(QUANT_SCHEMES),
            activations=frozenset(_ACTIVATIONS),
            features=frozenset({"bias", "expert_parallel", "router_weight_on_input"}),
            capability="any",
            priority=PRIORITY,
            description="Triton fused MoE: sorted grouped GEMMs, fused activation/bias/router weight, "
            "deterministic combine; bf16/fp16, fp8 (channel/tensor/block scales), mxfp4 (W4A16, W4A8)",
        )
    ]
