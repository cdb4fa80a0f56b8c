"""``nvidia.flashinfer.trtllm`` and ``nvidia.flashinfer.cute_dsl``: FlashInfer's SM100-only MoE paths.

``nvidia.flashinfer.trtllm`` runs FlashInfer's trtllm-gen MoE through its
*routed* entry points (routing is done by the caller: ids and weights go in
as FlashInfer's unpacked ``(topk_ids int32, topk_weights float32)`` pair, no
bf16 packing, no copy of float32 weights):

=============  ======================================  ============================================
scheme         FlashInfer function                     inputs
=============  ======================================  ============================================
``bf16``       ``trtllm_bf16_routed_moe``              bf16 activations, shuffled BlockMajorK weights
``fp8_block``  ``trtllm_fp8_block_scale_routed_moe``   input quantized here in 1x128 groups (scales
               (``DeepSeekFp8``)                       ``[H/128, T]``), MajorK e4m3 weights
``mxfp4``      ``trtllm_fp4_block_scale_routed_moe``   bf16 activations (W4A16), shuffled e2m1
                                                       weights, 128x4-swizzled e8m0 scales
=============  ======================================  ============================================

Each call does the routing permutation, GEMM 1, the gated activation, GEMM 2
and the weighted top-k combine, and writes ``out`` in place (``output=``).
Activations: ``silu`` (FlashInfer ``Swiglu``) and ``swiglu_oai`` (``Swiglu``
with per-expert ``gemm1_alpha`` = alpha, ``gemm1_beta`` = 1 (the ``up + 1``),
``gemm1_clamp_limit`` = limit: FlashInfer clamps the gate above and the up
half to ``[-limit, limit]``, then ``gate * sigmoid(alpha * gate) * (up + beta)``).
Routing method ``TopK`` (no softmax / renormalization of the given weights).
Expert parallelism: equal contiguous slices (``local_expert_offset =
ep_rank * E_local``), global ids in.

Prepared layout (``PreparedWeights.tensors``; ``E`` = local experts; "P1" is
FlashInfer's GEMM-1 row permutation for a gated GEMM: the ``[up; gate]``
halves interleaved row by row (``reorder_rows_for_gated_act_gemm``) then
shuffled for the 128-row epilogue tile (``shuffle_matrix_a``); "P2" the
shuffle alone; both from FlashInfer's own permute-index helpers):

=================  ===============================  =================================================
name               shape / dtype                    meaning
=================  ===============================  =================================================
bf16
``gemm1``          ``[E, H/64, 2I, 64]`` bf16       canonical ``w13``, halves swapped to **[up; gate]**,
                                                    rows P1, then BlockMajorK (128-byte K blocks)
``gemm2``          ``[E, I/64, H, 64]`` bf16        ``w2``, rows P2, BlockMajorK
fp8_block
``gemm1``          ``[E, 2I, H]`` e4m3              ``w13`` as **[up; gate]** (MajorK, not shuffled)
``gemm1_scale``    ``[E, 2I/128, H/128]`` float32   ``w13_scale``, row blocks swapped as ``gemm1``
``gemm2``          ``[E, H, I]`` e4m3               = ``w2``
``gemm2_scale``    ``[E, H/128, I/128]`` float32    = ``w2_scale``
mxfp4
``gemm1``          ``[E, 2I, H/2]`` uint8           packed e2m1 ``w13`` as **[up; gate]**, rows P1
``gemm1_scale``    ``[E, 2I, H/32]`` float8_e4m3fn  e8m0 bytes of ``w13_scale`` (the dtype is only
                                                    FlashInfer's carrier), rows P1, 128x4-swizzled
``gemm2``          ``[E, H, I/2]`` uint8            ``w2``, rows P2
``gemm2_scale``    ``[E, H, I/32]`` float8_e4m3fn   e8m0 bytes of ``w2_scale``, rows P2, swizzled
``gemm1_bias``     ``[E, 2I]`` float32              ``b13`` as [up; gate], rows P1 (bias only)
``gemm2_bias``     ``[E, H]`` float32               ``b2``, rows P2 (bias only)
all schemes
``gemm1_alpha``    ``[E]`` float32                  swiglu_oai: alpha
``gemm1_beta``     ``[E]`` float32                  swiglu_oai: 1.0
``gemm1_clamp``    ``[E]`` float32                  swiglu_oai: limit
=================  ===============================  =================================================

Every transform is pure torch (index permutations, reshapes, the 128x4 scale
swizzle of :func:`swizzle_128x4`), runs on the weights' device, CPU included,
and is inverted exactly by :func:`to_canonical`. ``prepare`` imports
FlashInfer for its permute-index helpers (they run on the CPU).

``meta``: ``ep_size``, ``ep_rank``, ``local_expert_offset``, ``activation``
(FlashInfer ``ActivationType`` value, 3 = Swiglu), ``enable_pdl`` (SM90+,
FlashInfer's default), ``module`` (FlashInfer's trtllm-gen module).

What FlashInfer needs at run time (checked by :func:`supports`, without
importing FlashInfer): its module ``fused_moe_trtllm_sm100``
(``fused_moe_trtllm_sm107`` on SM107), JIT-compiled by nvcc on first use
unless prebuilt (FlashInfer's jit-cache wheel or AOT slot; ``moe nvidia
build`` builds only ``fused_moe_90``), and the trtllm-gen batched-GEMM cubins
and headers, which FlashInfer downloads from its cubin repository on first
use unless they are on disk (``flashinfer-cubin`` wheel, ``flashinfer
download-cubin``, ``FLASHINFER_CUBIN_DIR``). ``MOE_NVIDIA_ALLOW_JIT=1`` /
``MOE_NVIDIA_ALLOW_DOWNLOAD=1`` accept the compile / the download.

Untested on hardware: no SM100 GPU has run this module. What is tested (on the
CPU): every prepare transform and its inverse; that the bf16 layout equals
FlashInfer's own ``prepare_trtllm_bf16_weights``; the permutations equal
FlashInfer's helpers and the swizzle FlashInfer's torch reference; the
keyword arguments bound to FlashInfer's real signatures and passed through its
real Python wrappers to a recording module.

``nvidia.flashinfer.cute_dsl`` stays registered for planning only: FlashInfer's
``cute_dsl_fused_moe`` runs nvfp4 x nvfp4 (W4A4), whose activations are
quantized per call by FlashInfer's CUDA ``fp4_quantize`` with a global scale
this plugin does not yet carry on any path (nvfp4 is wired nowhere here).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights
from moe_core import quant as mq
from moe_core.errors import UnsupportedError

from ._common import PRIORITY_SM100, flashinfer_refusal, module_refusal
from .cutlass import _as, _ep_slices, _swap_halves
from .cutlass import _swiglu_params as cutlass_swiglu_params
from .flashinfer_env import flashinfer_dir, flashinfer_version, version_tuple

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "FLASHINFER_FUNCTIONS",
    "KERNEL",
    "PRIORITY_UNVERIFIED",
    "cubin_refusal",
    "cute_dsl_supports",
    "flashinfer_kwargs",
    "kernel_entries",
    "kernel_input",
    "prepare",
    "supports",
    "swizzle_128x4",
    "to_canonical",
    "trtllm_module_name",
    "unswizzle_128x4",
]

KERNEL = "nvidia.flashinfer.trtllm"
CUTE_KERNEL = "nvidia.flashinfer.cute_dsl"

#: Our scheme -> the routed FlashInfer function that runs it.
FLASHINFER_FUNCTIONS = {
    "bf16": "trtllm_bf16_routed_moe",
    "fp8_block": "trtllm_fp8_block_scale_routed_moe",
    "mxfp4": "trtllm_fp4_block_scale_routed_moe",
}
_QUANTS = tuple(FLASHINFER_FUNCTIONS)
#: Our activation -> FlashInfer ``ActivationType`` value (flashinfer/tllm_enums.py): both Swiglu.
ACTIVATION_TYPES = {"silu": 3, "swiglu_oai": 3}
#: FlashInfer ``RoutingMethodType.TopK``: the given weights are used as they are.
ROUTING_TOPK = 5
#: FlashInfer ``WeightLayout`` values.
MAJOR_K, BLOCK_MAJOR_K = 0, 2
#: FlashInfer ``Fp8QuantizationType.DeepSeekFp8``.
DEEPSEEK_FP8 = 1
#: trtllm-gen's epilogue tile along M (FlashInfer's kernel-internal constant) and BlockMajorK's K block.
EPILOGUE_TILE_M = 128
BLOCK_K_BYTES = 128
#: FlashInfer's default autotuning bound.
TUNE_MAX_NUM_TOKENS = 8192
#: Top-k limit of trtllm-gen's no-group routing kernels.
MAX_TOP_K = 32

#: trtllm-gen's priority until an SM100 run has checked it against the reference: below the
#: cutlass kernel (70, run on SM90 hardware), above the portable one (50). FlashInfer's SM100
#: kernels are its fastest there; :data:`PRIORITY_SM100` once verified.
PRIORITY_UNVERIFIED = 60

#: ``MOE_NVIDIA_ALLOW_DOWNLOAD=1`` lets FlashInfer download missing trtllm-gen cubins on first use.
ALLOW_DOWNLOAD_ENV = "MOE_NVIDIA_ALLOW_DOWNLOAD"


# -- supports ----------------------------------------------------------------------------------


def _sm100_refusal(spec: MoESpec, device: DeviceInfo, what: str) -> str | None:
    if device.capability is None or device.capability[0] != 10:
        return f"{what} runs on SM100 (Blackwell) only, got {device.arch}"
    if spec.dtype != torch.bfloat16:
        return f"{what} needs bf16 activations, got {str(spec.dtype).removeprefix('torch.')}"
    return None


def _quant_refusal(spec: MoESpec) -> str | None:
    q = spec.quant
    if q.name == "nvfp4":
        return (
            "nvfp4: FlashInfer's trtllm-gen nvfp4 path takes nvfp4-quantized activations (CUDA fp4_quantize "
            "per call, global scales folded into output1/output2 scales): not wired in this plugin"
        )
    if q.name not in _QUANTS:
        return f"trtllm-gen MoE takes {', '.join(_QUANTS)} in this plugin, not {q.name}"
    if q.name == "bf16" and spec.has_bias:
        return "bf16: FlashInfer's trtllm_bf16_routed_moe takes no biases"
    if q.name == "fp8_block":
        if q.block_shape != (128, 128) or q.activation != "fp8_group":
            return f"fp8_block: trtllm-gen DeepSeekFp8 takes 128x128 weight blocks and 1x128 groups, got {q}"
        if spec.has_bias:
            return "fp8_block: FlashInfer's trtllm_fp8_block_scale_routed_moe passes no biases"
    if q.name == "mxfp4" and q.activation != "none":
        return (
            "mxfp4 with fp8 activations (W4A8, MxE4m3) is not wired to trtllm-gen in this plugin (W4A16 is)"
        )
    return None


def supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """``None`` when FlashInfer's trtllm-gen MoE runs ``spec`` on ``device``, else the precise reason."""
    reason = _sm100_refusal(spec, device, "trtllm-gen MoE") or _quant_refusal(spec)
    if reason:
        return reason
    if spec.activation not in ACTIVATION_TYPES:
        return f"{spec.quant.name}: activation {spec.activation} not wired to trtllm-gen (silu, swiglu_oai)"
    if spec.hidden_size % 128 or spec.intermediate_size % 128:
        return (
            "trtllm-gen MoE needs H and I multiples of 128 (128-row epilogue tiles, 128-wide blocks; "
            f"padding not wired), got H={spec.hidden_size}, I={spec.intermediate_size}"
        )
    if spec.num_experts % 4:
        return f"trtllm-gen routing needs num_experts divisible by 4, got {spec.num_experts}"
    if not spec.top_k < spec.num_experts or spec.top_k > MAX_TOP_K:
        return f"trtllm-gen routing needs top_k < num_experts and top_k <= {MAX_TOP_K}, got {spec.top_k}"
    ep = _ep_slices(spec)
    if isinstance(ep, str):
        return ep
    return (
        flashinfer_refusal()
        or module_refusal(trtllm_module_name(device.capability), spec.quant.name)
        or cubin_refusal()
    )


def trtllm_module_name(capability: tuple[int, int]) -> str:
    """FlashInfer's trtllm-gen fused-MoE module for an SM10x capability (``gen_trtllm_gen_fused_moe_sm100_module``)."""
    return "fused_moe_trtllm_sm107" if tuple(capability) == (10, 7) else "fused_moe_trtllm_sm100"


@functools.cache
def bmm_subdir() -> str | None:
    """FlashInfer's artifact path of the trtllm-gen batched-GEMM cubins (``ArtifactPath.TRTLLM_GEN_BMM``),
    read from its ``artifacts.py`` without importing it; ``None`` if not found."""
    base = flashinfer_dir()
    try:
        text = (base / "artifacts.py").read_text() if base is not None else ""
    except OSError:
        return None
    _, _, body = text.partition("class ArtifactPath")
    m = re.search(r"TRTLLM_GEN_BMM\s*:\s*str\s*=\s*\(?\s*\"([^\"]+)\"", body)
    return m.group(1) if m else None


def cubin_dir() -> Path:
    """Where FlashInfer looks for cubins (``jit/env.py``): ``FLASHINFER_CUBIN_DIR``, else a
    ``flashinfer-cubin`` wheel of the same version, else ``<workspace>/.cache/flashinfer/cubins``."""
    env = os.environ.get("FLASHINFER_CUBIN_DIR")
    if env:
        return Path(env)
    if importlib.util.find_spec("flashinfer_cubin") is not None:
        try:
            import flashinfer_cubin

            if version_tuple(getattr(flashinfer_cubin, "__version__", "")) == version_tuple(
                flashinfer_version()
            ):
                return Path(flashinfer_cubin.get_cubin_dir())
        except Exception:  # a broken wheel: FlashInfer falls back to its cache too
            pass
    base = Path(os.environ.get("FLASHINFER_WORKSPACE_BASE", str(Path.home())))
    return base / ".cache" / "flashinfer" / "cubins"


@functools.lru_cache(maxsize=8)
def _missing_files(folder: str, stamp: float) -> tuple[int, int]:
    """``(missing, listed)`` files of ``folder/checksums.txt`` (``stamp``: its mtime, for the cache)."""
    root = Path(folder)
    names = [line.split()[-1] for line in (root / "checksums.txt").read_text().splitlines() if line.strip()]
    return sum(not (root / n).is_file() for n in names), len(names)


def cubin_refusal() -> str | None:
    """Why FlashInfer would download trtllm-gen cubins on first use (they are not all on disk), or ``None``."""
    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        return None
    base = cubin_dir()
    sub = bmm_subdir()
    if sub is not None:
        folders = [base / sub]
    else:  # FlashInfer's artifacts.py not readable: any batched-GEMM package counts
        folders = sorted(p.parent for p in base.glob("*/batched_gemm-*/checksums.txt")) or [base / "<pin>"]
    folder = folders[-1]
    checksums = folder / "checksums.txt"
    if checksums.is_file():
        missing, listed = _missing_files(str(folder), checksums.stat().st_mtime)
        if not missing:
            return None
        state = f"{missing} of {listed} files missing"
    else:
        state = "no checksums.txt"
    return (
        f"FlashInfer's trtllm-gen cubins are not on disk ({folder}: {state}); FlashInfer would download "
        "them from its cubin repository on first use: install the flashinfer-cubin wheel of the same "
        f"version or run `flashinfer download-cubin`, or set {ALLOW_DOWNLOAD_ENV}=1 to let FlashInfer fetch them"
    )


def cute_dsl_supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """CuTe-DSL MoE: SM100, nvfp4 x nvfp4; registered for planning only (module docstring)."""
    reason = _sm100_refusal(spec, device, "CuTe-DSL MoE")
    if reason:
        return reason
    if spec.quant.name != "nvfp4":
        return f"CuTe-DSL MoE takes nvfp4, not {spec.quant.name}"
    reason = flashinfer_refusal()
    if reason:
        return reason
    if importlib.util.find_spec("cutlass") is None:
        return "CuTe-DSL MoE needs nvidia-cutlass-dsl (pip install 'moe-plugin-nvidia[cute-dsl]')"
    return (
        f"{CUTE_KERNEL} is registered for planning only: FlashInfer's cute_dsl_fused_moe takes nvfp4 "
        "activations quantized per call (CUDA fp4_quantize, global scale) and 128x4-swizzled nvfp4 weight "
        "scales; nvfp4 is not wired on any path of this plugin (SM100 untested)"
    )


# -- prepare -----------------------------------------------------------------------------------


def swizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """Block scales ``[..., M, K]`` (M % 128 == 0, K % 4 == 0) in trtllm-gen's 128x4 layout, same shape.

    Each 128-row x 4-column tile is stored contiguously, tiles row-major; inside a tile,
    element ``(r, c)`` sits at ``(r % 32) * 16 + (r // 32) * 4 + c``.
    """
    *lead, m, k = sf.shape
    t = sf.reshape(*lead, m // 128, 4, 32, k // 4, 4)
    n = len(lead)
    t = t.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, m, k).contiguous()


def unswizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`swizzle_128x4`."""
    *lead, m, k = sf.shape
    t = sf.reshape(*lead, m // 128, k // 4, 32, 4, 4)
    n = len(lead)
    t = t.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    return t.reshape(*lead, m, k).contiguous()


_PERMUTE_CACHE: dict = {}


def _row_permutations(rows1: int, rows2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P1, P2)``: FlashInfer's GEMM-1 (gated) and GEMM-2 row permutations for 128-row epilogue tiles
    (``new[i] = old[P[i]]``, CPU int64), from its own helpers."""
    from flashinfer.fused_moe.core import (
        _maybe_get_cached_w3_w1_permute_indices,
        get_w2_permute_indices_with_cache,
    )

    p1 = _maybe_get_cached_w3_w1_permute_indices(
        _PERMUTE_CACHE, torch.empty(rows1, 1, dtype=torch.uint8), EPILOGUE_TILE_M
    )
    p2 = get_w2_permute_indices_with_cache(
        _PERMUTE_CACHE, torch.empty(rows2, 1, dtype=torch.uint8), EPILOGUE_TILE_M
    )
    return p1.cpu(), p2.cpu()


def _sf_row_permutations(rows1: int, rows2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same permutations as FlashInfer derives them for block-scale rows (``num_elts_per_sf``)."""
    from flashinfer.fused_moe.core import (
        _maybe_get_cached_w3_w1_permute_indices,
        get_w2_permute_indices_with_cache,
    )

    dummy1, dummy2 = torch.empty(rows1, 1, dtype=torch.uint8), torch.empty(rows2, 1, dtype=torch.uint8)
    p1 = _maybe_get_cached_w3_w1_permute_indices(_PERMUTE_CACHE, dummy1, EPILOGUE_TILE_M, num_elts_per_sf=16)
    p2 = get_w2_permute_indices_with_cache(_PERMUTE_CACHE, dummy2, EPILOGUE_TILE_M, num_elts_per_sf=16)
    return p1.cpu(), p2.cpu()


def _rows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t[:, perm]`` (rows are dim 1), contiguous."""
    return t.index_select(1, perm.to(t.device)).contiguous()


def _unrows(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_rows`."""
    return t.index_select(1, torch.argsort(perm).to(t.device)).contiguous()


def _block_major_k(w: torch.Tensor) -> torch.Tensor:
    """``[E, M, K]`` -> ``[E, K/b, M, b]`` with ``b`` elements of 128 bytes (FlashInfer's BlockMajorK)."""
    e, m, k = w.shape
    b = BLOCK_K_BYTES // w.element_size()
    return w.reshape(e, m, k // b, b).permute(0, 2, 1, 3).contiguous()


def _major_k(w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_block_major_k`."""
    e, kb, m, b = w.shape
    return w.permute(0, 2, 1, 3).reshape(e, m, kb * b).contiguous()


def _swiglu_params(spec: MoESpec, dev: torch.device) -> dict[str, torch.Tensor]:
    """swiglu_oai's per-expert alpha, beta and limit (cutlass's tensors) under trtllm-gen's names."""
    p = cutlass_swiglu_params(spec, dev)
    names = {"swiglu_alpha": "gemm1_alpha", "swiglu_beta": "gemm1_beta", "swiglu_limit": "gemm1_clamp"}
    return {names[k]: v for k, v in p.items()}


def prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> PreparedWeights:
    """Canonical weights -> trtllm-gen's layout (module docstring). Quantizes high-precision fp8/fp4 weights."""
    ep = _ep_slices(spec)
    if isinstance(ep, str):
        raise UnsupportedError(ep)
    ep_size, ep_rank = ep
    q = spec.quant
    if q.name not in _QUANTS:
        raise UnsupportedError(_quant_refusal(spec) or f"{KERNEL}: quant {q.name} not wired")
    if q.is_quantized and mq.is_high_precision(weights.w13):
        weights = mq.quantize_weights(weights, q)
    dev = weights.w13.device
    h, i = spec.hidden_size, spec.intermediate_size
    t: dict[str, torch.Tensor] = {}
    up_gate = _swap_halves(weights.w13, 1)  # canonical [gate; up] -> FlashInfer's [up; gate]
    if q.name == "bf16":
        p1, p2 = _row_permutations(2 * i, h)
        t["gemm1"] = _block_major_k(_rows(up_gate.to(torch.bfloat16), p1))
        t["gemm2"] = _block_major_k(_rows(weights.w2.to(torch.bfloat16), p2))
    elif q.name == "fp8_block":
        # 2I rows are whole 128-row blocks (I % 128 == 0): swapping halves swaps scale block rows
        t["gemm1"] = up_gate
        t["gemm1_scale"] = _swap_halves(weights.w13_scale.float(), 1)
        t["gemm2"] = weights.w2.contiguous()
        t["gemm2_scale"] = weights.w2_scale.float().contiguous()
    else:  # mxfp4
        p1, p2 = _row_permutations(2 * i, h)
        s1, s2 = _sf_row_permutations(2 * i, h)
        t["gemm1"] = _rows(up_gate, p1)
        t["gemm1_scale"] = swizzle_128x4(_rows(_swap_halves(weights.w13_scale, 1), s1)).view(
            torch.float8_e4m3fn
        )
        t["gemm2"] = _rows(weights.w2, p2)
        t["gemm2_scale"] = swizzle_128x4(_rows(weights.w2_scale, s2)).view(torch.float8_e4m3fn)
        if weights.b13 is not None:
            t["gemm1_bias"] = _rows(_swap_halves(weights.b13.float(), 1).unsqueeze(-1), p1).squeeze(-1)
        if weights.b2 is not None:
            t["gemm2_bias"] = _rows(weights.b2.float().unsqueeze(-1), p2).squeeze(-1)
    t.update(_swiglu_params(spec, dev))
    local = spec.num_local_experts
    meta = {
        "ep_size": ep_size,
        "ep_rank": ep_rank,
        "local_expert_offset": ep_rank * local,
        "activation": ACTIVATION_TYPES[spec.activation],
        "enable_pdl": bool(device.capability and device.capability >= (9, 0)),
        "module": trtllm_module_name(device.capability) if device.capability else None,
    }
    return PreparedWeights(KERNEL, t, meta)


def to_canonical(spec: MoESpec, prepared: PreparedWeights) -> ExpertWeights:
    """The inverse of :func:`prepare` (after any quantization): canonical ``ExpertWeights``."""
    t = prepared.tensors
    name = spec.quant.name
    h, i = spec.hidden_size, spec.intermediate_size
    if name == "bf16":
        p1, p2 = _row_permutations(2 * i, h)
        return ExpertWeights(
            w13=_swap_halves(_unrows(_major_k(t["gemm1"]), p1), 1), w2=_unrows(_major_k(t["gemm2"]), p2)
        )
    if name == "fp8_block":
        return ExpertWeights(
            w13=_swap_halves(t["gemm1"], 1),
            w2=t["gemm2"],
            w13_scale=_swap_halves(t["gemm1_scale"], 1),
            w2_scale=t["gemm2_scale"],
        )
    p1, p2 = _row_permutations(2 * i, h)
    s1, s2 = _sf_row_permutations(2 * i, h)
    out = ExpertWeights(
        w13=_swap_halves(_unrows(t["gemm1"], p1), 1),
        w2=_unrows(t["gemm2"], p2),
        w13_scale=_swap_halves(_unrows(unswizzle_128x4(t["gemm1_scale"].view(torch.uint8)), s1), 1),
        w2_scale=_unrows(unswizzle_128x4(t["gemm2_scale"].view(torch.uint8)), s2),
    )
    if "gemm1_bias" in t:
        out.b13 = _swap_halves(_unrows(t["gemm1_bias"].unsqueeze(-1), p1).squeeze(-1), 1)
    if "gemm2_bias" in t:
        out.b2 = _unrows(t["gemm2_bias"].unsqueeze(-1), p2).squeeze(-1)
    return out


# -- apply -------------------------------------------------------------------------------------


def kernel_input(spec: MoESpec, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden_states, hidden_states_scale)`` as FlashInfer takes them: bf16 as given; fp8_block
    e4m3 in 1x128 groups (the reference quantizer) with the scales transposed to ``[H/128, T]``."""
    if spec.quant.name != "fp8_block":
        return hidden_states, None
    x, scale = mq.quantize_fp8_group(hidden_states, 128)
    return x, scale.t().contiguous()


def flashinfer_kwargs(
    spec: MoESpec,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> dict[str, Any]:
    """Keyword arguments of ``flashinfer.fused_moe.<FLASHINFER_FUNCTIONS[scheme]>`` for one planned call.

    ``x``/``x_scale`` come from :func:`kernel_input`; ``out`` is written in place.
    """
    t = prepared.tensors
    m = prepared.meta
    name = spec.quant.name
    kw: dict[str, Any] = {
        "topk_ids": (_as(topk_ids, torch.int32), _as(topk_weights, torch.float32)),
        "hidden_states": x,
        "gemm1_weights": t["gemm1"],
        "gemm2_weights": t["gemm2"],
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "n_group": None,
        "topk_group": None,
        "intermediate_size": spec.intermediate_size,
        "local_expert_offset": m["local_expert_offset"],
        "local_num_experts": spec.num_local_experts,
        "routed_scaling_factor": None,
        "routing_method_type": ROUTING_TOPK,
        "do_finalize": True,
        "enable_pdl": m["enable_pdl"],
        "tune_max_num_tokens": TUNE_MAX_NUM_TOKENS,
        "activation_type": m["activation"],
        "gemm1_alpha": t.get("gemm1_alpha"),
        "gemm1_beta": t.get("gemm1_beta"),
        "gemm1_clamp_limit": t.get("gemm1_clamp"),
        "output": out,
    }
    if name == "bf16":
        kw.update(use_shuffled_weight=True, weight_layout=BLOCK_MAJOR_K)
    elif name == "fp8_block":
        kw.update(
            routing_bias=None,
            hidden_states_scale=x_scale,
            gemm1_weights_scale=t["gemm1_scale"],
            gemm2_weights_scale=t["gemm2_scale"],
            use_shuffled_weight=False,
            weight_layout=MAJOR_K,
            fp8_quantization_type=DEEPSEEK_FP8,
        )
    else:  # mxfp4 x bf16: shuffled MajorK is implied by FlashInfer's fp4 entry point
        kw.update(
            routing_bias=None,
            hidden_states_scale=None,
            gemm1_weights_scale=t["gemm1_scale"],
            gemm1_bias=t.get("gemm1_bias"),
            gemm2_weights_scale=t["gemm2_scale"],
            gemm2_bias=t.get("gemm2_bias"),
            output1_scale_scalar=None,
            output1_scale_gate_scalar=None,
            output2_scale_scalar=None,
        )
    return kw


@functools.cache
def _flashinfer() -> dict[str, Callable[..., Any]]:
    """``{scheme: FlashInfer routed function}`` (imports FlashInfer on first use)."""
    import flashinfer.fused_moe as fm

    return {scheme: getattr(fm, fn) for scheme, fn in FLASHINFER_FUNCTIONS.items()}


def apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Run FlashInfer's trtllm-gen MoE into ``out [T, H]`` (no host synchronisation)."""
    fn = _flashinfer()[spec.quant.name]
    x, x_scale = kernel_input(spec, hidden_states)
    dst = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    fn(**flashinfer_kwargs(spec, x, x_scale, prepared, topk_weights, topk_ids, dst))
    if dst is not out:
        out.copy_(dst)


def _unwired(name: str):
    def fail(*_: Any, **__: Any) -> None:
        raise UnsupportedError(
            f"{name} is registered for planning only: its prepare/apply are not implemented"
        )

    return fail


def kernel_entries() -> list[KernelEntry]:
    """The SM100 kernels: trtllm-gen (wired) and CuTe-DSL (planning and refusal reasons only)."""
    return [
        KernelEntry(
            name=KERNEL,
            family="experts",
            apply=apply,
            prepare=prepare,
            supports=supports,
            quant=frozenset({*_QUANTS, "nvfp4"}),  # nvfp4 listed so that supports() says why it is refused
            activations=frozenset(ACTIVATION_TYPES),
            features=frozenset({"bias", "expert_parallel"}),
            capability="cuda>=10.0,<11.0",
            priority=PRIORITY_UNVERIFIED,
            description="FlashInfer trtllm-gen MoE (SM100, routed entry points): bf16, fp8_block (DeepSeek), "
            "mxfp4 W4A16 (+biases); silu/swiglu_oai; EP by equal slices [no SM100 run yet]",
        ),
        KernelEntry(
            name=CUTE_KERNEL,
            family="experts",
            apply=_unwired(CUTE_KERNEL),
            prepare=_unwired(CUTE_KERNEL),
            supports=cute_dsl_supports,
            quant=frozenset({"nvfp4"}),
            activations=frozenset({"silu"}),
            capability="cuda>=10.0,<11.0",
            priority=PRIORITY_SM100,
            description="FlashInfer CuTe-DSL MoE (SM100): nvfp4 [planning only, not wired]",
        ),
    ]
