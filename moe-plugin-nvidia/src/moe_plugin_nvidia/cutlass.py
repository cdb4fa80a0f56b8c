"""``nvidia.flashinfer.cutlass``: FlashInfer's cutlass fused MoE (``flashinfer.fused_moe.cutlass_fused_moe``).

One call does routing permutation, GEMM 1 (+bias), the activation, GEMM 2
(+bias) and the weighted top-k combine. This module holds the kernel's
``supports``/``prepare``/``apply`` and the translation of a planned call into
FlashInfer's keyword arguments (:func:`flashinfer_kwargs`, pure, tested on the
CPU against FlashInfer's real signature).

Prepared layout (``PreparedWeights.tensors``; ``E`` = local experts):

==================  =========================  =======================================
name                shape / dtype              meaning
==================  =========================  =======================================
``fc1``             ``[E, 2I, H]`` (``[E, I, H]`` relu2)  **up rows first, then gate**
                    ``spec.dtype`` / e4m3      (FlashInfer's order; canonical is gate, up)
``fc2``             ``[E, H, I]``              = canonical ``w2``
``fc1_bias``        ``[E, 2I]`` ``spec.dtype`` ``b13`` with the same row swap (bias only)
``fc2_bias``        ``[E, H]`` ``spec.dtype``  ``b2`` (bias only)
``swiglu_alpha``    ``[E]`` float32            swiglu_oai: alpha
``swiglu_beta``     ``[E]`` float32            swiglu_oai: 1.0 (the ``up + 1``)
``swiglu_limit``    ``[E]`` float32            swiglu_oai: limit
``fc1_dequant``     ``[E]`` float32            fp8: ``a13_scale * w13_scale``
``fc2_quant``       ``[]`` float32             fp8: ``1 / a2_scale``
``fc2_dequant``     ``[E]`` float32            fp8: ``a2_scale * w2_scale``
``fc1_input_scale`` ``[]`` float32             fp8: ``a13_scale`` (input quantization)
``fc1_block_scale`` ``[E, 2I/128, H/128]`` f32 fp8_block: ``w13_scale``, row blocks swapped as ``fc1``
``fc2_block_scale`` ``[E, H/128, I/128]`` f32  fp8_block: ``w2_scale``
==================  =========================  =======================================

mxfp4 weights are padded to multiples of 128 and interleaved for the SM90
mixed-input GEMM: their layout is in :mod:`.mxfp4`.

``meta``: ``activation`` (FlashInfer ``ActivationType`` value), ``ep_size``,
``ep_rank``, ``module`` (FlashInfer module name), ``enable_pdl`` (FlashInfer's
default: SM90+), ``device_name`` (for the tune cache) and, after the first
call, ``_tactics`` (the layer's tuned buckets).

Quant schemes: ``bf16``/``fp16`` (weights of ``spec.dtype``); ``fp8`` with
per-tensor weight scales and static per-tensor activation scales
(``QuantScheme("fp8", activation="fp8_per_tensor", weight_scale="per_tensor")``,
``a13_scale``/``a2_scale`` given): FlashInfer's SM90 fp8 path takes exactly
these; ``fp8_block`` (DeepSeek 128x128 weight blocks, bf16 input quantized in
1x128 groups inside FlashInfer: its SM90 DeepGEMM grouped GEMM, compiled by
nvcc on first use of a shape; no tactics to tune); ``mxfp4`` W4A16 (bf16
activations, SM90 mixed-input GEMM). Expert parallelism: equal contiguous slices (``E % ep_size == 0``),
which is how FlashInfer maps global ids (``ep_rank * E_local`` first).
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights
from moe_core import quant as mq
from moe_core.env import getenv
from moe_core.errors import UnsupportedError

from . import mxfp4, tuning
from ._common import PRIORITY_CUTLASS, cutlass_module_name, flashinfer_refusal, module_refusal

__all__ = [
    "ACTIVATION_TYPES",
    "KERNEL",
    "flashinfer_kwargs",
    "kernel_entries",
    "kernel_input",
    "layer_kwargs",
    "prepare",
    "supports",
    "to_canonical",
]

KERNEL = "nvidia.flashinfer.cutlass"

#: Our activation -> FlashInfer ``ActivationType`` value (flashinfer/tllm_enums.py).
ACTIVATION_TYPES = {"gelu": 4, "swiglu_oai": 5, "relu2": 6, "silu": 3}
#: Geglu is erf-GELU(gate) * up, Swiglu silu(gate) * up, SwigluBias clamp/alpha/beta (gpt-oss), Relu2 relu(x)^2.

_QUANTS = ("bf16", "fp16", "fp8", "fp8_block", "mxfp4")
_DTYPES = (torch.bfloat16, torch.float16)
#: The tactics of a layer ``moe tune`` has not tuned: FlashInfer's defaults, passed explicitly.
#: ``profile_ids=None`` runs the same kernels (when FlashInfer's own autotuner has not run in the
#: process) but through its autotuner's cache lookup, 100-150 us of host time per call on the H200
#: (benchmarks/results/h200-nvidia-host-profile-2026-12-04.md: "untuned" vs "direct").
DEFAULT_TACTICS = [-1, -1]
#: fp8_block runs FlashInfer's DeepGEMM path, which has one tactic (FlashInfer skips profiling it).
FIXED_TACTICS = DEFAULT_TACTICS


def _alignment(spec: MoESpec) -> int:
    # FlashInfer: TMA needs 128-bit rows of the narrower of activation and weight; DeepGEMM
    # 128x128 blocks; mxfp4 is padded to 128 by prepare (the spec already holds K % 32).
    return {"fp8": 16, "fp8_block": 128, "mxfp4": 1}.get(spec.quant.name, 8)


_ALIGN_WHY = {"fp8_block": "DeepGEMM 128x128 blocks"}


def _quant_refusal(spec: MoESpec, device: DeviceInfo) -> str | None:
    """Why FlashInfer's SM90 fp8_block / mxfp4 path does not take ``spec``, or ``None``."""
    q = spec.quant
    if device.capability is None or device.capability[0] != 9:
        return (
            f"{q.name}: FlashInfer's cutlass MoE runs {q.name} on SM90 only in this plugin, got {device.arch}"
        )
    if spec.dtype != torch.bfloat16:
        return f"{q.name}: FlashInfer's SM90 {q.name} path takes bf16 activations, got {spec.dtype}"
    if q.name == "fp8_block":
        if q.block_shape != (128, 128) or q.activation != "fp8_group":
            return (
                f"fp8_block: FlashInfer's DeepGEMM path takes 128x128 weight blocks and 1x128 groups, got {q}"
            )
        if spec.has_bias:
            return "fp8_block with biases is not wired to FlashInfer's DeepGEMM path"
        if spec.activation not in ("silu", "gelu"):
            return f"fp8_block: activation {spec.activation} not wired (silu, gelu)"
    else:
        if q.activation != "none":
            return (
                "mxfp4 with fp8 activations (W4A8) on SM90 is FlashInfer's Humming path, not wired in this "
                "plugin (W4A16 is)"
            )
        if spec.activation not in ("silu", "swiglu_oai"):
            return f"mxfp4: activation {spec.activation} not wired (silu, swiglu_oai)"
    return None


def supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    """``None`` when FlashInfer's cutlass MoE runs ``spec`` on ``device``, else the precise reason."""
    if device.capability is None:
        return f"needs an NVIDIA GPU, got {device.arch}"
    module = cutlass_module_name(device.capability)
    if module is None:
        return f"FlashInfer's cutlass fused MoE has no module for {device.arch}"
    if spec.dtype not in _DTYPES:
        return f"activations must be bf16 or fp16, got {str(spec.dtype).removeprefix('torch.')}"
    q = spec.quant
    if q.name not in _QUANTS:
        return f"quant {q.name} is not wired to FlashInfer's cutlass MoE in this plugin (has {', '.join(_QUANTS)})"
    if not q.is_quantized and q.weight_dtype != spec.dtype:
        return f"weights ({q.name}) and activations ({spec.dtype}) must share a dtype"
    if q.name == "fp8":
        if q.weight_scale != "per_tensor" or q.activation != "fp8_per_tensor":
            return (
                "FlashInfer's cutlass fp8 takes per-tensor weight scales and static per-tensor activation "
                f"scales (fp8 weight_scale=per_tensor, activation=fp8_per_tensor), got {q}"
            )
        if spec.has_bias:
            return "fp8 with biases is not supported by FlashInfer's cutlass MoE"
    if q.name in ("fp8_block", "mxfp4"):
        reason = _quant_refusal(spec, device)
        if reason:
            return reason
    if spec.activation not in ACTIVATION_TYPES:
        return f"activation {spec.activation} not supported"
    if spec.activation == "relu2" and q.is_quantized:
        return "relu2 (non-gated) is wired for bf16/fp16 only"
    align = _alignment(spec)
    if spec.hidden_size % align or spec.intermediate_size % align:
        return (
            f"hidden_size and intermediate_size must be multiples of {align} ({_ALIGN_WHY.get(q.name, 'TMA 16-byte rows')}), "
            f"got H={spec.hidden_size}, I={spec.intermediate_size}"
        )
    ep = _ep_slices(spec)
    if isinstance(ep, str):
        return ep
    reason = flashinfer_refusal()
    if reason:
        return reason
    return module_refusal(module, q.name)


def _ep_slices(spec: MoESpec) -> tuple[int, int] | str:
    """``(ep_size, ep_rank)`` as FlashInfer maps experts, or the reason the spec's EP does not fit."""
    if not spec.is_expert_parallel:
        return (1, 0)
    e = spec.num_experts
    local = spec.num_local_experts
    if e % local:
        return f"expert parallelism needs equal slices (num_experts {e} % local experts {local} != 0)"
    size = e // local
    g2l = spec.global_to_local()
    starts = [g for g, v in enumerate(g2l) if v == 0]
    start = starts[0] if starts else -1
    if start % local or g2l != tuple(g - start if start <= g < start + local else -1 for g in range(e)):
        return "expert_map must be a contiguous slice of equal size (FlashInfer maps experts by ep_rank)"
    return (size, start // local)


def _swap_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[a; b] -> [b; a] along ``dim`` (its own inverse)."""
    a, b = t.chunk(2, dim=dim)
    return torch.cat([b, a], dim=dim).contiguous()


def prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> PreparedWeights:
    """Canonical weights -> FlashInfer's layout (module docstring). Quantizes high-precision fp8 weights."""
    reason = _ep_slices(spec)
    if isinstance(reason, str):
        raise UnsupportedError(reason)
    ep_size, ep_rank = reason
    q = spec.quant
    if q.is_quantized and mq.is_high_precision(weights.w13):
        weights = mq.quantize_weights(weights, q)
    meta = {
        "activation": ACTIVATION_TYPES[spec.activation],
        "ep_size": ep_size,
        "ep_rank": ep_rank,
        "module": cutlass_module_name(device.capability) if device.capability else None,
        # Programmatic dependent launch, as FlashInfer's own default (device_support_pdl: SM90+).
        "enable_pdl": bool(device.capability and device.capability >= (9, 0)),
    }
    if q.name == "mxfp4":
        interleave = weights.w13.device.type == "cuda" and not device.simulated
        t = mxfp4.prepare_tensors(spec, weights, interleave)
        t.update(_swiglu_params(spec, weights.w13.device))
        return PreparedWeights(KERNEL, t, {**meta, "interleaved": interleave})
    gated = spec.is_gated
    t: dict[str, torch.Tensor] = {}
    t["fc1"] = _swap_halves(weights.w13, 1) if gated else weights.w13.contiguous()
    t["fc2"] = weights.w2.contiguous()
    if weights.b13 is not None:
        b13 = weights.b13.to(spec.dtype)
        t["fc1_bias"] = _swap_halves(b13, 1) if gated else b13.contiguous()
    if weights.b2 is not None:
        t["fc2_bias"] = weights.b2.to(spec.dtype).contiguous()
    e = spec.num_local_experts
    dev = weights.w13.device
    t.update(_swiglu_params(spec, dev))
    if q.name == "fp8_block":
        if dev.type == "cuda":
            deepgemm_jit_check()
        # the 2I rows are whole 128-row blocks (I % 128 == 0): swapping halves swaps block rows
        t["fc1_block_scale"] = _swap_halves(weights.w13_scale.float(), 1)
        t["fc2_block_scale"] = weights.w2_scale.float().contiguous()
    if q.name == "fp8":
        if weights.a13_scale is None or weights.a2_scale is None:
            raise UnsupportedError("fp8_per_tensor needs static a13_scale and a2_scale")
        a1 = weights.a13_scale.float().reshape(()).to(dev)
        a2 = weights.a2_scale.float().reshape(()).to(dev)
        w1s = weights.w13_scale.float().reshape(e).to(dev)
        w2s = weights.w2_scale.float().reshape(e).to(dev)
        t["fc1_dequant"] = (w1s * a1).contiguous()
        t["fc2_quant"] = (1.0 / a2).reshape(())
        t["fc2_dequant"] = (w2s * a2).contiguous()
        t["fc1_input_scale"] = a1.clone()
        # Kept for the inverse (tests) and for re-preparing: the canonical scales.
        t["w13_scale"] = w1s.contiguous()
        t["w2_scale"] = w2s.contiguous()
    return PreparedWeights(KERNEL, t, meta)


#: FlashInfer's switch between DeepGEMM (kernels compiled by nvcc on first use of a shape) and
#: its precompiled cutlass fp8 block-scale GEMM (``"0"``).
DEEPGEMM_ENV = "TRTLLM_DG_ENABLED"


def _deepgemm_nvcc() -> str | None:
    """The nvcc FlashInfer's DeepGEMM JIT would run, as it looks for it; ``None`` if there is none."""
    cand = os.environ.get("TRTLLM_DG_NVCC_COMPILER")
    if not cand and os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return shutil.which(cand or "nvcc")


def deepgemm_jit_check() -> None:
    """Before the first fp8_block call: without an nvcc to compile DeepGEMM's kernels, switch
    FlashInfer to its precompiled block-scale GEMM (``TRTLLM_DG_ENABLED=0``) and say so once,
    instead of failing at the first forward. An explicit ``TRTLLM_DG_ENABLED`` is left alone."""
    if DEEPGEMM_ENV in os.environ or _deepgemm_nvcc():
        return
    os.environ[DEEPGEMM_ENV] = "0"
    warnings.warn(
        f"{KERNEL}: fp8_block: no nvcc for FlashInfer's DeepGEMM JIT (CUDA_HOME / PATH); using its "
        f"precompiled cutlass block-scale GEMM instead ({DEEPGEMM_ENV}=0)",
        stacklevel=3,
    )


def _swiglu_params(spec: MoESpec, dev: torch.device) -> dict[str, torch.Tensor]:
    """swiglu_oai's per-expert alpha, beta (1.0: the ``up + 1``) and limit; empty for other activations."""
    if spec.activation != "swiglu_oai":
        return {}
    e = spec.num_local_experts
    return {
        "swiglu_alpha": torch.full((e,), float(spec.swiglu_alpha), dtype=torch.float32, device=dev),
        "swiglu_beta": torch.ones((e,), dtype=torch.float32, device=dev),
        "swiglu_limit": torch.full((e,), float(spec.swiglu_limit), dtype=torch.float32, device=dev),
    }


def to_canonical(spec: MoESpec, prepared: PreparedWeights) -> ExpertWeights:
    """The inverse of :func:`prepare` (after any quantization): canonical ``ExpertWeights``.

    mxfp4 weights interleaved for the GPU (``meta["interleaved"]``) have no inverse here.
    """
    t = prepared.tensors
    if spec.quant.name == "mxfp4":
        if prepared.meta.get("interleaved"):
            raise UnsupportedError(
                "mxfp4 weights interleaved for FlashInfer's SM90 GEMM have no inverse here"
            )
        return mxfp4.to_canonical(spec, t)
    gated = spec.is_gated
    w13 = _swap_halves(t["fc1"], 1) if gated else t["fc1"]
    b13 = t.get("fc1_bias")
    if b13 is not None and gated:
        b13 = _swap_halves(b13, 1)
    out = ExpertWeights(w13=w13, w2=t["fc2"], b13=b13, b2=t.get("fc2_bias"))
    if spec.quant.name == "fp8":
        out.w13_scale = t["w13_scale"]
        out.w2_scale = t["w2_scale"]
        out.a13_scale = t["fc1_input_scale"]
        out.a2_scale = 1.0 / t["fc2_quant"]
    if spec.quant.name == "fp8_block":
        out.w13_scale = _swap_halves(t["fc1_block_scale"], 1)
        out.w2_scale = t["fc2_block_scale"]
    return out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def layer_kwargs(spec: MoESpec, prepared: PreparedWeights, activation_type: Any) -> dict[str, Any]:
    """The keyword arguments of ``cutlass_fused_moe`` that are the same on every call of a layer:
    weights, biases, scales, swiglu parameters, EP slice, flags (no ``input``, topk, ``output``,
    ``profile_ids``)."""
    t = prepared.tensors
    name = spec.quant.name
    quant_scales: list[torch.Tensor] = []
    if name == "fp8":
        quant_scales = [t["fc1_dequant"], t["fc2_quant"], t["fc2_dequant"], t["fc1_input_scale"]]
    elif name == "fp8_block":
        quant_scales = [t["fc1_block_scale"], t["fc2_block_scale"]]
    elif name == "mxfp4":
        quant_scales = [t["fc1_scale"], t["fc2_scale"]]
    return {
        "fc1_expert_weights": t["fc1"],
        "fc2_expert_weights": t["fc2"],
        "output_dtype": spec.dtype,
        "quant_scales": quant_scales,
        "fc1_expert_biases": t.get("fc1_bias"),
        "fc2_expert_biases": t.get("fc2_bias"),
        "swiglu_alpha": t.get("swiglu_alpha"),
        "swiglu_beta": t.get("swiglu_beta"),
        "swiglu_limit": t.get("swiglu_limit"),
        "ep_size": prepared.meta["ep_size"],
        "ep_rank": prepared.meta["ep_rank"],
        "activation_type": activation_type,
        "enable_pdl": prepared.meta.get("enable_pdl", False),
        "use_deepseek_fp8_block_scale": name == "fp8_block",
        "use_w4_group_scaling": name == "mxfp4",
    }


def flashinfer_kwargs(
    spec: MoESpec,
    x: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    activation_type: Any,
    profile_ids: list[int] | None,
) -> dict[str, Any]:
    """Keyword arguments of ``flashinfer.fused_moe.cutlass_fused_moe`` for one planned call.

    ``x`` is the kernel's input (already fp8-quantized for fp8); ``activation_type``
    FlashInfer's enum member for ``prepared.meta["activation"]``;
    ``profile_ids`` ``[gemm1, gemm2]`` tactics (fp8_block: always :data:`FIXED_TACTICS`;
    ``None``: FlashInfer's autotuner picks, a per-call lookup).
    """
    kw = layer_kwargs(spec, prepared, activation_type)
    _call_kwargs(kw, x, topk_weights, topk_ids, out)
    kw["profile_ids"] = FIXED_TACTICS if spec.quant.name == "fp8_block" else profile_ids
    return kw


def _call_kwargs(
    kw: dict[str, Any], x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor
) -> None:
    """The per-call arguments, into ``kw``."""
    kw["input"] = x
    kw["token_selected_experts"] = _as(topk_ids, torch.int32)
    kw["token_final_scales"] = _as(topk_weights, torch.float32)
    kw["output"] = out


_ACT: dict[int, Any] = {}


@functools.cache
def _flashinfer() -> tuple[Callable[..., Any], Any]:
    """``(cutlass_fused_moe, ActivationType)`` (imports FlashInfer on first use)."""
    from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

    _ACT.update({v: ActivationType(v) for v in ACTIVATION_TYPES.values()})
    return cutlass_fused_moe, ActivationType


#: FlashInfer versions whose ``cutlass_fused_moe`` wrapper was read and found to do nothing on a
#: planned call that the plugin has not done already (argument checks, a missing ``output``,
#: ``enable_pdl=None``, the trace hook, entering ``input.device``): there the plugin calls the
#: compiled module's entry behind it directly (``MOE_NVIDIA_MODULE_CALL=0``: the public call always).
MODULE_CALL_VERSIONS = frozenset({"0.7.2"})


def module_entry(device: torch.device, keys: Any) -> Callable[..., Any] | None:
    """The compiled module's ``cutlass_fused_moe`` that FlashInfer's public function calls for
    ``device``'s arch (``flashinfer.fused_moe.core.get_cutlass_fused_moe_module``), or ``None``
    where this FlashInfer is not in :data:`MODULE_CALL_VERSIONS` or the entry does not take
    every keyword in ``keys``."""
    import flashinfer
    from flashinfer.fused_moe import core

    if getattr(flashinfer, "__version__", None) not in MODULE_CALL_VERSIONS:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    fn = core.get_cutlass_fused_moe_module(f"{major * 10 + minor}").cutlass_fused_moe
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if set(keys) <= set(params) else None


_CALL_KEYS = ("input", "token_selected_experts", "token_final_scales", "output", "profile_ids")


def _module_call(layer: dict[str, Any]) -> tuple[Callable[..., Any], int | None] | None:
    """For a layer on a CUDA device, unless ``MOE_NVIDIA_MODULE_CALL=0``: ``(module entry, device
    index to compare with the current device on each call, or None with one device)``."""
    device = layer["fc1_expert_weights"].device
    if getenv("MOE_NVIDIA_MODULE_CALL", "1") == "0" or device.type != "cuda":
        return None
    entry = module_entry(device, [*layer, *_CALL_KEYS])
    if entry is None:
        return None
    return entry, (device.index or 0) if torch.cuda.device_count() > 1 else None


def _resolve_tactics(spec: MoESpec, prepared: PreparedWeights) -> tuning.Resolved | None:
    """The layer's tuned buckets from the tune cache, resolved once per prepared layer (kept in
    ``prepared.meta["_tactics"]``); warns once when the layer is untuned."""
    if "_tactics" not in prepared.meta:
        device_name = prepared.meta.get("device_name", "")
        resolved = prepared.meta["_tactics"] = tuning.resolve(spec, device_name)
        if resolved is None:
            warnings.warn(
                f"{KERNEL}: no tuned tactics for {spec.describe()} in {tuning.cache_path(device_name)}; "
                "FlashInfer's default tactic can be 4-5x slower at T >= 32: run `moe tune` for this layer",
                stacklevel=5,
            )
    return prepared.meta["_tactics"]


def kernel_input(spec: MoESpec, hidden_states: torch.Tensor, prepared: PreparedWeights) -> torch.Tensor:
    """What FlashInfer takes as ``input``: ``hidden_states``; for fp8 its e4m3 quantization with the
    static per-tensor scale ``fc1_input_scale`` (saturating at +-448); for mxfp4 padded to ``Hp``
    columns (:func:`.mxfp4.pad_input`)."""
    if spec.quant.name == "mxfp4":
        return mxfp4.pad_input(spec, hidden_states)
    if spec.quant.name != "fp8":
        return hidden_states
    scale = prepared.tensors["fc1_input_scale"]
    kept = prepared.cache.get(_INPUT_SCALE)
    if kept is None or kept[0] is not scale:  # a [1] view: divides a bf16/fp16 input in float32
        kept = prepared.cache[_INPUT_SCALE] = (scale, scale.reshape(1))
    # three launches (each costs host time on an eager call): the quotient, in float32, clamped in place
    return torch.div(hidden_states, kept[1]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


_INPUT_SCALE = "nvidia.cutlass.input_scale"


def _layer_call(
    spec: MoESpec, prepared: PreparedWeights
) -> tuple[dict[str, Any], list[int], Callable | None, Callable | None, tuple | None]:
    """``(layer_kwargs, default tactics, tactics picker or None, input transform or None, module
    call or None)``, built on
    the first call and kept in ``prepared.cache`` with the ``version`` of the tensors they came from
    (rebuilt when one is replaced, and on every call where the tensors are a plain dict). The
    picker maps ``T`` to the tune cache's tactics of its bucket (:func:`.tuning.pick`); the
    transform is :func:`kernel_input` where the input is not passed as it is (fp8, mxfp4); the
    module call is :func:`_module_call`'s."""
    t = prepared.tensors
    hit = prepared.cache.get(KERNEL)
    version = getattr(t, "version", None)  # (moe_core.planner.TensorDict: changes with the items)
    if hit is not None and hit[0] == version and version is not None:
        return hit[1]
    _flashinfer()  # (fills _ACT)
    kw = layer_kwargs(spec, prepared, _ACT[prepared.meta["activation"]])
    resolved = None if spec.quant.name == "fp8_block" else _resolve_tactics(spec, prepared)
    pick = None if resolved is None else tuning.picker(resolved)
    transform = kernel_input if spec.quant.name in ("fp8", "mxfp4") else None
    # fp8_block: its one tactic (FIXED_TACTICS), never tuned
    call = (kw, DEFAULT_TACTICS, pick, transform, _module_call(kw))
    prepared.cache[KERNEL] = (version, call)
    return call


_I32, _F32 = torch.int32, torch.float32


def apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Run FlashInfer's cutlass fused MoE into ``out [T, H]`` (no host synchronisation).

    Tactics: the tune cache's for the bucket of ``T``, else :data:`DEFAULT_TACTICS`. mxfp4 with
    ``H % 128 != 0`` runs on a padded input into a padded buffer, copied into ``out``. With FlashInfer
    in :data:`MODULE_CALL_VERSIONS`, on the layer's own device, the compiled module's entry is called
    without FlashInfer's Python wrapper (``MOE_NVIDIA_MODULE_CALL=0``: the public call).
    """
    layer, tactics, pick, transform, module = _layer_call(spec, prepared)
    if module is not None and (module[1] is None or module[1] == torch.cuda.current_device()):
        fn = module[0]
    else:
        fn = _flashinfer()[0]
    x = hidden_states if transform is None else transform(spec, hidden_states, prepared)
    dst = (
        out if x is hidden_states or x.shape[1] == spec.hidden_size else out.new_empty(x.shape[0], x.shape[1])
    )
    # (what _call_kwargs does, inline: this is the per-call host path)
    if topk_ids.dtype is not _I32 or not topk_ids.is_contiguous():
        topk_ids = topk_ids.to(_I32).contiguous()
    if topk_weights.dtype is not _F32 or not topk_weights.is_contiguous():
        topk_weights = topk_weights.to(_F32).contiguous()
    fn(
        **layer,
        input=x,
        token_selected_experts=topk_ids,
        token_final_scales=topk_weights,
        output=dst,
        profile_ids=tactics if pick is None else pick(x.shape[0]),
    )
    if dst is not out:
        out.copy_(dst[:, : out.shape[1]])


#: Priority of the schemes where this plugin's path is measured slower than the portable
#: Triton kernel (priority 50): fp8_block on the H200, deepseek-v3-tp8, 1.4-2.5x slower at every
#: T from 1 to 2048 (benchmarks/results/h200-nvidia-fp8-block-2026-12-04.md). Still usable with
#: ``backend=`` or through a ``moe tune`` dispatch table.
SLOWER_THAN_PORTABLE = {"fp8_block": 40}


def rank(spec: MoESpec, device: DeviceInfo) -> int:
    """This kernel's priority for ``spec``: :data:`PRIORITY_CUTLASS`, lower where measured slower."""
    return SLOWER_THAN_PORTABLE.get(spec.quant.name, PRIORITY_CUTLASS)


def _prepare_entry(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> PreparedWeights:
    prepared = prepare(spec, weights, device)
    if not device.simulated and device.device.type == "cuda" and torch.cuda.is_available():
        prepared.meta["device_name"] = torch.cuda.get_device_name(device.device)
    return prepared


def kernel_entries() -> list[KernelEntry]:
    """The cutlass kernel of this plugin."""
    return [
        KernelEntry(
            name=KERNEL,
            family="experts",
            apply=apply,
            prepare=_prepare_entry,
            supports=supports,
            quant=frozenset(_QUANTS),
            activations=frozenset(ACTIVATION_TYPES),
            features=frozenset({"bias", "expert_parallel"}),
            capability="cuda>=9.0",
            priority=PRIORITY_CUTLASS,
            rank=rank,
            description="FlashInfer cutlass fused MoE (SM90+): bf16/fp16, fp8 per-tensor; SM90: fp8_block "
            "(DeepGEMM), mxfp4 W4A16; silu/gelu/swiglu_oai/relu2; biases; EP by equal slices; tactics from the "
            "`moe tune` cache",
        )
    ]
