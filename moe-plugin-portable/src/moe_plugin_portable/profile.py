"""Offline compile profiles of every Triton kernel config this plugin launches: registers, spills, LDS.

"Portable" is checked, not assumed. For a GPU that is not here (AMD ``gfx950`` by
default), every launch the plugin makes for the model presets, dtypes and token
counts asked for is compiled with ``triton.compile`` and a ``GPUTarget`` (no
device, no driver), and the compiled code is read back::

    python -m moe_plugin_portable.profile --target gfx950 [--models a,b] [--dtypes bf16,fp16]
        [--quant fp8,fp8_tensor,fp8_block,mxfp4,mxfp4_w4a8]

prints one row per distinct compiled kernel and exits 1 when any of them spills
registers, uses scratch memory, exceeds the target's shared memory (LDS) or
fails to compile.

How it works:

1. :func:`launch_configs` builds the launches with the plugin's own launch code
   (:func:`experts.fused_moe_launches` after :func:`sorting.sorting_launches`,
   :func:`routing.routing_launch`) on ``meta`` tensors, with the config that
   :func:`configs.heuristic_config` (or a shipped tuned table for the target's
   GPU) gives for the target's CU/SM count, plus the decode path's two launches
   where ``configs.use_decode`` (or the table) takes it for that ``T`` (the
   sorted path's launches stay in the set at every ``T``: they run with
   ``MOE_PORTABLE_DECODE=0`` and wherever a table turns decode off). Quantized layers (``--quant``,
   :data:`experts.QUANT_VARIANTS`; the CLI compiles them all by default, with
   the first of ``--dtypes``) add their pre-pass and GEMM variants. Launches that Triton would compile
   to the same kernel (same constexprs, options, argument types and
   specialization: 16-divisibility, value 1, the 2 GB buffer-range of AMD) are
   merged; each keeps the list of (model, dtype, T) that launch it. Another
   plugin profiles its own launches the same way with :func:`merge_launches`
   (``moe amd profile`` does).
2. :func:`compile_profile` compiles them in worker subprocesses (one per core),
   each specialising the arguments exactly as a launch does (Triton's own
   binder) and compiling. Workers run without ``TRITON_INTERPRET``: Triton
   decides at import time whether ``@triton.jit`` makes compilable or
   interpreted functions, so a process that imported Triton under the
   interpreter (the CPU test session) cannot compile; the caller's environment
   is left untouched.
3. Results are cached as JSON under ``$MOE_PROFILE_CACHE`` (default
   ``~/.cache/moe-kernels/profile``), keyed by the kernel module's source,
   the launch, the target, the Triton version and Triton's environment knobs.

What is read back. AMD (from the AMDGCN text): ``.vgpr_count`` (arch VGPRs +
AGPRs), ``; NumVgprs``, ``; NumAgprs``, ``.sgpr_count``, ``.vgpr_spill_count``,
``.sgpr_spill_count``, ``.private_segment_fixed_size`` (scratch per lane),
``.group_segment_fixed_size`` (LDS), LLVM's ``; Occupancy`` and the number of
``v_mfma`` instructions. NVIDIA (``ptxas -v``, which Triton runs): registers,
spill store/load bytes, stack frame; shared memory from Triton's metadata; the
``mma``/``wgmma`` instructions of the PTX. Both: the machine instructions of the
largest loop body (``loop``: the K loop's instructions per step; NVIDIA from the SASS
of Triton's ``nvdisasm``), the figure a change of a kernel's inner arithmetic moves.

Occupancy estimate (waves per SIMD, CDNA3/CDNA4: gfx942, gfx950). A SIMD has a
unified file of 512 VGPRs per lane shared by arch VGPRs and AGPRs and runs at
most 8 waves. A wave allocates ``align(align(vgpr, 4) + agpr, 8)`` registers
(``align(vgpr, 8)`` without AGPRs), so ``waves_vgpr = 512 // alloc``. LDS:
``lds_per_cu // lds`` workgroups of ``num_warps`` waves share a CU's 4 SIMDs,
``waves_lds = workgroups * num_warps // 4``. The estimate is
``min(8, waves_vgpr, waves_lds)``. LLVM's ``; Occupancy`` is reported next to
it (in parentheses where it differs): it also counts SGPRs, but not Triton's
shared memory, which is dynamic LDS sized at launch (so for kernels with LDS
the estimate is the tighter one). NVIDIA: warps per SM sub-partition, from 64K
registers per SM (allocated per warp in units of 256), the shared memory per SM
and 16 warps per scheduler.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, MoESpec
from moe_core.presets import PRESETS, ModelPreset

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_QUANTS",
    "DEFAULT_TOKENS",
    "TARGETS",
    "CompilePool",
    "LaunchConfig",
    "Profile",
    "Target",
    "compile_profile",
    "format_table",
    "launch_configs",
    "loop_instructions_amdgcn",
    "loop_instructions_sass",
    "main",
    "merge_launches",
    "warm_cache",
]

DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
#: quantized variants the CLI compiles by default (``experts.QUANT_VARIANTS``)
DEFAULT_QUANTS = ("fp8", "fp8_tensor", "fp8_block", "mxfp4", "mxfp4_w4a8")
#: the real models' layers (the ``tiny-*`` presets are CPU-test shapes; ``--models all`` adds them)
DEFAULT_MODELS = tuple(name for name in PRESETS if not name.startswith("tiny-"))
SORTING_OPS = ("align_block_size", "moe_sorting", "ragged_metadata")
#: ``moe_sorting``'s unit size (its default, aiter's)
MOE_SORTING_UNIT = 32
#: bump when the cached result's fields or their meaning change
_SCHEMA = 3
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv",
}
#: environment variables that change what Triton compiles (part of the cache key)
_ENV_PREFIXES = ("TRITON_", "AMDGCN_", "MLIR_", "LLVM_", "DISABLE_LLVM_OPT", "NVPTX_", "PTXAS_")
_ENV_IGNORED = (
    "TRITON_INTERPRET",
    "TRITON_CACHE_DIR",
    "TRITON_HOME",
    "TRITON_DUMP_DIR",
    "TRITON_OVERRIDE_DIR",
)


@dataclass(frozen=True)
class Target:
    """A GPU to compile for: Triton's ``GPUTarget`` plus the facts the heuristic and the checks need."""

    name: str
    backend: str  # "hip" or "cuda"
    arch: str | int  # "gfx950" / 90
    warp_size: int
    num_sms: int  # CUs / SMs: heuristic_config's num_sms
    lds_bytes: int  # shared memory (LDS) one workgroup may use
    lds_per_cu: int  # shared memory (LDS) of one CU / SM
    device_names: tuple[str, ...] = ()  # tuned tables (configs/<device>.json) that apply to it

    @property
    def is_amd(self) -> bool:
        return self.backend == "hip"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gfx950", "hip", "gfx950", 64, 256, 160 * 1024, 160 * 1024, ("MI350", "MI355")),
        Target("gfx942", "hip", "gfx942", 64, 304, 64 * 1024, 64 * 1024, ("MI300", "MI325")),
        Target("sm90", "cuda", 90, 32, 132, 227 * 1024, 228 * 1024, ("H100", "H200", "H800", "H20")),
        Target("sm100", "cuda", 100, 32, 148, 227 * 1024, 228 * 1024, ("B200", "B300")),
    )
}


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel compile the plugin can launch (launches that compile to the same kernel merged).

    ``signature``/``specialization`` per runtime argument: the Triton type (``*bf16``, ``i32``,
    ``fp32``) and the specialization letters (``D`` divisible by 16, ``S`` within the 2 GB
    buffer range, ``1`` the value 1). ``args`` are one representative launch's arguments in
    JSON form (tensors as dtype and whether they are within 2 GB).
    """

    module: str
    kernel: str
    label: str
    signature: tuple[tuple[str, str], ...]
    specialization: tuple[str, ...]
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]
    args: tuple[Any, ...]
    users: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """What makes two launches one compiled kernel (the dedupe and the cache key)."""
        sig = [f"{name}:{ty}:{spec}" for (name, ty), spec in zip(self.signature, self.specialization)]
        return json.dumps([self.module, self.kernel, sig, self.constexprs, self.options], default=str)

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", 4)

    @property
    def num_stages(self) -> int | None:
        return dict(self.options).get("num_stages")


@dataclass(frozen=True)
class Profile:
    """What the compiler made of one :class:`LaunchConfig` for one target.

    ``vgpr``: arch VGPRs (AMD) or registers per thread (NVIDIA); ``agpr``: accumulation
    VGPRs (AMD); ``sgpr``: scalar registers (AMD); ``vgpr_spills``/``sgpr_spills``: spilled
    registers (AMD ``.vgpr_spill_count``/``.sgpr_spill_count``; NVIDIA: spill store + load
    bytes in ``vgpr_spills``); ``scratch_bytes``: private (scratch) memory per lane / stack
    frame per thread; ``lds_bytes``: shared memory per workgroup; ``occupancy``: the
    estimate of the module docstring (waves per SIMD / warps per scheduler);
    ``compiler_occupancy``: LLVM's (AMD); ``mfma``: matrix-core instructions (``v_mfma`` on
    AMD, ``mma``/``wgmma`` in the PTX on NVIDIA); ``mfma_scaled``/``cvt_scaled``: CDNA4
    microscaling instructions: scaled MFMAs (``v_mfma_scale_f32_*``) and scaled fp4 upcasts
    (``v_cvt_scalef32_pk_*_fp4``), AMD only; ``loop_instructions``: machine instructions in
    the kernel's largest loop body (the K loop: per step, the figure a change of the inner
    arithmetic moves), from the SASS (NVIDIA, Triton's ``nvdisasm``) or the AMDGCN; 0 when the
    kernel has no loop or the SASS is not available.
    """

    kernel: str
    config: str
    target: str
    num_warps: int
    num_stages: int | None
    vgpr: int
    agpr: int
    sgpr: int
    vgpr_spills: int
    sgpr_spills: int
    scratch_bytes: int
    lds_bytes: int
    lds_limit: int
    occupancy: int
    compiler_occupancy: int | None
    mfma: int
    users: tuple[str, ...] = ()
    mfma_scaled: int = 0
    cvt_scaled: int = 0
    loop_instructions: int = 0
    compile_s: float = 0.0
    cached: bool = False
    error: str | None = None
    launch: LaunchConfig | None = field(default=None, repr=False, compare=False)

    @property
    def spills(self) -> int:
        return self.vgpr_spills + self.sgpr_spills

    def problems(self) -> list[str]:
        """Why this kernel fails the gate (empty: it passes)."""
        if self.error:
            return [f"compile error: {self.error.strip().splitlines()[-1][:200]}"]
        out = []
        if self.vgpr_spills:
            amd = self.target in TARGETS and TARGETS[self.target].is_amd
            out.append(f"{self.vgpr_spills} VGPR spills" if amd else f"{self.vgpr_spills} B spilled")
        if self.sgpr_spills:
            out.append(f"{self.sgpr_spills} SGPR spills")
        if self.scratch_bytes:
            out.append(f"{self.scratch_bytes} B scratch")
        if self.lds_bytes > self.lds_limit:
            out.append(f"LDS {self.lds_bytes} B > {self.lds_limit} B")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


# ----------------------------------------------------------------------------- launches


def _target(target: Target | str) -> Target:
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS[target]


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _int_type(v: int) -> str:
    if -(2**31) <= v < 2**31:
        return "i32"
    return "i64" if -(2**63) <= v < 2**63 else "u64"


def _unspecialized(kernel: Any) -> tuple[set[str], set[str]]:
    """Arguments the kernel does not specialise at all, and not on alignment (``@triton.jit`` options)."""
    kw = getattr(kernel, "kwargs", None) or {}  # an InterpretedFunction keeps them here

    def names(attr: str) -> set[str]:
        value = getattr(kernel, attr, None) if not kw else kw.get(attr)
        return {kernel.arg_names[n] if isinstance(n, int) else n for n in value or ()}

    return names("do_not_specialize"), names("do_not_specialize_on_alignment")


def _describe_arg(value: Any, specialize: bool = True, align: bool = True) -> tuple[str, str, Any]:
    """``(type, specialization, JSON form)`` of one runtime argument, as Triton specialises it."""
    if isinstance(value, torch.Tensor):
        small = value.untyped_storage().nbytes() <= 2**31 - 1
        aligned = align and value.data_ptr() % 16 == 0  # meta tensors: 0; GPU allocations: 256-aligned
        ty = "*" + _TYPE_NAMES[value.dtype]
        spec = ("D" if aligned else "") + ("S" if small else "")
        return ty, spec, {"tensor": str(value.dtype).removeprefix("torch."), "small": small}
    if isinstance(value, bool):
        return "i1", "", value
    if isinstance(value, int):
        if not specialize:
            return _int_type(value), "", value
        return _int_type(value), "1" if value == 1 else ("D" if align and value % 16 == 0 else ""), value
    if isinstance(value, float):
        return "fp32", "", value
    if value is None:
        return "none", "", None
    raise TypeError(f"cannot describe kernel argument {value!r}")


_ABBREV = {
    "BLOCK_M": "M",
    "BLOCK_N": "N",
    "BLOCK_K": "K",
    "GROUP_M": "G",
    "TOP_K": "k",
    "K": "k",
    "E": "E",
    "E_PAD": "E",
    "N_SHARED": "shared",
    "GROUPS": "groups",
    "TOPK_GROUP": "keep",
    "BLOCK_T": "T",
    "BLOCK_S": "S",
    "BLOCK": "B",
    "BT": "BT",
    "TC": "TC",
    "BC": "BC",
    "SC": "SC",
    "MAP": "map",
}
_SKIP = {"BLOCK_G", "BLOCK_EG", "LOG_BT", "LOG_E", "UPCAST", "GATED"}
#: fp8_block's scale block (GEMM constexprs), shown as ``blk128x128`` when quantized in blocks
_GROUPS = ("GROUP_N", "GROUP_K")


def _label(
    constexprs: dict[str, Any],
    names: dict[str, dict[int, str]],
    dtype: str,
    signature: list[tuple[str, str]],
    specialization: list[str],
    unspecialized: set[str],
) -> str:
    """``dtype constexprs... [specialization]``; the specialization lists only what differs from
    the usual (pointers 16-aligned within 2 GB, integers multiples of 16): ``T=1`` (the value 1),
    ``K%16`` (not a multiple of 16), ``w_ptr>2G`` (beyond the 32-bit buffer range). Strides are
    left out (fixed by the layouts, the same in every row); the dedupe key keeps them."""
    parts = []
    for key, value in constexprs.items():
        if key in _SKIP:
            continue
        if key in _GROUPS:
            if key == "GROUP_K" and value > 1:
                parts.append(f"blk{constexprs.get('GROUP_N', 1)}x{value}")
            continue
        if key in names:
            name = names[key].get(value, f"{key}={value}")
            parts += [name] if name else []
        elif isinstance(value, bool):
            if value:
                parts.append(key.lower().replace("has_", ""))
        elif key == "MAP":
            if value:
                parts.append(("", "map", "mask")[value])
        elif key in _ABBREV:
            parts.append(f"{_ABBREV[key]}{value}")
        else:
            parts.append(f"{key}={value}")
    special = []
    for (name, ty), spec in zip(signature, specialization):
        if name in unspecialized or re.fullmatch(r"stride\w*|w?s\d", name):
            continue
        if ty.startswith("*"):
            special += [f"{name}>2G"] if "S" not in spec else []
        elif ty in ("i32", "i64", "u64"):
            special += [f"{name}=1"] if spec == "1" else [f"{name}%16"] if spec == "" else []
    return " ".join([dtype, *parts, *(["[" + " ".join(special) + "]"] if special else [])])


def _launch_config(launch: tuple[Any, Any, tuple[Any, ...], dict[str, Any]], user: str) -> LaunchConfig:
    kernel, _grid, args, kwargs = launch
    fn = getattr(kernel, "fn", kernel)
    arg_names = list(kernel.arg_names)
    constexprs = {k: v for k, v in kwargs.items() if k in arg_names}
    options = {k: v for k, v in kwargs.items() if k not in arg_names}
    positional = [n for n in arg_names if n not in constexprs][: len(args)]
    fixed, unaligned = _unspecialized(kernel)
    described = [_describe_arg(a, n not in fixed, n not in unaligned) for n, a in zip(positional, args)]
    module = importlib.import_module(fn.__module__)
    names = {
        key: {v: k for k, v in table.items()}
        for key, table in (
            ("ACTIVATION", getattr(module, "ACTIVATIONS", {})),
            ("METHOD", getattr(module, "METHODS", {})),
            ("OP", getattr(module, "OPS", {})),
        )
        if table
    }
    names.update(getattr(module, "CONSTEXPR_NAMES", {}))
    dtype = next((ty[1:] for ty, _, _ in described if ty.startswith("*")), "")
    signature = [(n, ty) for n, (ty, _, _) in zip(positional, described)]
    specialization = [spec for _, spec, _ in described]
    return LaunchConfig(
        module=fn.__module__,
        kernel=fn.__name__,
        label=_label(constexprs, names, dtype, signature, specialization, fixed | unaligned),
        signature=tuple(signature),
        specialization=tuple(specialization),
        constexprs=tuple(constexprs.items()),
        options=tuple(sorted(options.items())),
        args=tuple(js for _, _, js in described),
        users=(user,),
    )


def _preset(model: str | ModelPreset) -> ModelPreset:
    if isinstance(model, ModelPreset):
        return model
    if model not in PRESETS:
        raise ValueError(f"unknown model preset {model!r}; known: {', '.join(PRESETS)}")
    return PRESETS[model]


def _tuned_tables(target: Target) -> list[dict[str, Any]]:
    """Tuned tables (``configs/<device>.json``, ``MOE_PORTABLE_CONFIG_DIR``) of the target's GPUs."""
    from .configs import _PACKAGE_DIR

    tables = []
    for folder in (os.environ.get("MOE_PORTABLE_CONFIG_DIR"), _PACKAGE_DIR):
        if not folder or not Path(folder).is_dir():
            continue
        for path in sorted(Path(folder).glob("*.json")):
            data = json.loads(path.read_text())
            device = str(data.get("device", path.stem))
            if any(tag.lower() in device.lower() for tag in target.device_names):
                tables.append(data.get("configs", {}))
    return tables


def _moe_config(spec: MoESpec, num_tokens: int, target: Target, tables: list[dict[str, Any]], num_sms: int):
    """What ``configs.lookup_config`` picks on the target: a tuned entry, else the heuristic."""
    from .configs import MoEConfig, heuristic_config, layer_key, t_bucket

    for table in tables:
        entry = table.get(layer_key(spec), {}).get(t_bucket(num_tokens))
        if entry is not None:
            return MoEConfig.from_json(entry)
    return heuristic_config(spec, num_tokens, num_sms, target.is_amd)


def _decode_config(
    spec: MoESpec, num_tokens: int, target: Target, tables: list[dict[str, Any]], num_sms: int
):
    """The decode config ``configs.lookup_decode`` can pick on the target, eager (the rule) or
    captured (a tuned ``"use": true``); ``None``: the sorted path only. The heuristic's tiles
    on the Triton kernels: its ``sm90`` choice of the Gluon tensor-core kernels is profiled by
    ``tests/portable/test_profile.py``'s sm_90 compiles instead (these profiles are of
    ``@triton.jit`` kernels)."""
    from .configs import DecodeConfig, decode_heuristic, layer_key, t_bucket, use_decode

    override: dict[str, Any] = {}
    for table in tables:
        entry = table.get(layer_key(spec), {}).get(t_bucket(num_tokens))
        if entry is not None:
            override = entry.get("decode") or {}
            break
    if not (override.get("use") or use_decode(num_tokens, spec.top_k, spec.num_experts)):
        return None
    if "gemm1" in override and "gemm2" in override:
        return DecodeConfig.from_json(override)
    return decode_heuristic(spec, num_tokens, num_sms, target.is_amd)


def _meta_weights(spec: MoESpec) -> ExpertWeights:
    """Canonical weights of ``spec`` (stored per its quant scheme, with scales) on the meta device."""
    L, H, inter, N1 = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.w13_rows
    scheme = spec.quant
    w = ExpertWeights(
        w13=_meta(L, N1, H, dtype=scheme.weight_dtype), w2=_meta(L, H, inter, dtype=scheme.weight_dtype)
    )
    if scheme.name == "fp8":
        per_tensor = scheme.weight_scale == "per_tensor"
        w.w13_scale = _meta(L, *(() if per_tensor else (N1,)), dtype=torch.float32)
        w.w2_scale = _meta(L, *(() if per_tensor else (H,)), dtype=torch.float32)
    elif scheme.name == "fp8_block":
        bn, bk = scheme.block_shape
        w.w13_scale = _meta(L, -(-N1 // bn), -(-H // bk), dtype=torch.float32)
        w.w2_scale = _meta(L, -(-H // bn), -(-inter // bk), dtype=torch.float32)
    elif scheme.name == "mxfp4":
        w.w13, w.w2 = _meta(L, N1, H // 2, dtype=torch.uint8), _meta(L, H, inter // 2, dtype=torch.uint8)
        w.w13_scale = _meta(L, N1, H // 32, dtype=torch.uint8)
        w.w2_scale = _meta(L, H, inter // 32, dtype=torch.uint8)
    if scheme.static_activation_scale:
        w.a13_scale, w.a2_scale = _meta(1, dtype=torch.float32), _meta(1, dtype=torch.float32)
    if spec.has_bias:
        w.b13 = _meta(L, N1, dtype=spec.dtype)
        w.b2 = _meta(L, H, dtype=spec.dtype)
    return w


def _expert_launches(
    spec: MoESpec, T: int, cfg: Any, ops: Sequence[str], decode: Any = None, nvidia: bool = False
) -> list[Any]:
    """The sorting launches (``ops``) and the fused MoE's, as ``moe_apply`` makes them, on meta tensors;
    with ``decode`` (a ``DecodeConfig``) also the decode path's launches. ``nvidia``: the
    choices made from a CUDA device (meta tensors have none) as on one: ``MX_PTX``, the chained
    decode launch's L2 prefetch."""
    from . import experts, sorting

    weights = _meta_weights(spec)
    tensors = experts._prepare(spec, weights, None)  # what plan.prepare() hands to fused_moe
    H = spec.hidden_size
    x, out = _meta(T, H, dtype=spec.dtype), _meta(T, H, dtype=spec.dtype)
    topk_weights = _meta(T, spec.top_k, dtype=torch.float32)
    topk_ids = _meta(T, spec.top_k, dtype=torch.int32)
    emap = tensors.get("expert_map")
    launches = []
    outs, sort = sorting.sorting_launches(
        "align_block_size", topk_ids, num_experts=spec.num_experts, block=cfg.block_m, expert_map=emap
    )
    if "align_block_size" in ops:
        launches += sort
    blocks = experts.SortedBlocks(outs["ids"], outs["blk"], outs["num"], cfg.block_m)
    launches += experts.fused_moe_launches(
        spec, x, tensors, topk_weights, topk_ids, out, cfg, blocks, interpret=False
    )
    if nvidia:
        for _kernel, _grid, _args, kwargs in launches:
            if "MX_PTX" in kwargs:
                kwargs["MX_PTX"] = experts._mx_ptx(spec, x.device, False, nvidia=True)
    if decode is not None:
        launches += experts.decode_launches(
            spec,
            x,
            tensors,
            topk_weights,
            topk_ids,
            out,
            decode,
            warp_size=32 if nvidia else 64,
            mma=nvidia,
            prefetch=nvidia,
        )
    if "moe_sorting" in ops:
        mask = None if emap is None else _meta(spec.num_experts, dtype=torch.bool)
        launches += sorting.sorting_launches(
            "moe_sorting",
            topk_ids,
            num_experts=spec.num_experts,
            block=MOE_SORTING_UNIT,
            expert_map=mask,
            topk_weights=topk_weights,
        )[1]
    if "ragged_metadata" in ops:
        launches += sorting.sorting_launches(
            "ragged_metadata", topk_ids, num_experts=spec.num_experts, expert_map=emap
        )[1]
    return launches


def _routing_launches(preset: ModelPreset, T: int, logits_dtype: torch.dtype) -> list[Any]:
    from .routing import routing_launch

    routing = preset.routing
    logits = _meta(T, preset.num_experts, dtype=logits_dtype)
    bias = _meta(preset.num_experts, dtype=torch.float32) if routing.method == "biased_grouped" else None
    launch = routing_launch(logits, routing, bias, interpret=False)[2]
    return [launch] if launch is not None else []


def launch_configs(
    target: Target | str = "gfx950",
    models: Iterable[str | ModelPreset] | None = None,
    dtypes: Iterable[torch.dtype | str] = ("bf16", "fp16"),
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    ep_sizes: Iterable[int] = (1,),
    logits_dtypes: Iterable[torch.dtype | str] | None = None,
    sorting_ops: Sequence[str] = SORTING_OPS,
    num_sms: int | None = None,
    quants: Iterable[str] = (),
) -> list[LaunchConfig]:
    """Every distinct kernel compile the plugin launches on ``target`` for these layers and batches.

    ``models``: presets or their names (default: :data:`DEFAULT_MODELS`); ``dtypes``: activation dtypes;
    ``quants``: quantized variants (names of :data:`experts.QUANT_VARIANTS`), each also planned with
    the first of ``dtypes`` (users ``model/dtype/variant/T=..``; a variant the kernel refuses in that
    dtype is skipped);
    ``tokens``: batch sizes ``T``; ``ep_sizes``: expert-parallel sizes (rank 0);
    ``logits_dtypes``: router logits dtypes (default: ``dtypes`` and float32); ``sorting_ops``:
    the sorting contracts to include (``align_block_size`` is the one the fused MoE runs, the
    others run when called through ``moe_core.sorting``); ``num_sms``: override the target's
    CU/SM count. Order: first appearance.
    """
    tgt = _target(target)
    sms = num_sms or tgt.num_sms
    presets = [_preset(m) for m in (DEFAULT_MODELS if models is None else models)]
    dts = [_DTYPES[d] if isinstance(d, str) else d for d in dtypes]
    ldts = [_DTYPES[d] if isinstance(d, str) else d for d in logits_dtypes] if logits_dtypes else []
    if not ldts:
        ldts = list(dict.fromkeys([*dts, torch.float32]))
    tables = _tuned_tables(tgt)
    from . import experts
    from .experts import QUANT_VARIANTS

    unknown = [q for q in quants if q not in QUANT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown quant variant(s) {unknown}; known: {', '.join(QUANT_VARIANTS)}")
    layers = [(d, None) for d in dts] + [(dts[0], q) for q in quants]
    device = DeviceInfo.parse(str(tgt.arch) if tgt.is_amd else f"sm_{tgt.arch}")

    def groups() -> Iterable[tuple[str, list[Any]]]:
        for preset in presets:
            name = preset.name
            for T in tokens:
                for ldt in ldts:
                    yield f"{name}/{_TYPE_NAMES[ldt]}/T={T}", _routing_launches(preset, T, ldt)
                for dtype, quant in layers:
                    for ep in ep_sizes:
                        spec = preset.moe_spec(dtype, QUANT_VARIANTS.get(quant), ep_size=ep, ep_rank=0)
                        if quant and experts._supports(spec, device):
                            continue
                        cfg = _moe_config(spec, T, tgt, tables, sms)
                        decode = _decode_config(spec, T, tgt, tables, sms)
                        user = f"{name}/{_TYPE_NAMES[dtype]}/" + (f"{quant}/" if quant else "") + f"T={T}"
                        yield (
                            user + (f"/ep{ep}" if ep > 1 else ""),
                            _expert_launches(spec, T, cfg, sorting_ops, decode, nvidia=not tgt.is_amd),
                        )

    return merge_launches(groups())


def merge_launches(groups: Iterable[tuple[str, Sequence[Any]]]) -> list[LaunchConfig]:
    """The distinct kernel compiles of ``(user, launches)`` groups, in order of first appearance.

    A launch is ``(kernel, grid, args, kwargs)`` with a ``@triton.jit`` kernel of any
    importable module (another plugin's kernels profile through this too); arguments may be
    ``meta`` tensors. Launches that compile to the same kernel are merged, keeping every user.
    """
    merged: dict[str, LaunchConfig] = {}
    for user, launches in groups:
        for launch in launches:
            cfg = _launch_config(launch, user)
            old = merged.get(cfg.key)
            if old is None:
                merged[cfg.key] = cfg
            elif user not in old.users:
                merged[cfg.key] = dataclasses.replace(old, users=(*old.users, user))
    return list(merged.values())


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$MOE_PROFILE_CACHE``, else ``~/.cache/moe-kernels/profile``."""
    return Path(os.environ.get("MOE_PROFILE_CACHE") or Path.home() / ".cache" / "moe-kernels" / "profile")


def _source_hash(module: str) -> str:
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    if not origin:
        raise ImportError(f"cannot find the source of {module}")
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


def _compile_env() -> dict[str, str]:
    """The caller's environment without the interpreter (what the workers run with)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _cache_key(cfg: LaunchConfig, target: Target, sources: dict[str, str]) -> str:
    env = {
        k: v
        for k, v in sorted(_compile_env().items())
        if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED
    }
    key = [_SCHEMA, sources[cfg.module], cfg.key, dataclasses.astuple(target), dist_version("triton"), env]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()


def _cache_read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cache_write(path: Path, result: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time


# ----------------------------------------------------------------------------- compile


def _occupancy_amd(vgpr: int, agpr: int, lds: int, num_warps: int, lds_per_cu: int) -> int:
    """Waves per SIMD on CDNA3/CDNA4 from the VGPRs and the LDS (see the module docstring)."""

    def align(v: int, a: int) -> int:
        return -(-v // a) * a

    alloc = align(align(max(vgpr, 1), 4) + agpr, 8) if agpr else align(max(vgpr, 1), 8)
    waves = min(8, 512 // alloc)
    if lds:
        groups = lds_per_cu // lds  # a SIMD that holds any of their waves counts as 1
        waves = min(waves, max(1, groups * num_warps // 4) if groups else 0)
    return waves


def _occupancy_nvidia(regs: int, smem: int, num_warps: int, smem_per_sm: int) -> int:
    """Warps per SM sub-partition (4 per SM, 16 warps each at most)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = 65536 // (per_warp * num_warps)
    if smem:
        blocks = min(blocks, smem_per_sm // smem)
    blocks = min(blocks, 32, 64 // num_warps)
    return min(16, blocks * num_warps // 4)


def _parse_amdgcn(asm: str) -> dict[str, int]:
    def meta(key: str, default: int = 0) -> int:
        m = re.search(rf"^\s*\.{key}:\s*(\d+)", asm, re.M)
        return int(m.group(1)) if m else default

    def comment(key: str) -> int | None:
        m = re.search(rf"^; {key}: (\d+)", asm, re.M)
        return int(m.group(1)) if m else None

    total = meta("vgpr_count")
    agpr = comment("NumAgprs")
    agpr = meta("agpr_count") if agpr is None else agpr
    vgpr = comment("NumVgprs")
    return {
        "vgpr": vgpr if vgpr is not None else total - agpr,
        "agpr": agpr,
        "sgpr": meta("sgpr_count"),
        "vgpr_spills": meta("vgpr_spill_count"),
        "sgpr_spills": meta("sgpr_spill_count"),
        "scratch_bytes": meta("private_segment_fixed_size"),
        "lds_bytes": meta("group_segment_fixed_size"),
        "compiler_occupancy": comment("Occupancy"),
        "mfma": len(re.findall(r"^\s*v_mfma\w*", asm, re.M)),
        # CDNA4 microscaling: scaled MFMA, and scaled upcasts of fp4 (v_cvt_scalef32_pk_{bf16,f16,f32}_fp4)
        "mfma_scaled": len(re.findall(r"^\s*v_mfma_scale_\w*", asm, re.M)),
        "cvt_scaled": len(re.findall(r"^\s*v_cvt_scalef32_pk_\w*_fp4\b", asm, re.M)),
    }


def _parse_ptxas(log: str, ptx: str) -> dict[str, int]:
    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "vgpr": num(r"Used (\d+) registers"),
        "agpr": 0,
        "sgpr": 0,
        "vgpr_spills": num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
        "sgpr_spills": 0,
        "scratch_bytes": num(r"(\d+) bytes stack frame"),
        "lds_bytes": 0,
        "compiler_occupancy": None,
        "mfma": len(re.findall(r"^\s*(?:mma|wgmma)\.", ptx, re.M)),
        "mfma_scaled": 0,
        "cvt_scaled": 0,
    }


_SASS_LINE = re.compile(r"^(?:[0-9a-f]{2}|--):[^\t]*\t(.*)$")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?\b(\w+);")
_AMD_BRANCH = re.compile(r"^\s*s_c?branch\w*\s+(\.LBB\w+)")


def _largest_loop(items: list[tuple[str | None, str | None]]) -> int:
    """Instructions in the largest loop of ``items``: ``(label, None)`` marks a label,
    ``(None, target)`` an instruction (``target``: the label it branches to, or ``None``).
    A loop is a branch back to a label above it; its body, the instructions in between."""
    where: dict[str, int] = {}
    count = 0
    best = 0
    for label, target in items:
        if label is not None:
            where[label] = count
            continue
        count += 1
        if target is not None and target in where:
            best = max(best, count - where[target])
    return best


def loop_instructions_sass(sass: str) -> int:
    """:func:`_largest_loop` of ``nvdisasm`` output as Triton prints it (``Function:`` headers,
    ``LBBx:`` labels, instructions after their control codes and a tab)."""
    items: list[tuple[str | None, str | None]] = []
    for line in sass.splitlines():
        text = line.strip()
        if re.fullmatch(r"\.?L\w+:", text):
            items.append((text.rstrip(":"), None))
            continue
        m = _SASS_LINE.match(line)
        if m and m.group(1).strip():
            branch = _SASS_BRANCH.search(m.group(1))
            items.append((None, branch.group(1) if branch else None))
    return _largest_loop(items)


def loop_instructions_amdgcn(asm: str) -> int:
    """:func:`_largest_loop` of an AMDGCN listing (``.LBBx_y:`` labels, ``s_cbranch_*`` / ``s_branch``)."""
    items: list[tuple[str | None, str | None]] = []
    body = asm.split(".section", 1)[0]  # the code, before the metadata sections
    for line in body.splitlines():
        text = line.split(";", 1)[0].strip()
        if not text:
            continue
        if re.fullmatch(r"\.LBB\w+:", text):
            items.append((text.rstrip(":"), None))
        elif re.match(r"[a-z]", text):  # an instruction (directives start with '.', labels end with ':')
            m = _AMD_BRANCH.match(text)
            items.append((None, m.group(1) if m else None))
    return _largest_loop(items)


def _materialize(arg: Any) -> Any:
    if isinstance(arg, dict) and "tensor" in arg:
        dtype = getattr(torch, arg["tensor"])
        size = torch.empty((), dtype=dtype).element_size()
        return _meta(16 if arg["small"] else 2**31 // size + 1, dtype=dtype)
    return arg


_BINDERS: dict[Any, Any] = {}


def _compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one launch in this (interpreter-free) process and read the result back."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    warm = "gpu" in job  # warm_cache's job: compile into Triton's cache as a launch would, no report
    if warm:
        backend, arch, warp_size = job["gpu"]
        target = Target(f"{backend}:{arch}", backend, arch, warp_size, 0, 0, 0)
    else:
        target = Target(**job["target"])
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{job['kernel']} is {type(fn).__name__}: is TRITON_INTERPRET set in the worker?")
    gpu = GPUTarget(target.backend, target.arch, target.warp_size)
    key = (job["module"], job["kernel"], target.name)
    if key not in _BINDERS:
        backend = make_backend(gpu)
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[key]
    # what JITFunction.run does before compiling
    kwargs = {**dict(job["constexprs"]), **dict(job["options"])}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    args = [_materialize(a) for a in job["args"]]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (moe amd profile's)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    src = source(fn, signature, constexprs, attrs)
    start = time.perf_counter()
    if warm:
        triton.compile(src, target=gpu, options=options.__dict__)
        return {"compile_s": round(time.perf_counter() - start, 3)}
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        if target.backend == "cuda":  # ptxas -v's report: printed by Triton, only when it runs ptxas
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=gpu, options=options.__dict__)
    elapsed = time.perf_counter() - start
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    if target.backend == "hip":
        result = _parse_amdgcn(compiled.asm["amdgcn"])
        result["loop_instructions"] = loop_instructions_amdgcn(compiled.asm["amdgcn"])
        result["lds_bytes"] = max(result["lds_bytes"], shared)
        result["occupancy"] = _occupancy_amd(
            result["vgpr"],
            result["agpr"],
            result["lds_bytes"],
            options.num_warps,
            target.lds_per_cu,
        )
    else:
        result = _parse_ptxas(log.getvalue(), compiled.asm["ptx"])
        try:  # nvdisasm (Triton ships it) reads the cubin
            result["loop_instructions"] = loop_instructions_sass(compiled.asm["sass"])
        except Exception:
            result["loop_instructions"] = 0
        result["lds_bytes"] = shared
        result["occupancy"] = _occupancy_nvidia(result["vgpr"], shared, options.num_warps, target.lds_per_cu)
    result["compile_s"] = round(elapsed, 3)
    result["num_stages"] = getattr(options, "num_stages", None)
    result["num_warps"] = options.num_warps
    return result


def _worker() -> int:
    """``--worker``: JSON jobs on stdin, one JSON result per line on stdout."""
    import traceback
    import warnings

    warnings.simplefilter("ignore")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = _compile_job(job)
        except Exception:
            result = {"error": traceback.format_exc()}
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


class CompilePool:
    """Worker subprocesses (``python -m moe_plugin_portable.profile --worker``, without
    ``TRITON_INTERPRET``) that compile jobs; kept between :meth:`run` calls, started on the first.
    Use as a context manager (or :meth:`close` it)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._procs: list[tuple[subprocess.Popen, Any]] = []

    def __enter__(self) -> CompilePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> tuple[subprocess.Popen, Any]:
        errlog = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the worker's stderr, closed by close())
        proc = subprocess.Popen(
            [sys.executable, "-m", "moe_plugin_portable.profile", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            env=_compile_env(),
            text=True,
        )
        return proc, errlog

    def run(self, jobs: list[dict[str, Any]], retry: bool = True) -> list[dict[str, Any]]:
        """Compile ``jobs``, biggest first (``cost``), one per worker at a time; a worker that dies
        is replaced, its job reported with the worker's last output and (``retry``) run once more
        alone."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        todo: queue.Queue[int] = queue.Queue()
        for i in sorted(range(len(jobs)), key=lambda i: -jobs[i].get("cost", 1.0)):
            todo.put(i)
        while len(self._procs) < min(self.workers, len(jobs)):
            self._procs.append(self._start())
        failures: list[int] = []

        def drive(slot: int) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                proc, errlog = self._procs[slot]
                line = ""
                try:
                    if proc.poll() is None:
                        proc.stdin.write(json.dumps(jobs[i]) + "\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                except OSError:  # (a pipe to a worker that just died)
                    line = ""
                if not line:  # its output closed: it has exited or is exiting (reaped here, else killed)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    errlog.seek(0)
                    results[i] = {"error": f"worker died ({proc.returncode}):\n{errlog.read()[-4000:]}"}
                    failures.append(i)
                    errlog.close()
                    self._procs[slot] = self._start()
                    continue
                results[i] = json.loads(line)

        threads = [
            threading.Thread(target=drive, args=(k,), daemon=True)
            for k in range(min(len(self._procs), len(jobs)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in failures if retry else ():  # once more, alone: crashing its worker again, an error
            (again,) = CompilePool(1).run_closing([jobs[i]], retry=False)
            if "error" not in again:
                results[i] = again
        return [r if r is not None else {"error": "not compiled"} for r in results]

    def run_closing(self, jobs: list[dict[str, Any]], retry: bool = True) -> list[dict[str, Any]]:
        """:meth:`run`, then :meth:`close`."""
        try:
            return self.run(jobs, retry)
        finally:
            self.close()

    def close(self) -> None:
        for proc, errlog in self._procs:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
            errlog.close()
        self._procs = []


def _run_workers(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Compile ``jobs`` in ``workers`` fresh subprocesses (:class:`CompilePool`)."""
    return CompilePool(workers).run_closing(jobs)


def warm_cache(
    launches: Iterable[tuple[Any, Any, tuple[Any, ...], dict[str, Any]]],
    gpu: tuple[str, str | int, int],
    pool: CompilePool,
) -> dict[str, float]:
    """Compile ``launches`` (``(kernel, grid, args, kwargs)`` as the plugin runs them, on real
    tensors) for the GPU ``(backend, arch, warp size)`` in ``pool``'s workers, into Triton's
    on-disk cache: their first launch in this process then loads the compiled kernel instead of
    compiling it (the workers bind and specialise the arguments as ``JITFunction.run`` does).
    Launches that compile to the same kernel go once. Returns ``{"kernels": n, "failed": m,
    "wall_s": s}``; a launch that does not compile is left to fail where it is launched."""
    configs: dict[str, LaunchConfig] = {}
    for launch in launches:
        cfg = _launch_config(launch, "")
        configs.setdefault(cfg.key, cfg)
    jobs = [
        {
            "gpu": list(gpu),
            "module": c.module,
            "kernel": c.kernel,
            "constexprs": list(c.constexprs),
            "options": list(c.options),
            "args": list(c.args),
            "cost": _cost(c),
        }
        for c in configs.values()
    ]
    start = time.perf_counter()
    results = pool.run(jobs) if jobs else []
    failed = sum("error" in r for r in results)
    return {"kernels": len(jobs), "failed": failed, "wall_s": round(time.perf_counter() - start, 2)}


def _cost(cfg: LaunchConfig) -> float:
    c = dict(cfg.constexprs)
    if "BLOCK_M" in c:
        return c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] * (2 if c.get("GATED") else 1) / cfg.num_warps
    return 1.0


def compile_profile(
    target: Target | str = "gfx950",
    configs: Sequence[LaunchConfig] | None = None,
    *,
    jobs: int | None = None,
    use_cache: bool = True,
    **launch_kwargs: Any,
) -> list[Profile]:
    """Compile ``configs`` (default: :func:`launch_configs` of ``target`` and ``launch_kwargs``) for
    ``target`` and profile them; cached results are reused (``use_cache=False``: recompile)."""
    tgt = _target(target)
    if configs is None:
        configs = launch_configs(tgt, **launch_kwargs)
    sources = {m: _source_hash(m) for m in {c.module for c in configs}}
    folder = cache_dir()
    paths = [folder / f"{_cache_key(c, tgt, sources)}.json" for c in configs]
    found = [_cache_read(p) if use_cache else None for p in paths]
    missing = [i for i, r in enumerate(found) if r is None]
    if missing:
        work = [
            {
                "target": dataclasses.asdict(tgt),
                "module": configs[i].module,
                "kernel": configs[i].kernel,
                "constexprs": list(configs[i].constexprs),
                "options": list(configs[i].options),
                "args": list(configs[i].args),
                "cost": _cost(configs[i]),
            }
            for i in missing
        ]
        for i, result in zip(missing, _run_workers(work, jobs or os.cpu_count() or 1)):
            found[i] = {**result, "fresh": True}
            if "error" not in result:
                _cache_write(paths[i], result)
    profiles = []
    for cfg, result in zip(configs, found):
        assert result is not None
        profiles.append(_profile(cfg, tgt, result))
    return profiles


def _profile(cfg: LaunchConfig, target: Target, r: dict[str, Any]) -> Profile:
    if "error" in r:
        return Profile(
            cfg.kernel, cfg.label, target.name, cfg.num_warps, cfg.num_stages,
            0, 0, 0, 0, 0, 0, 0, target.lds_bytes, 0, None, 0,
            users=cfg.users, error=r["error"], launch=cfg,
        )  # fmt: skip
    return Profile(
        kernel=cfg.kernel,
        config=cfg.label,
        target=target.name,
        num_warps=r["num_warps"],
        num_stages=r["num_stages"],
        vgpr=r["vgpr"],
        agpr=r["agpr"],
        sgpr=r["sgpr"],
        vgpr_spills=r["vgpr_spills"],
        sgpr_spills=r["sgpr_spills"],
        scratch_bytes=r["scratch_bytes"],
        lds_bytes=r["lds_bytes"],
        lds_limit=target.lds_bytes,
        occupancy=r["occupancy"],
        compiler_occupancy=r["compiler_occupancy"],
        mfma=r["mfma"],
        mfma_scaled=r.get("mfma_scaled", 0),
        cvt_scaled=r.get("cvt_scaled", 0),
        loop_instructions=r.get("loop_instructions", 0),
        users=cfg.users,
        compile_s=r["compile_s"],
        cached=not r.get("fresh", False),
        launch=cfg,
    )


# ----------------------------------------------------------------------------- report


def _users(users: Sequence[str]) -> str:
    if not users:
        return ""
    more = f" +{len(users) - 1}" if len(users) > 1 else ""
    return users[0] + more


def format_table(profiles: Sequence[Profile]) -> str:
    """A text table, one row per profile, problems last on each row."""
    head = [
        "kernel",
        "config",
        "w/s",
        "VGPR",
        "AGPR",
        "SGPR",
        "spill v/s",
        "scratch",
        "LDS",
        "occ",
        "MFMA",
        "loop",
    ]
    head += ["used by", "status"]
    rows = [head]
    for p in sorted(profiles, key=lambda p: (p.kernel, p.config, p.num_warps)):
        problems = p.problems()
        rows.append(
            [
                p.kernel,
                p.config,
                f"{p.num_warps}/{p.num_stages if p.num_stages is not None else '-'}",
                str(p.vgpr),
                str(p.agpr),
                str(p.sgpr),
                f"{p.vgpr_spills}/{p.sgpr_spills}",
                str(p.scratch_bytes),
                str(p.lds_bytes),
                str(p.occupancy)
                + ("" if p.compiler_occupancy in (None, p.occupancy) else f"({p.compiler_occupancy})"),
                str(p.mfma)
                + (f" (scaled {p.mfma_scaled})" if p.mfma_scaled else "")
                + (f" (cvt {p.cvt_scaled})" if p.cvt_scaled else ""),
                str(p.loop_instructions),
                _users(p.users),
                "; ".join(problems) if problems else "ok",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    numeric = set(range(3, 12))
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker()
    parser = argparse.ArgumentParser(
        prog="python -m moe_plugin_portable.profile",
        description="Compile every Triton kernel config of moe-plugin-portable offline for a GPU target; "
        "exit 1 on register spills, scratch memory, LDS overflow or compile errors.",
    )
    parser.add_argument("--target", default="gfx950", choices=sorted(TARGETS))
    parser.add_argument(
        "--models", default=None, help="comma-separated presets, or 'all' (default: every non-tiny preset)"
    )
    parser.add_argument("--dtypes", default="bf16,fp16", help="activation dtypes (bf16, fp16)")
    parser.add_argument(
        "--quant",
        default=",".join(DEFAULT_QUANTS),
        help="quantized variants, planned with the first dtype ('none': only unquantized layers; "
        f"default: {','.join(DEFAULT_QUANTS)})",
    )
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="token counts T")
    parser.add_argument("--ep-sizes", default="1", help="expert-parallel sizes (rank 0)")
    parser.add_argument(
        "--num-sms", type=int, default=None, help="CUs/SMs of the GPU (default: the target's)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--json", default=None, help="also write the profiles to this JSON file")
    args = parser.parse_args(argv)

    def split(s: str) -> list[str]:
        return [p.strip() for p in s.split(",") if p.strip()]

    start = time.perf_counter()
    configs = launch_configs(
        args.target,
        list(PRESETS) if args.models == "all" else split(args.models) if args.models else None,
        split(args.dtypes),
        [int(t) for t in split(args.tokens)],
        ep_sizes=[int(e) for e in split(args.ep_sizes)],
        num_sms=args.num_sms,
        quants=[q for q in split(args.quant) if q != "none"],
    )
    profiles = compile_profile(args.target, configs, jobs=args.jobs, use_cache=not args.no_cache)
    print(format_table(profiles))
    bad = [p for p in profiles if not p.ok]
    fresh = sum(not p.cached for p in profiles)
    print(
        f"\n{len(profiles)} kernels for {args.target} ({fresh} compiled, {len(profiles) - fresh} cached) "
        f"in {time.perf_counter() - start:.1f} s; {len(bad)} failing"
    )
    for p in bad:
        print(
            f"FAIL {p.kernel} [{p.config}] w{p.num_warps}: {'; '.join(p.problems())} (used by {_users(p.users)})"
        )
    if args.json:
        data = [{k: v for k, v in dataclasses.asdict(p).items() if k != "launch"} for p in profiles]
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
