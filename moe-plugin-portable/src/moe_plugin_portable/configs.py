"""Launch configurations of the fused MoE: tuned tables per GPU, and a heuristic.

A :class:`MoEConfig` fixes ``block_m`` (the sorting block, shared by both
GEMMs) and, per GEMM, ``block_n``, ``block_k``, ``num_warps``, ``num_stages``,
``group_m``. Lookup for a layer and a token count ``T``:

1. the tuned table of this GPU (``configs/<device name>.json`` in this
   package, or in the folder ``MOE_PORTABLE_CONFIG_DIR`` which takes
   precedence), keyed by the layer shape and the ``T`` bucket (an fp16
   layer without an entry takes its bf16 twin's, and the other way round);
2. else :func:`heuristic_config` (a one-time warning names the missing file
   and the ``moe tune`` command that writes it).

Table format (``moe tune`` writes it)::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "configs": {"E=128,H=2048,I=768,k=8,bfloat16": {"1": {...}, "8": {...}, ..., "inf": {...}}}}

where each ``{...}`` is ``MoEConfig.to_json()`` (an mxfp4 layer's GEMM configs may carry
``"mx_dot": true|false``: ``tl.dot_scaled`` or the dequantization, as the tuner found faster;
absent: the row rule). Buckets are upper bounds on
``T``: 1, 8, 32, 128, 512, 2048, inf. Quantized layers have keys of their own
(:func:`layer_key` appends the scheme), so they never take a bf16 layer's tiles.

Decode path (:func:`lookup_decode`). For a few tokens the fused MoE can skip
the sort and the combine: 2 launches (a GEMV-like GEMM 1 per (entry, N block),
a GEMM 2 per (token, H block) summing its k slots) instead of 4. It reads an
expert's weights once per entry routed to it, where the sorted path reads them
once per expert, so it pays only while the ``n = T * k`` entries hit mostly
distinct experts. :func:`use_decode` is that rule, a function of ``(T, k, E)``:
``T <= DECODE_MAX_TOKENS`` and, under uniform routing, the expected weight
reads ``n`` over the expected distinct experts ``E * (1 - (1 - 1/E)**n)`` at most
``1 + DECODE_MAX_REREAD`` (``T == 1`` always qualifies: a token's k experts are
distinct). E.g. E=128, k=8: T <= 3; E=256, k=8: T <= 6; E=32, k=4 and E=8, k=2: T == 1.
A table entry may override it for its bucket with ``"decode": {"use": true|false,
"gemm1": {...}, "gemm2": {...}}`` (tiles optional; ``use`` absent: the rule);
``MOE_PORTABLE_DECODE=0``/``1`` turns the path off/on for every ``T`` (A/B runs).
On a GPU the choice depends on whether the call is being captured in a CUDA graph,
as measured on the H200 (``tools/profile_apply.py``, bf16, T = 1..8, four presets):
the decode path's device time was never better than the sorted path's by more than
2% and up to 1.7x worse, while its host time per eager call was 2-3x smaller
(~100 us against ~280 us at T=1: eager calls at these T are bound by the host).
So eager calls follow the rule (or a tuned ``"use": true``), and captured calls take
the sorted path unless a tuned entry says ``"use": true`` (the tuner times both on the
device: on the H200, mxfp4 deepseek-v3-tp8 at T = 8 ran the decode path in 135 us against
185 us sorted, ``tools/quant_paths.py``, weights not rotated).
``MOE_PORTABLE_DECODE=rule`` applies the rule to captured calls too.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moe_core import MoESpec

__all__ = [
    "DECODE_MAX_REREAD",
    "DECODE_MAX_TOKENS",
    "T_BUCKETS",
    "DecodeConfig",
    "GemmConfig",
    "MoEConfig",
    "config_file_name",
    "decode_heuristic",
    "heuristic_config",
    "layer_key",
    "lookup_config",
    "lookup_decode",
    "mma_tile",
    "mxfp4_warps",
    "t_bucket",
    "tuned_tables",
    "use_decode",
]

T_BUCKETS: tuple[float, ...] = (1, 8, 32, 128, 512, 2048, float("inf"))
_PACKAGE_DIR = Path(__file__).parent / "configs"
#: the decode path's bounds (module docstring)
DECODE_MAX_TOKENS = 8
DECODE_MAX_REREAD = 0.1
#: the bound for mxfp4 weights on sm_90, whose tensor-core decode kernels beat the sorted path
#: at T = 8 where the slots reread 13-14% (H100 us: deepseek-v3-tp8 111.3 against 159.5, gpt-oss-120b
#: 276.4 against 307.5) and lost at 27% (qwen3-30b-a3b 103.8 against 91.6;
#: benchmarks/results/h100-decode-stages-2026-12-07.md)
DECODE_MXFP4_MMA_REREAD = 0.2
#: programs per SM a decode launch is split up to (:func:`decode_split`): each holds one K step's
#: loads in flight, and fewer leave the weight stream latency-bound
DECODE_PROGRAMS_PER_SM = 16


@dataclass(frozen=True)
class GemmConfig:
    """Tile and pipeline of one grouped GEMM; ``mx_dot``: mxfp4 weights through ``tl.dot_scaled``
    (``True``) or dequantized in registers (``False``), ``None`` for the row rule
    (:func:`moe_plugin_portable.experts._mx_dot`); other schemes ignore it. ``split``: programs
    per output tile of a decode launch (:class:`DecodeConfig`; the sorted path ignores it).
    ``prequant``: a decode launch with fp8 activations reads its input quantized by a pre-pass
    (one more launch; the codes and scales are read per K step) instead of quantizing it in
    every program (the sorted path always quantizes ahead or in GEMM 1's epilogue). ``mma``: a
    decode launch on NVIDIA tensor cores (the Gluon kernels of ``_details/_decode_mma.py``, for
    the launches ``experts._mma_fits``: bf16/fp16 weights, fp8 or mxfp4 weights with fp8
    activations pre-quantized, mxfp4 with bf16; ``block_n`` a multiple of ``16 * num_warps``),
    else on the CUDA-core Triton kernels."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    mx_dot: bool | None = None
    split: int = 1
    prequant: bool = False
    mma: bool = False

    def to_json(self) -> dict[str, Any]:
        """The table's form: ``mx_dot`` only where it is set, ``split`` where it is not 1,
        ``prequant`` and ``mma`` where they are true."""
        data = asdict(self)
        if data["mx_dot"] is None:
            del data["mx_dot"]
        if data["split"] == 1:
            del data["split"]
        for flag in ("prequant", "mma"):
            if not data[flag]:
                del data[flag]
        return data


@dataclass(frozen=True)
class MoEConfig:
    """``block_m`` rows per expert block (the sorting block size) and both GEMMs' configs."""

    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig

    def to_json(self) -> dict[str, Any]:
        return {"block_m": self.block_m, "gemm1": self.gemm1.to_json(), "gemm2": self.gemm2.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MoEConfig:
        return cls(data["block_m"], GemmConfig(**data["gemm1"]), GemmConfig(**data["gemm2"]))


@dataclass(frozen=True)
class DecodeConfig:
    """The decode path's two GEMV-like launches: ``block_n`` rows x ``block_k`` of K per step.

    ``gemm1``: programs ``(T * k, cdiv(I, block_n), split)``, K in ``split`` chunks; ``gemm2``:
    ``(T, cdiv(H, block_n), split)``, the ``k`` slots times K steps in ``split`` parts
    (:func:`gemm2_split`); ``group_m`` unused. ``chain``: both in one launch, GEMM 2's programs
    waiting for their entries' GEMM 1 tiles (``experts.decode_launches``), and with ``prefetch``
    (on NVIDIA) first prefetching their weights toward L2.
    """

    gemm1: GemmConfig
    gemm2: GemmConfig
    chain: bool = False
    prefetch: bool = True

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"gemm1": self.gemm1.to_json(), "gemm2": self.gemm2.to_json()}
        if self.chain:
            data["chain"] = True
            data["prefetch"] = self.prefetch
        return data

    def chained(self, prefetch: bool = True) -> DecodeConfig:
        """These tiles as the chained launch runs them: on the GEMV kernels (no ``mma``), neither
        GEMM's input pre-quantized."""
        plain = {"mma": False, "prequant": False}
        return DecodeConfig(replace(self.gemm1, **plain), replace(self.gemm2, **plain), True, prefetch)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecodeConfig:
        chain = bool(data.get("chain", False))
        return cls(
            GemmConfig(**data["gemm1"]), GemmConfig(**data["gemm2"]), chain, bool(data.get("prefetch", True))
        )


def gemm2_split(split: int, top_k: int) -> tuple[int, int]:
    """Decode GEMM 2's ``(slot groups, K chunks)`` for a ``split``: up to ``top_k`` groups of slots,
    beyond that every slot alone and its K in ``cdiv(split, top_k)`` chunks."""
    if split <= top_k:
        return max(1, split), 1
    return top_k, -(-split // top_k)


def decode_split(programs: int, steps: int, num_sms: int) -> int:
    """Programs per tile so that a launch of ``programs`` tiles of ``steps`` serial K steps runs
    at least ``DECODE_PROGRAMS_PER_SM`` programs per SM (at most one step each)."""
    return max(1, min(steps, -(-DECODE_PROGRAMS_PER_SM * num_sms // max(1, programs))))


def use_decode(num_tokens: int, top_k: int, num_experts: int, max_reread: float = DECODE_MAX_REREAD) -> bool:
    """Whether ``T`` tokens of ``top_k`` slots over ``num_experts`` take the decode path (module
    docstring): ``T = 1``, or ``T <= DECODE_MAX_TOKENS`` slots rereading at most ``max_reread``
    of the expected distinct experts."""
    if not 1 <= num_tokens <= DECODE_MAX_TOKENS:
        return False
    if num_tokens == 1:
        return True
    n = num_tokens * top_k
    distinct = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** n)
    return n <= distinct * (1.0 + max_reread)


@functools.lru_cache(maxsize=4096)
def decode_heuristic(
    spec: MoESpec, num_tokens: int, num_sms: int, is_amd: bool, sm90: bool = False
) -> DecodeConfig:
    """Decode tiles from the shape. Long K steps first (``block_k``: ``K`` rounded up to a power
    of two, within ``[32, 512]``: long contiguous row segments, 16-byte vector loads), then
    ``block_n`` rows so that a tile holds about 4096 elements (2048 per gated half), halved
    (down to 4) until a GEMM launches about two programs per SM (decode is weight-bandwidth
    bound: every SM must stream), then split (:func:`decode_split`: GEMM 1's K steps, GEMM 2's
    slots times K steps). fp8_block steps are its K block (one scale per step).

    ``prequant`` on AMD for dynamic fp8 activations (per token, groups). There, quantizing in
    every program makes gfx950's K steps 2.6-7.7x longer for fp8_block (the group's amax and
    its correctly rounded divisions), and a per-token scale re-reads the whole row in every
    program (static compiles, benchmarks/results/static-decode-prequant-2026-12-04.md). On
    NVIDIA for every fp8 activation: faster in 11 of 12 untuned H100 cases at T = 1 and 8, by
    up to 23% (a 2% loss: benchmarks/results/h100-quant-paths-2026-12-06.md); static per-tensor
    only at ``T > 1`` (at ``T = 1`` within 2% but on deepseek-v3-tp8's mxfp4 W4A8 GEMM 2 the
    pre-quantized read spills 12 bytes on sm_90).

    ``sm90`` (NVIDIA Hopper): the tensor-core decode kernels (``mma``, tiles of :func:`mma_tile`)
    at ``T = 1`` for bf16/fp16 weights and at ``T <= 8`` for fp8_block and mxfp4, where they were
    the fastest untuned decode kernels on the H100 (deepseek-v3-tp8, us: fp8_block T = 1 32.5
    against 36.0, bf16 48.0 against 54.0, mxfp4 W4A8 27.3 against 31.8, mxfp4 W4A16 T = 8 110.8
    against 134.8; gpt-oss-120b mxfp4 W4A16 T = 1 was 5% slower); at ``T = 8`` bf16 and
    per-channel fp8 they were slower (one MMA per slot). Their fp8 activations are always
    pre-quantized: deepseek-v3-tp8 W4A8 at T = 1 took 41.2 us quantizing in every program against
    27.3 pre-quantized (H100). A tuned entry decides where there is one."""
    scheme = spec.quant
    stages = 2 if is_amd else 3
    mma = sm90 and (
        (num_tokens == 1 and not scheme.is_quantized)
        or (num_tokens <= 8 and scheme.name in ("fp8_block", "mxfp4"))
    )
    static = scheme.activation == "fp8_per_tensor" and not is_amd and (num_tokens > 1 or mma)
    prequant = static or scheme.activation in ("fp8_per_token", "fp8_group")

    def tile(programs: int, n: int, k: int, gated: bool, slots: int) -> GemmConfig:
        block_k = max(32, min(512, 1 << max(0, k - 1).bit_length()))
        if scheme.name == "fp8_block":
            block_k = scheme.block_shape[1]
        block_n = max(4, min(64, (2048 if gated else 4096) // block_k))
        while block_n > 4 and programs * -(-n // block_n) < 2 * num_sms:
            block_n //= 2
        split = decode_split(programs * -(-n // block_n), slots * -(-k // block_k), num_sms)
        cfg = GemmConfig(block_n, block_k, 4, stages, 1, split=split, prequant=prequant)
        return mma_tile(cfg) if mma else cfg

    return DecodeConfig(
        tile(num_tokens * spec.top_k, spec.intermediate_size, spec.hidden_size, spec.is_gated, 1),
        tile(num_tokens, spec.hidden_size, spec.intermediate_size, False, spec.top_k),
    )


def lookup_decode(
    spec: MoESpec, num_tokens: int, device: torch.device, capturing: bool = False
) -> DecodeConfig | None:
    """The decode path's config for ``spec`` at ``num_tokens``, or ``None`` for the sorted path.

    ``MOE_PORTABLE_DECODE`` (``0``/``1``) first; then, for a call being captured in a
    CUDA graph, the tuned entry's ``"decode": {"use": ...}`` (absent: the sorted path; no
    entry at all: the sorted path for bf16/fp16, the rule for quantized layers, whose
    decode kernels were 1.1-3.9x faster at ``T = 1`` in graphs on the untuned H100, e.g.
    deepseek-v3-tp8 mxfp4 28.4 against 93.9 us); for an eager call (``capturing`` false)
    :func:`use_decode` or a tuned ``use`` (eager calls are also host-bound at these ``T``:
    the decode path's two launches cost less host time), with ``MOE_PORTABLE_DECODE=rule``
    the rule alone. Tiles from the entry,
    else :func:`decode_heuristic`; ``MOE_PORTABLE_PREQUANT=0``/``1`` sets both GEMMs'
    ``prequant``, ``MOE_PORTABLE_DECODE_MMA=0``/``1`` their ``mma`` (``1``: tiles fitted by
    :func:`mma_tile`, fp8 activations pre-quantized), ``MOE_PORTABLE_DECODE_CHAIN=0``/``1`` the
    config's ``chain`` (``1``: on the GEMV kernels, nothing pre-quantized).
    """
    force = os.environ.get("MOE_PORTABLE_DECODE", "")
    if force == "0":
        return None
    override: dict[str, Any] = {}
    entry = None
    num_sms, is_amd, major = 8, False, 0
    if device.type == "cuda":
        name, num_sms, is_amd, major = _device_facts(
            device.index if device.index is not None else torch.cuda.current_device()
        )
        entry = _table_entry(spec, num_tokens, name)
        override = (entry or {}).get("decode") or {}
    if force != "1":
        tuned = force != "rule" and bool(override.get("use", False))
        if capturing and force != "rule" and (entry is not None or not spec.quant.is_quantized):
            use = tuned
        else:
            sm90_mxfp4 = not is_amd and major == 9 and spec.quant.name == "mxfp4"
            reread = DECODE_MXFP4_MMA_REREAD if sm90_mxfp4 else DECODE_MAX_REREAD
            use = tuned or use_decode(num_tokens, spec.top_k, spec.num_experts, reread)
        if not use:
            return None
    if "gemm1" in override and "gemm2" in override:
        cfg = DecodeConfig.from_json(override)
    else:
        cfg = decode_heuristic(spec, num_tokens, num_sms, is_amd, sm90=not is_amd and major == 9)
    pre = os.environ.get("MOE_PORTABLE_PREQUANT", "")
    if pre in ("0", "1"):  # A/B runs: every decode GEMM's input pre-quantized, or none
        cfg = replace(
            cfg, gemm1=replace(cfg.gemm1, prequant=pre == "1"), gemm2=replace(cfg.gemm2, prequant=pre == "1")
        )
    mma = os.environ.get("MOE_PORTABLE_DECODE_MMA", "")
    if mma == "1":  # (fp8 activations: pre-quantized, as those kernels take them)
        cfg = replace(cfg, gemm1=mma_tile(cfg.gemm1), gemm2=mma_tile(cfg.gemm2))
        if spec.quant.activation != "none":
            cfg = replace(
                cfg, gemm1=replace(cfg.gemm1, prequant=True), gemm2=replace(cfg.gemm2, prequant=True)
            )
    elif mma == "0":
        cfg = replace(cfg, gemm1=replace(cfg.gemm1, mma=False), gemm2=replace(cfg.gemm2, mma=False))
    chain = os.environ.get("MOE_PORTABLE_DECODE_CHAIN", "")
    if chain == "1":  # one launch: on the GEMV kernels, neither input pre-quantized
        cfg = cfg.chained()
    elif chain == "0":
        cfg = replace(cfg, chain=False)
    return cfg


def mma_tile(cfg: GemmConfig) -> GemmConfig:
    """``cfg`` on the tensor-core decode kernels: ``mma`` set, ``block_n`` rounded up to a multiple of
    ``16 * num_warps`` (2 warps up to 32 rows, else 4), the split raised by as much (about as many
    programs), ``block_k`` at least 128 (4 chunks of 16 mxfp4 bytes per row)."""
    if cfg.mma and cfg.block_n % (16 * cfg.num_warps) == 0 and cfg.block_k >= 128:
        return cfg
    warps = 2 if cfg.block_n <= 32 else 4
    rows = -(-cfg.block_n // (16 * warps)) * 16 * warps
    split = min(16, max(1, cfg.split * rows // cfg.block_n))
    return replace(cfg, block_n=rows, block_k=max(cfg.block_k, 128), num_warps=warps, split=split, mma=True)


def t_bucket(num_tokens: int) -> str:
    """The bucket label of ``num_tokens`` (``"1"``, ``"8"``, ..., ``"inf"``)."""
    for bound in T_BUCKETS:
        if num_tokens <= bound:
            return "inf" if bound == float("inf") else str(int(bound))
    return "inf"


def layer_key(spec: MoESpec) -> str:
    """Table key of a layer: local experts, shape, top-k, dtype, and the scheme when quantized.

    ``E=128,H=2048,I=768,k=8,bfloat16`` (bf16/fp16 weights: the keys of the shipped tables);
    quantized layers append the scheme as ``str(QuantScheme)`` (plus fp8_block's block shape):
    ``E=256,H=7168,I=256,k=8,bfloat16,fp8_block/a:fp8_group/b:128x128``.
    """
    dtype = str(spec.dtype).removeprefix("torch.")
    key = f"E={spec.num_local_experts},H={spec.hidden_size},I={spec.intermediate_size},k={spec.top_k},{dtype}"
    if spec.quant.is_quantized:
        key += f",{spec.quant}"
        if spec.quant.name == "fp8_block":
            key += "/b:{}x{}".format(*spec.quant.block_shape)
    return key


def config_file_name(device_name: str) -> str:
    """File name of a GPU's table: its name with anything but letters and digits as ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def tuned_tables() -> dict[str, Any]:
    """The tuned tables found (override folder first) and whether this machine's GPUs have one.

    For ``moe doctor``: ``{"tables": {file: [folder, layers]}, "gpus": {name: file or None}}``.
    """
    found: dict[str, Any] = {}
    for folder in (os.environ.get("MOE_PORTABLE_CONFIG_DIR"), _PACKAGE_DIR):
        if folder and Path(folder).is_dir():
            for path in sorted(Path(folder).glob("*.json")):
                if path.name not in found:
                    layers = len(json.loads(path.read_text()).get("configs", {}))
                    found[path.name] = [str(folder), layers]
    gpus = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(index)
            gpus[name] = config_file_name(name) if config_file_name(name) in found else None
    return {"tables": found, "gpus": gpus}


@functools.cache
def _load_table(device_name: str) -> dict[str, Any] | None:
    name = config_file_name(device_name)
    for folder in (os.environ.get("MOE_PORTABLE_CONFIG_DIR"), _PACKAGE_DIR):
        if folder and (Path(folder) / name).is_file():
            return json.loads((Path(folder) / name).read_text())["configs"]
    return None


_warned: set[str] = set()
_SAME_WIDTH = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}


@functools.cache
def _device_facts(index: int) -> tuple[str, int, bool, int]:
    """Name, SM (CU) count, whether it is AMD, and the compute capability's major of GPU ``index``."""
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count, bool(torch.version.hip), props.major


def _table_entry(spec: MoESpec, num_tokens: int, name: str) -> dict[str, Any] | None:
    """The tuned table's entry of ``spec`` for the bucket of ``num_tokens`` on GPU ``name``, if any."""
    table = _load_table(name) or {}
    bucket = t_bucket(num_tokens)
    entry = table.get(layer_key(spec), {}).get(bucket)
    if entry is None and spec.dtype in _SAME_WIDTH:  # an fp16 layer tiles like its bf16 twin
        entry = table.get(layer_key(spec.replace(dtype=_SAME_WIDTH[spec.dtype])), {}).get(bucket)
    return entry


def lookup_config(spec: MoESpec, num_tokens: int, device: torch.device) -> MoEConfig:
    """The tuned config for ``spec`` at ``num_tokens`` on ``device``, else the heuristic's."""
    if device.type != "cuda":
        return heuristic_config(spec, num_tokens, 8, False)
    name, num_sms, is_amd, _ = _device_facts(
        device.index if device.index is not None else torch.cuda.current_device()
    )
    entry = _table_entry(spec, num_tokens, name)
    if entry is not None:
        return MoEConfig.from_json(entry)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"moe-plugin-portable: no tuned config for {layer_key(spec)} (T bucket {t_bucket(num_tokens)}) "
            f"in {config_file_name(name)}; "
            "using the heuristic. `moe tune --model <preset>` writes one for this GPU.",
            stacklevel=3,
        )
    return heuristic_config(spec, num_tokens, num_sms, is_amd)


def mxfp4_warps(block_m: int, block_n: int, block_k: int, operands_b: int) -> int:
    """Warps of an mxfp4 GEMM tile: 8 where its float32 accumulators and its weight tiles upcast
    to bf16 (both in registers, transposed tiles) reach 128 x 128 elements, else 4 (sm90 ptxas
    spilled 64-row, 128-wide ungated tiles on 4 warps)."""
    return 8 if operands_b * block_n * (block_m + block_k // 2) >= 128 * 128 else 4


@functools.lru_cache(maxsize=4096)
def heuristic_config(spec: MoESpec, num_tokens: int, num_sms: int, is_amd: bool) -> MoEConfig:
    """A reasonable config from the shape alone.

    ``block_m`` follows the expected rows per active expert (16 for decode, so
    1-8 tokens per expert do not pay for a 64-row tile); ``block_n`` shrinks
    until both GEMMs launch about two programs per SM, since small batches are
    bound by weight bandwidth and need every SM streaming weights. Quantized
    weights take larger K steps (fp8: 128, within fp8_block's scale block;
    mxfp4: 128, its transposed tiles 64 or 128 weight rows). fp8_block's GEMM 1 quantizes its
    output in its epilogue only when ``block_n`` is a multiple of the group
    (decode shapes shrink it below: the intermediate then takes a pre-pass).
    """
    entries = num_tokens * spec.top_k
    active = min(spec.num_local_experts, entries)
    rows = entries / max(active, 1)
    if rows <= 16:
        block_m = 16
    elif rows <= 32:
        block_m = 32
    elif rows <= 96 or is_amd:
        block_m = 64
    else:
        block_m = 128
    m_blocks = active + (entries - active) // block_m
    stages = 2 if is_amd else (4 if block_m <= 32 else 3)

    scheme = spec.quant
    fp8 = scheme.name in ("fp8", "fp8_block")

    def gemm(n: int, k: int, gated: bool) -> GemmConfig:
        block_n = 128 if block_m >= 64 else 64
        if scheme.is_quantized and gated and block_m >= 128:
            # fp8 blocks keep a K step's product beside each accumulator: two 128 x 128 of them
            # spill on sm90 even with 8 warps (so do fp8 per-token gate/up tiles, just)
            block_n = 64
        if scheme.name == "mxfp4":
            # the weight rows are the MMA's M side (transposed tiles): 64 (a wgmma), 128 ungated at
            # 64+ rows; fewer (as for the other schemes) where the grid would be short of programs
            block_n = 128 if block_m >= 64 and not gated else 64
        while block_n > 16 and m_blocks * -(-n // block_n) < 2 * num_sms:
            block_n //= 2
        block_k = 64 if (block_m >= 128 or (gated and block_m >= 64)) else 128
        if fp8 or scheme.name == "mxfp4":  # a byte or half a byte: K 128 (a 128- or 64-byte row step)
            block_k = 128
        block_k = min(block_k, max(32 if scheme.is_quantized else 16, 1 << (k - 1).bit_length()))
        if scheme.name == "fp8_block":
            block_k = min(block_k, scheme.block_shape[1])  # a K step never straddles a scale block
        warps = 8 if block_m >= 128 and block_n >= 128 else 4
        if scheme.is_quantized and gated and block_m * block_n >= 64 * 128:
            warps = 8  # scale and dequantization temporaries: 4 warps spill (sm90 ptxas)
        if scheme.name == "mxfp4":
            warps = mxfp4_warps(block_m, block_n, block_k, 2 if gated else 1)
        return GemmConfig(block_n, block_k, warps, stages, 8)

    return MoEConfig(
        block_m,
        gemm(spec.intermediate_size, spec.hidden_size, spec.is_gated),
        gemm(spec.hidden_size, spec.intermediate_size, False),
    )
