"""``moe tune`` for the portable fused MoE: time configs per token bucket, write the GPU's table.

For each token count (one per bucket of :data:`configs.T_BUCKETS`) and each
candidate ``block_m``, GEMM 1 and GEMM 2 are timed separately over their
config spaces on the same sorted tokens (they share only ``block_m``); the
fastest (sort + activation quantization + GEMM 1 + GEMM 2 + combine) wins.
Candidates that do not compile or do not fit the shared memory are skipped.
Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``:
device time only, as an engine running under graphs sees it), on random data.

Quantized layers (every scheme of :data:`experts.QUANT_SCHEMES`) are timed on
the launches :func:`experts.fused_moe_launches` makes for them: the tokens'
quantization pre-pass (``quant_us``, the same for every config), GEMM 1 with
the intermediate's pre-pass where its config needs one (``gemm1_us``: fp8
per token always, fp8_block when GEMM 1's ``block_n`` holds no whole groups),
then GEMM 2. Their spaces (:func:`gemm_space`) count the operands' bytes
(fp8: 1, mxfp4: half a byte plus its e8m0 scales, and the bf16 tile that the
e2m1 weights are upcast to for the MMA), keep fp8_block's K step within its
block and mxfp4's at 32 or more (:func:`experts._block_k`, so no two
candidates are the same launch), and drop tiles whose accumulators alone
would take more than half of a thread's registers. mxfp4 layers get a last
round: the best tile and pipeline through the other mxfp4 path (``tl.dot_scaled``
or the dequantization, ``GemmConfig.mx_dot``), kept where it is faster.

At every tuned ``T`` the decode path can take (``T <= configs.DECODE_MAX_TOKENS``:
the ``1`` and ``8`` buckets) its two launches are tuned too (GEMM 1 tiles and
pipelines, then GEMM 2's, from :func:`decode_space`) and the bucket's entry gets
``"decode": {"use": decode faster than sorted, "gemm1": ..., "gemm2": ...,
"timing": ...}``, which :func:`configs.lookup_decode` reads. Timed at the
bucket's largest ``T`` (the most entries, the decode path's worst case), a
``use`` holds for the bucket's smaller ``T`` too.

On a GPU, a candidate is timed over ``moe_core.bench.cold_routings`` routings of the same ``T``,
one after the other (uniform, each its own seed), and its time is their mean: enough routings that
the experts they hit hold more than ``moe_core.bench.L2_FLUSH_BYTES``, so their weights come from
memory, as in a model's forward where every layer has experts of its own. Timed on one routing,
a decode step's weights (8-50 MB) stay in the L2 cache between replays and flatter the tiles that
issue the fewest instructions over those that stream memory best (H100, deepseek-v3-tp8 fp8 at T=1:
19.7 us in such a tuner against 35.5 us L2-cold, ``benchmarks/results/h100-2026-12-07.md``).

Each entry also records ``"searched": [timed, failed]``: the candidates timed
and those that did not compile or run, ``"routings"``: how many routings each was timed on, and
``"search_s"``: the wall seconds of the candidates' first runs (their compiles) and of their timing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch

from moe_core import DeviceInfo, ExpertWeights, MoESpec, QuantScheme
from moe_core.bench.floors import cold_routings
from moe_core.testing import random_expert_weights

from . import configs
from ._launch import run_launch
from .configs import DecodeConfig, GemmConfig, MoEConfig
from .experts import (
    MX_DOT_MAX_BLOCK_M,
    Launch,
    _block_k,
    _decode_block_k,
    _kernels,
    _mma_capable,
    _prepare,
    decode_launches,
    fused_moe_launches,
    kernel_entries,
    sort_tokens,
)

__all__ = [
    "DEFAULT_TOKENS",
    "SPACES",
    "decode_space",
    "gemm_space",
    "refusal",
    "tune_layer",
    "write_table",
]

DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
_SMEM_BUDGET = 200 * 1024
#: registers per thread that a tile's float32 accumulators may take (quantized schemes)
_ACC_REGS = 128
_BF16 = QuantScheme("bf16")
Progress = Callable[[str, int, int], None]
#: a candidate's launches, prepared: ``make(cfg)`` runs what precedes the timed part and returns it
Make = Callable[[GemmConfig], Callable[[], None]]
#: a candidate's launches, built but not run (what ``make`` would time), for :func:`profile.warm_cache`
Launches = Callable[[GemmConfig], list[Launch]]
#: rounds with fewer candidates are not compiled ahead (a worker's job costs more than it saves)
WARM_MIN_CANDIDATES = 4
#: a round's candidates given the best config so far (templates filled in, unfit ones left out)
Fill = Callable[[list[GemmConfig], "GemmConfig | None"], Iterable[GemmConfig]]


def refusal(spec: MoESpec, device: DeviceInfo) -> str | None:
    """Why the fused MoE cannot run (so cannot be tuned for) ``spec`` on ``device``, or ``None``."""
    return kernel_entries()[0].refusal(spec, device)


def _operand_bytes(quant: QuantScheme) -> tuple[float, float]:
    """Bytes per element of the A (activation) and B (weight) tiles in shared memory."""
    if not quant.is_quantized:
        return (4.0, 4.0) if quant.name == "fp32" else (2.0, 2.0)
    a = 1.0 if quant.activation.startswith("fp8") else 2.0
    if quant.name == "mxfp4":
        return a, 0.5 + 1 / 32  # e2m1 pairs and an e8m0 scale per 32
    return a, 1.0


def _acc_regs(cfg: GemmConfig, block_m: int, operands_b: int, quant: QuantScheme) -> float:
    """Registers per thread of the tile's float32 accumulators (fp8_block: and a K step's product)."""
    tiles = operands_b + (1 if quant.name == "fp8_block" else 0)
    regs = tiles * block_m * cfg.block_n
    if quant.name == "mxfp4":  # and the weight tiles upcast to bf16 pairs, the MMA's register operand
        regs += operands_b * cfg.block_n * cfg.block_k // 2
    return regs / (32 * cfg.num_warps)


def _tile_warps(block_m: int, block_n: int, block_k: int, operands_b: int, quant: QuantScheme) -> int:
    """Warps of the tile round: 8 from ``block_m`` 128, and where :func:`configs.heuristic_config`
    takes 8 for a quantized scheme's temporaries (gate/up tiles of 64 x 128; mxfp4:
    :func:`configs.mxfp4_warps`)."""
    if quant.name == "mxfp4":
        return configs.mxfp4_warps(block_m, block_n, block_k, operands_b)
    if block_m > 64:
        return 8
    if quant.is_quantized and operands_b == 2 and block_m * block_n >= 64 * 128:
        return 8
    return 4


def _fits(cfg: GemmConfig, block_m: int, operands_b: int, quant: QuantScheme = _BF16) -> bool:
    """Whether ``cfg`` fits the shared memory (and, quantized, the registers) at ``block_m``."""
    a, b = _operand_bytes(quant)
    stage = block_m * cfg.block_k * a + operands_b * cfg.block_n * cfg.block_k * b
    smem = cfg.num_stages * stage
    if quant.name == "fp8_block":  # per K step: A's group scales and the weight blocks' scales
        smem += cfg.num_stages * (block_m + operands_b * cfg.block_n) * 4
    # 8 warps on small tiles: idle (quantized tiles have temporaries to spread, down to 64 x 64)
    if smem > _SMEM_BUDGET or (
        cfg.num_warps == 8 and block_m * cfg.block_n < (64 * 64 if quant.is_quantized else 64 * 128)
    ):
        return False
    return not quant.is_quantized or _acc_regs(cfg, block_m, operands_b, quant) <= _ACC_REGS


#: Search spaces of :func:`gemm_space`: ``full`` (``moe tune``), ``quick`` (about a third of the
#: candidates: the tiles and pipelines that win on Hopper), ``small`` (two configs, for CPU tests).
SPACES = ("full", "quick", "small")


def _tile_ks(quant: QuantScheme, quick: bool) -> tuple[int, ...]:
    """K steps of the tile round: fp8 steps twice as long (the same bytes), fp8_block's within its block."""
    if quant.name == "fp8":
        return (128, 256) if quick else (64, 128, 256)
    if quant.name == "fp8_block":
        ks = (64, 128) if quick else (32, 64, 128)
        return tuple(k for k in ks if k <= quant.block_shape[1]) or (quant.block_shape[1],)
    return (64, 128) if quick else (64, 128, 256)


def gemm_space(
    block_m: int, operands_b: int, space: str = "full", spec: MoESpec | None = None
) -> list[list[GemmConfig]]:
    """Config rounds for one GEMM at ``block_m``: tiles first, then pipelines around the best tile.

    Each round is a list of candidates; a round's entries with ``block_n == 0``
    are templates whose tile is replaced by the best tile of the round before.
    ``spec`` (default: a bf16 layer) sets the K steps, the shared memory and
    register bounds of a quantized scheme; tiles are as the kernels launch them
    (:func:`experts._block_k`), each once.
    """
    if space not in SPACES:
        raise ValueError(f"unknown tuning space {space!r}; expected one of {SPACES}")
    quant = spec.quant if spec is not None else _BF16
    if space == "small":
        small = [GemmConfig(32, 64, 4, 2, 8), GemmConfig(64, 64, 4, 2, 8)]
        return [_unique(_launched(spec, c) for c in small)]
    stages = 4 if block_m <= 32 else 3
    quick = space == "quick"
    tile_n = (32, 64, 128, 256) if not quick else ((32, 64, 128) if block_m <= 32 else (64, 128, 256))
    if quant.name == "mxfp4":  # transposed tiles: the weight rows are the MMA's M side
        tile_n = (32, 64, 128) if quick else (16, 32, 64, 128, 256)
    tiles = []
    for bn, bk in itertools.product(tile_n, _tile_ks(quant, quick)):
        warps = _tile_warps(block_m, bn, bk, operands_b, quant)
        cfg = _launched(spec, GemmConfig(bn, bk, warps, stages, 8))
        if _fits(cfg, block_m, operands_b, quant):
            tiles.append(cfg)
    if quick:
        pipelines = [GemmConfig(0, 0, w, st, 8) for w, st in itertools.product((4, 8), (3, 4, 5))]
    else:
        pipelines = [
            GemmConfig(0, 0, w, st, g) for w, st, g in itertools.product((4, 8), (2, 3, 4, 5), (1, 8))
        ]
    rounds = [_unique(tiles), pipelines]
    if quant.name == "mxfp4":  # the best tile and pipeline through the other mxfp4 path
        rounds.append([GemmConfig(0, 0, 0, 0, 0, mx_dot=block_m > MX_DOT_MAX_BLOCK_M)])
    return rounds


def _launched(spec: MoESpec | None, cfg: GemmConfig) -> GemmConfig:
    """``cfg`` with the K step the sorted-path kernels launch it with."""
    return cfg if spec is None else replace(cfg, block_k=_block_k(spec, cfg))


def _unique(cfgs: Iterable[GemmConfig]) -> list[GemmConfig]:
    return list(dict.fromkeys(cfgs))


def _filled(round_: list[GemmConfig], best: GemmConfig | None) -> Iterable[GemmConfig]:
    """A round's candidates: templates (``block_n == 0``) take the tile and split of ``best``
    (skipped before one), and those with ``num_warps == 0`` its pipeline too (only their
    ``mx_dot``, and their ``split`` where it is not 0, are their own)."""
    for cfg in round_:
        if cfg.block_n == 0:
            if best is None:
                continue
            if cfg.num_warps == 0:
                cfg = replace(
                    best,
                    mx_dot=cfg.mx_dot,
                    split=cfg.split or best.split,
                    prequant=cfg.prequant or best.prequant,
                    mma=cfg.mma or best.mma,
                )
            else:
                cfg = GemmConfig(
                    best.block_n,
                    best.block_k,
                    cfg.num_warps,
                    cfg.num_stages,
                    cfg.group_m,
                    best.mx_dot,
                    best.split,
                    best.prequant,
                    best.mma,
                )
        yield cfg


def _candidates(
    round_: list[GemmConfig], best: GemmConfig | None, block_m: int, operands_b: int, quant: QuantScheme
) -> Iterable[GemmConfig]:
    """:func:`_filled`, less the configs that do not fit (:func:`_fits`)."""
    return (cfg for cfg in _filled(round_, best) if _fits(cfg, block_m, operands_b, quant))


def _block_ms(spec: MoESpec, num_tokens: int) -> tuple[int, ...]:
    rows = num_tokens * spec.top_k / max(1, min(spec.num_local_experts, num_tokens * spec.top_k))
    if rows <= 8:
        return (16,)
    if rows <= 24:
        return (16, 32)
    if rows <= 64:
        return (32, 64)
    return (64, 128)


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        import triton.testing

        # replayed from a CUDA graph: kernel time without the host's launch overhead
        return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3

    def cpu_time(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    return cpu_time


class _Search:
    """Coordinate descent over config rounds, counting the candidates timed and those that failed,
    and the wall seconds of their first runs (``first_s``: the compiles) and of their timing."""

    def __init__(
        self,
        timer: Callable[[Callable[[], None]], float],
        sync: Callable[[], None] = lambda: None,
        warm: Callable[[Iterable[Launch]], dict] | None = None,
    ) -> None:
        self.timer = timer
        self.sync = sync
        self.warm = warm
        self.warm_s = 0.0
        self.timed = 0
        self.failed = 0
        self.first_s = 0.0
        self.timing_s = 0.0

    def time(self, cfg: GemmConfig, make: Make) -> float | None:
        """``cfg``'s time, or ``None`` when it does not compile or run on this GPU (out of shared
        memory / registers: not a candidate). The first run compiles, outside the timing."""
        t0 = time.perf_counter()
        try:
            run = make(cfg)
            run()
            self.sync()
            t1 = time.perf_counter()
            self.first_s += t1 - t0
            us = self.timer(run)
            self.timing_s += time.perf_counter() - t1
        except Exception:
            self.failed += 1
            return None
        self.timed += 1
        return us

    def best(
        self, rounds: list[list[GemmConfig]], make: Make, fill: Fill, launches: Launches | None = None
    ) -> tuple[GemmConfig, float]:
        """The fastest config over the rounds (tile, then pipeline), each candidate timed once.
        With ``warm`` and ``launches`` (a candidate's launches, not run), a round's candidates are
        compiled together first (:func:`profile.warm_cache`), then timed one by one."""
        best, best_us = None, float("inf")
        seen: set[GemmConfig] = set()
        for round_ in rounds:
            todo = [cfg for cfg in dict.fromkeys(fill(round_, best)) if cfg not in seen]
            if self.warm is not None and launches is not None and len(todo) >= WARM_MIN_CANDIDATES:
                self._warm(todo, launches)
            for cfg in todo:
                seen.add(cfg)
                us = self.time(cfg, make)
                if us is not None and us < best_us:
                    best, best_us = cfg, us
        if best is None:
            raise RuntimeError("no config compiled and ran for this shape")
        return best, best_us

    def _warm(self, cfgs: list[GemmConfig], launches: Launches) -> None:
        """Compile ``cfgs``' launches ahead (built one candidate at a time, so that only one
        candidate's buffers are alive at once)."""

        def each() -> Iterable[Launch]:
            for cfg in cfgs:
                try:
                    found = launches(cfg)
                except Exception:  # not a candidate's launch (it fails where it is timed)
                    continue
                yield from found

        start = time.perf_counter()
        with contextlib.suppress(Exception):  # else a cold cache: the first runs compile, as without warming
            self.warm(each())
        self.warm_s += time.perf_counter() - start


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _inputs(spec: MoESpec, T: int, device: torch.device, routing: int = 0) -> Inputs:
    """Random tokens, router weights and distinct expert ids for ``T`` tokens (seeded by ``T`` and
    the ``routing``'s index)."""
    gen = torch.Generator(device=device).manual_seed(T + 1_000_003 * routing)
    x = torch.randn(T, spec.hidden_size, generator=gen, device=device).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=device)
    topk_ids = torch.rand(T, spec.num_experts, generator=gen, device=device).argsort(1)[:, : spec.top_k].int()
    return x, topk_w, topk_ids


def _stages(launches: list[Launch]) -> tuple[list[Launch], list[Launch], Launch, list[Launch]]:
    """:func:`fused_moe_launches`' launches as (token pre-pass, GEMM 1 with the intermediate's
    pre-pass, GEMM 2, combine)."""
    kernels = _kernels()
    i1 = next(i for i, launch in enumerate(launches) if launch[0] is kernels.moe_gemm1)
    i2 = next(i for i, launch in enumerate(launches) if launch[0] is kernels.moe_gemm2)
    return launches[:i1], launches[i1:i2], launches[i2], launches[i2 + 1 :]


def _run_all(launches: list[Launch]) -> None:
    for launch in launches:
        run_launch(*launch)


def _flat(groups: Iterable[Iterable[Launch]]) -> list[Launch]:
    return [launch for group in groups for launch in group]


def _time_block_m(
    spec: MoESpec,
    tensors: dict[str, torch.Tensor],
    T: int,
    routings: list[Inputs],
    block_m: int,
    device: torch.device,
    search: _Search,
    space: str,
) -> tuple[float, MoEConfig, dict[str, float]]:
    """Best GEMM configs for ``block_m`` at ``T`` tokens over ``routings`` (each timed stage runs
    once per routing, ``search.timer`` the mean), and the stage times of that choice."""
    timer = search.timer
    outs = [torch.empty(T, spec.hidden_size, dtype=spec.dtype, device=device) for _ in routings]
    blocks = [sort_tokens(spec, ids, tensors, block_m) for _, _, ids in routings]
    t_sort = timer(lambda: [sort_tokens(spec, ids, tensors, block_m) for _, _, ids in routings])

    def staged(g1: GemmConfig, g2: GemmConfig, count: int | None = None) -> list[list[Launch]]:
        """Per stage (:func:`_stages`), its launches for every routing in turn (the first ``count``)."""
        cfg = MoEConfig(block_m, g1, g2)
        per = [
            _stages(fused_moe_launches(spec, x, tensors, w, ids, out, cfg, b))
            for (x, w, ids), out, b in list(zip(routings, outs, blocks))[:count]
        ]
        pre, stage1, gemm2, post = zip(*per)
        return [_flat(pre), _flat(stage1), list(gemm2), _flat(post)]

    def make1(c: GemmConfig) -> Callable[[], None]:
        pre, stage1, _, _ = staged(c, c)
        _run_all(pre)
        return lambda: _run_all(stage1)

    def fill(nb: int) -> Fill:
        return lambda round_, best: _candidates(round_, best, block_m, nb, spec.quant)

    nb1 = 2 if spec.is_gated else 1
    g1, t1 = search.best(
        gemm_space(block_m, nb1, space, spec), make1, fill(nb1), lambda c: staged(c, c, 1)[1]
    )
    final: list[list[Launch]] = []

    def make2(c: GemmConfig) -> Callable[[], None]:
        pre, stage1, gemm2, post = staged(g1, c)
        _run_all(pre + stage1)
        final[:] = [pre, post]
        return lambda: _run_all(gemm2)

    g2, t2 = search.best(gemm_space(block_m, 1, space, spec), make2, fill(1), lambda c: staged(g1, c, 1)[2])
    pre, post = final
    t_quant = timer(lambda: _run_all(pre)) if pre else 0.0
    t_comb = timer(lambda: _run_all(post)) if post else 0.0
    total = t_sort + t_quant + t1 + t2 + t_comb
    parts = {
        "sort_us": t_sort,
        "quant_us": t_quant,
        "gemm1_us": t1,
        "gemm2_us": t2,
        "combine_us": t_comb,
        "total_us": total,
    }
    return total, MoEConfig(block_m, g1, g2), parts


def decode_space(
    base: GemmConfig, space: str = "full", spec: MoESpec | None = None, mma: bool = False
) -> list[list[GemmConfig]]:
    """Config rounds for one decode launch around the heuristic's ``base``: tiles (at ``base``'s
    split) and the tiles wider than ``base``'s at splits 2, 4 and 8 (``base``'s K step), then
    every split of the best, then pipelines (templates with ``block_n == 0`` as in
    :func:`gemm_space`); ``small``: ``base`` alone. ``spec``: tiles as the decode kernels launch
    them (fp8_block: its K block), each once; with fp8 activations a round before the splits
    tries the input quantized by a pre-pass (``prequant``) on the best tile and on every tile
    width at ``base``'s K step and split; ``mma`` (a target of the tensor-core kernels, a layer
    they take: bf16/fp16, fp8, mxfp4 weights) then a round of their tiles (``16 * num_warps`` or twice
    that many rows, 2 or 4 warps) at ``base``'s split and 2 and 4 times it, fp8 pre-quantized."""
    if space not in SPACES:
        raise ValueError(f"unknown tuning space {space!r}; expected one of {SPACES}")
    if space == "small":
        return [[base]]
    tile_n = (4, 8, 16) if space == "quick" else (4, 8, 16, 32)
    tile_k = (256, 512, 1024) if space == "quick" else (128, 256, 512, 1024)
    tiles = [
        GemmConfig(bn, bk, base.num_warps, base.num_stages, 1, split=base.split)
        for bn in tile_n
        for bk in tile_k
    ]
    # A wider tile with a split K keeps as many programs as a narrow one and shares the per-step
    # work of its rows (the activation step; fp8_block's group quantization) among more of them.
    # Searched one after the other, the narrow tile wins at split 1 and the split round never
    # sees the wide one: they are timed together.
    tiles += [
        GemmConfig(bn, base.block_k, base.num_warps, base.num_stages, 1, split=n)
        for bn in tile_n
        if bn > base.block_n
        for n in (2, 4, 8)
        if n != base.split
    ]
    if spec is not None:
        tiles = [replace(c, block_k=_decode_block_k(spec, c)) for c in tiles]
    tiles = _unique(tiles)
    splits = (1, 2, 4, 8) if space == "quick" else (1, 2, 3, 4, 6, 8, 12, 16)
    warps = (2, 4, 8)
    stages = (1, 2, 3) if space == "quick" else (1, 2, 3, 4)
    rounds = [tiles]
    if spec is not None and spec.quant.activation != "none":
        # the input quantized by a pre-pass: the best tile so far, and every tile width at the
        # heuristic's K step and split (without per-step quantization wide tiles gain less)
        pre = [GemmConfig(0, 0, 0, 0, 1, split=0, prequant=True)]
        pre += [
            replace(base, block_n=bn, block_k=_decode_block_k(spec, base), prequant=True) for bn in tile_n
        ]
        rounds.append(_unique(pre))
    if mma and spec is not None and spec.dtype in (torch.bfloat16, torch.float16):
        fp8 = spec.quant.activation != "none"
        step = max(_decode_block_k(spec, base), 128 if spec.quant.name == "mxfp4" else 64)
        rounds.append(
            _unique(
                GemmConfig(
                    bn, step, nw, base.num_stages, 1, split=min(16, base.split * m), prequant=fp8, mma=True
                )
                for nw in (2, 4)
                for bn in (16 * nw, 32 * nw)
                for m in (1, 2, 4)
            )
        )
    return [
        *rounds,
        [GemmConfig(0, 0, 0, 0, 1, split=n) for n in splits],
        [GemmConfig(0, 0, w, st, 1) for w in warps for st in stages],
    ]


def _time_decode(
    spec: MoESpec,
    tensors: dict[str, torch.Tensor],
    T: int,
    routings: list[Inputs],
    device: torch.device,
    search: _Search,
    space: str,
) -> tuple[DecodeConfig, dict[str, float]]:
    """The decode path's best tiles at ``T`` over ``routings`` (GEMM 1, then GEMM 2 on its output)
    and their times."""
    outs = [torch.empty(T, spec.hidden_size, dtype=spec.dtype, device=device) for _ in routings]
    amd = device.type == "cuda" and torch.version.hip is not None
    base_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    base = configs.decode_heuristic(spec, T, base_sms, amd)

    def stages(g1: GemmConfig, g2: GemmConfig, count: int | None = None) -> tuple[list[Launch], list[Launch]]:
        """The launches of GEMM 1 (after its input's pre-pass, if any) and of GEMM 2 (ditto), for
        every routing in turn (the first ``count``)."""
        stage1: list[Launch] = []
        stage2: list[Launch] = []
        for (x, w, ids), out in list(zip(routings, outs))[:count]:
            launches = decode_launches(spec, x, tensors, w, ids, out, DecodeConfig(g1, g2))
            names = [launch[0].__name__ for launch in launches]
            i1 = next(
                i for i, name in enumerate(names) if name in ("moe_decode_gemm1", "moe_decode_mma_gemm1")
            )
            for cfg, name in ((g1, names[i1]), (g2, names[-1])):
                if cfg.mma and "_mma_" not in name:  # a tile those kernels do not take: not a candidate
                    raise ValueError(f"{cfg} does not fit the tensor-core decode kernels")
            stage1 += launches[: i1 + 1]
            stage2 += launches[i1 + 1 :]
        return stage1, stage2

    def make1(c: GemmConfig) -> Callable[[], None]:
        stage1 = stages(c, base.gemm2)[0]
        return lambda: _run_all(stage1)

    # MOE_PORTABLE_DECODE_MMA=0: the tensor-core kernels untried (a fault there would end the process)
    mma = _mma_capable(device) and os.environ.get("MOE_PORTABLE_DECODE_MMA", "") != "0"
    g1, t1 = search.best(
        decode_space(base.gemm1, space, spec, mma), make1, _filled, lambda c: stages(c, base.gemm2, 1)[0]
    )

    def make2(c: GemmConfig) -> Callable[[], None]:
        stage1, stage2 = stages(g1, c)
        _run_all(stage1)  # GEMM 2 reads its intermediate
        return lambda: _run_all(stage2)

    g2, t2 = search.best(
        decode_space(base.gemm2, space, spec, mma), make2, _filled, lambda c: stages(g1, c, 1)[1]
    )
    best, parts = DecodeConfig(g1, g2), {"gemm1_us": t1, "gemm2_us": t2, "total_us": t1 + t2}
    # the chained launch: NVIDIA only, and opt-in (MOE_PORTABLE_TUNE_CHAIN=1): it won 1 of 6 H100 cases
    tried = (
        os.environ.get("MOE_PORTABLE_TUNE_CHAIN") == "1"
        and os.environ.get("MOE_PORTABLE_DECODE_CHAIN") != "0"
    )
    if amd or not tried:
        return best, parts

    def whole(cfg: DecodeConfig) -> Callable[[], None]:
        """The step of ``cfg`` for every routing in turn (a chained ``cfg`` that does not chain: an error)."""
        launches = [
            launch
            for (x, w, ids), out in zip(routings, outs)
            for launch in decode_launches(spec, x, tensors, w, ids, out, cfg)
        ]
        if cfg.chain and len(launches) != len(routings):
            raise ValueError(f"{cfg} does not chain")
        return lambda: _run_all(launches)

    # both GEMMs in one launch, with and without the L2 prefetch: the tuned tiles and the heuristic's
    # (``base``), on the GEMV kernels and nothing pre-quantized; taken where faster than the tuned
    # two launches timed as one step
    step_us = search.time(best, whole)
    chained: tuple[DecodeConfig, float] | None = None
    for cfg in dict.fromkeys(tiles.chained(prefetch) for tiles in (best, base) for prefetch in (True, False)):
        us = search.time(cfg, whole)
        if us is not None and (chained is None or us < chained[1]):
            chained = cfg, us
    if step_us is not None:
        parts["step_us"] = step_us
    if chained is not None:
        parts["chain_us"] = chained[1]
        if step_us is not None and chained[1] < step_us:
            best, parts["total_us"] = chained
    return best, parts


def tune_layer(
    spec: MoESpec,
    device: torch.device | str = "cuda",
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    weights: ExpertWeights | None = None,
    progress: Progress | None = None,
    space: str = "full",
    routings: int | None = None,
    precompile: int | None = None,
) -> dict[str, dict]:
    """Best :class:`MoEConfig` per token bucket for ``spec``: ``{bucket: config json}`` (plus timings).

    ``space`` is one of :data:`SPACES`. ``weights`` (default: random ones) may be
    high-precision canonical weights of a quantized ``spec``: they are quantized first.
    ``routings``: how many routings each candidate is timed over (default:
    ``moe_core.bench.cold_routings`` on a GPU, 1 on the CPU); times are per routing.
    ``precompile``: on a GPU, compile each round's candidates ahead in that many worker
    processes (:func:`profile.warm_cache`, rounds of :data:`WARM_MIN_CANDIDATES` or more), then
    time them one by one; 0: each compiles at its first run; ``None``: :func:`default_precompile`.
    """
    device = torch.device(device)
    if precompile is None:
        precompile = default_precompile(device)
    with contextlib.ExitStack() as stack:
        warm = _warmer(device, precompile, stack)
        return _tune_layer(spec, device, tokens, weights, progress, space, routings, warm)


def default_precompile(device: torch.device) -> int:
    """Precompile workers :func:`tune_layer` uses by default: on an NVIDIA GPU one per CPU core but
    one (at most 16), 0 with fewer than 3 cores; 0 elsewhere (measured on NVIDIA only: H100, 16 cores,
    14 workers: a layer's first runs 118 -> 11 s, its whole search 148 -> 86 s, the same configs)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return 0
    cores = os.cpu_count() or 1
    return min(16, cores - 1) if cores >= 3 else 0


def _warmer(device: torch.device, workers: int, stack: contextlib.ExitStack) -> Callable | None:
    """:func:`profile.warm_cache` for ``device``'s GPU in a pool of ``workers`` (closed with ``stack``)."""
    if workers <= 0 or device.type != "cuda":
        return None
    from triton.runtime import driver

    from . import profile

    target = driver.active.get_current_target()
    pool = stack.enter_context(profile.CompilePool(workers))
    return functools.partial(
        profile.warm_cache, gpu=(target.backend, target.arch, target.warp_size), pool=pool
    )


def _tune_layer(
    spec: MoESpec,
    device: torch.device,
    tokens: Iterable[int],
    weights: ExpertWeights | None,
    progress: Progress | None,
    space: str,
    routings: int | None,
    warm: Callable | None,
) -> dict[str, dict]:
    timer = _timer(device)
    weights = weights or random_expert_weights(spec, device=device, seed=0)
    tensors = _prepare(spec, weights, None)
    tokens = list(tokens)
    result: dict[str, dict] = {}
    for step, T in enumerate(tokens):
        if progress:
            progress(f"{configs.layer_key(spec)} T={T}", step, len(tokens))
        n = routings or (cold_routings(spec, T) if device.type == "cuda" else 1)
        inputs = [_inputs(spec, T, device, r) for r in range(n)]
        search = _Search(
            lambda fn, n=n: timer(fn) / n,
            torch.cuda.synchronize if device.type == "cuda" else lambda: None,
            warm,
        )
        timings = [
            _time_block_m(spec, tensors, T, inputs, block_m, device, search, space)
            for block_m in _block_ms(spec, T)
        ]
        _, config, parts = min(timings, key=lambda r: r[0])
        entry = {**config.to_json(), "tuned_at_tokens": T, "timing": parts}
        if T <= configs.DECODE_MAX_TOKENS:
            decode, decode_parts = _time_decode(spec, tensors, T, inputs, device, search, space)
            use = decode_parts["total_us"] < parts["total_us"]
            entry["decode"] = {"use": use, **decode.to_json(), "timing": decode_parts}
        entry["searched"] = [search.timed, search.failed]
        entry["routings"] = n
        entry["search_s"] = {
            "first_runs": round(search.first_s, 1),
            "timing": round(search.timing_s, 1),
            "precompile": round(search.warm_s, 1),
        }
        result[configs.t_bucket(T)] = entry
    if progress:
        progress(configs.layer_key(spec), len(tokens), len(tokens))
    return result


def write_table(
    device_name: str, entries: dict[str, dict[str, dict]], folder: Path | str, triton_version: str
) -> Path:
    """Merge ``{layer_key: {bucket: config}}`` into ``folder/<device>.json`` and return its path."""
    path = Path(folder) / configs.config_file_name(device_name)
    table = json.loads(path.read_text()) if path.is_file() else {"device": device_name, "configs": {}}
    table["device"] = device_name
    table["triton"] = triton_version
    for key, buckets in entries.items():
        table["configs"].setdefault(key, {}).update(buckets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    configs._load_table.cache_clear()
    return path
