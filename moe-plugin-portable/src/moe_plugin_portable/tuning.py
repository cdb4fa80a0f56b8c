"""``moe tune`` for the portable fused MoE: time configs per token bucket, write the GPU's table.

For each token count (one per bucket of :data:`configs.T_BUCKETS`) and each
candidate ``block_m``, GEMM 1 and GEMM 2 are timed separately over their
config spaces on the same sorted tokens (they share only ``block_m``); the
fastest (sort + GEMM 1 + GEMM 2 + combine) wins. Candidates that do not
compile or do not fit the shared memory are skipped. Times are medians of
CUDA-graph replays (``triton.testing.do_bench_cudagraph``: device time only,
as an engine running under graphs sees it), on random data.

Where the decode path is taken (:func:`configs.use_decode`; in practice the
``T=1`` bucket), its two launches are tuned too (GEMM 1 tiles and pipelines,
then GEMM 2's, from :func:`decode_space`) and the bucket's entry gets
``"decode": {"use": decode faster than sorted, "gemm1": ..., "gemm2": ...,
"timing": ...}``, which :func:`configs.lookup_decode` reads (only the ``T=1``
bucket: the others span token counts the rule treats differently).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from moe_core import ExpertWeights, MoESpec
from moe_core.testing import random_expert_weights

from . import configs
from ._launch import run_launch
from .configs import DecodeConfig, GemmConfig, MoEConfig
from .experts import _prepare, decode_launches, launch_combine, launch_gemm1, launch_gemm2, sort_tokens

__all__ = ["DEFAULT_TOKENS", "SPACES", "decode_space", "gemm_space", "tune_layer", "write_table"]

DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
_SMEM_BUDGET = 200 * 1024
Progress = Callable[[str, int, int], None]


def _fits(cfg: GemmConfig, block_m: int, operands_b: int, elem_bytes: int = 2) -> bool:
    smem = cfg.num_stages * (block_m * cfg.block_k + operands_b * cfg.block_n * cfg.block_k) * elem_bytes
    return smem <= _SMEM_BUDGET and not (cfg.num_warps == 8 and block_m * cfg.block_n < 64 * 128)


#: Search spaces of :func:`gemm_space`: ``full`` (``moe tune``), ``quick`` (about a third of the
#: candidates: the tiles and pipelines that win on Hopper), ``small`` (two configs, for CPU tests).
SPACES = ("full", "quick", "small")


def gemm_space(block_m: int, operands_b: int, space: str = "full") -> list[list[GemmConfig]]:
    """Config rounds for one GEMM at ``block_m``: tiles first, then pipelines around the best tile.

    Each round is a list of candidates; a round's entries with ``block_n == 0``
    are templates whose tile is replaced by the best tile of the round before.
    """
    if space not in SPACES:
        raise ValueError(f"unknown tuning space {space!r}; expected one of {SPACES}")
    if space == "small":
        return [[GemmConfig(32, 64, 4, 2, 8), GemmConfig(64, 64, 4, 2, 8)]]
    stages = 4 if block_m <= 32 else 3
    warps = 4 if block_m <= 64 else 8
    quick = space == "quick"
    tile_n = (32, 64, 128, 256) if not quick else ((32, 64, 128) if block_m <= 32 else (64, 128, 256))
    tile_k = (64, 128, 256) if not quick else (64, 128)
    tiles = [
        GemmConfig(bn, bk, warps, stages, 8)
        for bn, bk in itertools.product(tile_n, tile_k)
        if _fits(GemmConfig(bn, bk, warps, stages, 8), block_m, operands_b)
    ]
    if quick:
        pipelines = [GemmConfig(0, 0, w, st, 8) for w, st in itertools.product((4, 8), (3, 4, 5))]
    else:
        pipelines = [
            GemmConfig(0, 0, w, st, g) for w, st, g in itertools.product((4, 8), (2, 3, 4, 5), (1, 8))
        ]
    return [tiles, pipelines]


def _candidates(rounds: list[list[GemmConfig]], best: GemmConfig | None, block_m: int, operands_b: int):
    for cfg in rounds:
        if cfg.block_n == 0:
            if best is None:
                continue
            cfg = GemmConfig(best.block_n, best.block_k, cfg.num_warps, cfg.num_stages, cfg.group_m)
        if _fits(cfg, block_m, operands_b):
            yield cfg


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


def _time_config(
    cfg: GemmConfig, run: Callable[[GemmConfig], None], timer: Callable[[Callable[[], None]], float]
) -> float | None:
    """``cfg``'s time, or ``None`` when it does not compile or run on this GPU (out of shared
    memory / registers: not a candidate). The first run compiles, outside the timing."""
    try:
        run(cfg)
        return timer(lambda: run(cfg))
    except Exception:
        return None


def _best(
    rounds: list[list[GemmConfig]],
    run: Callable[[GemmConfig], None],
    timer: Callable[[Callable[[], None]], float],
    block_m: int,
    operands_b: int,
) -> tuple[GemmConfig, float]:
    """The fastest config over the rounds (coordinate descent: tile, then pipeline)."""
    best, best_us = None, float("inf")
    for round_ in rounds:
        for cfg in _candidates(round_, best, block_m, operands_b):
            us = _time_config(cfg, run, timer)
            if us is not None and us < best_us:
                best, best_us = cfg, us
    if best is None:
        raise RuntimeError("no GEMM config compiled and ran for this shape")
    return best, best_us


def _time_block_m(
    spec: MoESpec,
    tensors: dict[str, torch.Tensor],
    T: int,
    block_m: int,
    device: torch.device,
    timer: Callable[[Callable[[], None]], float],
    space: str,
) -> tuple[float, MoEConfig, dict[str, float]]:
    """Best GEMM configs for ``block_m`` at ``T`` tokens, and the stage times of that choice."""
    gen = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, spec.hidden_size, generator=gen, device=device).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=device)
    topk_ids = torch.rand(T, spec.num_experts, generator=gen, device=device).argsort(1)[:, : spec.top_k].int()
    direct = spec.top_k == 1 and "expert_map" not in tensors
    y = torch.empty(T * spec.top_k, spec.hidden_size, dtype=spec.dtype, device=device)
    out = torch.empty(T, spec.hidden_size, dtype=spec.dtype, device=device)
    blocks = sort_tokens(spec, topk_ids, tensors, block_m)
    t_sort = timer(lambda: sort_tokens(spec, topk_ids, tensors, block_m))
    inter = torch.empty(blocks.sorted_ids.numel(), spec.intermediate_size, dtype=spec.dtype, device=device)
    nb1 = 2 if spec.is_gated else 1
    space1 = gemm_space(block_m, nb1, space)
    g1, t1 = _best(
        space1, lambda c: launch_gemm1(spec, x, tensors, blocks, topk_w, c, inter), timer, block_m, nb1
    )
    launch_gemm1(spec, x, tensors, blocks, topk_w, g1, inter)
    space2 = gemm_space(block_m, 1, space)
    g2, t2 = _best(
        space2, lambda c: launch_gemm2(spec, inter, tensors, blocks, topk_w, c, y, direct), timer, block_m, 1
    )
    t_comb = 0.0 if direct else timer(lambda: launch_combine(spec, y, topk_ids, tensors, out))
    total = t_sort + t1 + t2 + t_comb
    parts = {"sort_us": t_sort, "gemm1_us": t1, "gemm2_us": t2, "combine_us": t_comb, "total_us": total}
    return total, MoEConfig(block_m, g1, g2), parts


def decode_space(base: GemmConfig, space: str = "full") -> list[list[GemmConfig]]:
    """Config rounds for one decode launch around the heuristic's ``base``: tiles, then pipelines
    (templates with ``block_n == 0`` as in :func:`gemm_space`); ``small``: ``base`` alone."""
    if space not in SPACES:
        raise ValueError(f"unknown tuning space {space!r}; expected one of {SPACES}")
    if space == "small":
        return [[base]]
    tile_n = (4, 8, 16) if space == "quick" else (4, 8, 16, 32)
    tile_k = (256, 512) if space == "quick" else (128, 256, 512)
    tiles = [GemmConfig(bn, bk, base.num_warps, base.num_stages, 1) for bn in tile_n for bk in tile_k]
    warps = (2, 4, 8)
    stages = (1, 2, 3) if space == "quick" else (1, 2, 3, 4)
    return [tiles, [GemmConfig(0, 0, w, st, 1) for w in warps for st in stages]]


def _best_decode(rounds: list[list[GemmConfig]], run: Callable[[GemmConfig], None], timer) -> tuple:
    best, best_us = None, float("inf")
    for round_ in rounds:
        for cfg in round_:
            if cfg.block_n == 0:
                if best is None:
                    continue
                cfg = GemmConfig(best.block_n, best.block_k, cfg.num_warps, cfg.num_stages, 1)
            us = _time_config(cfg, run, timer)
            if us is not None and us < best_us:
                best, best_us = cfg, us
    if best is None:
        raise RuntimeError("no decode config compiled and ran for this shape")
    return best, best_us


def _time_decode(
    spec: MoESpec,
    tensors: dict[str, torch.Tensor],
    T: int,
    device: torch.device,
    timer: Callable[[Callable[[], None]], float],
    space: str,
) -> tuple[DecodeConfig, dict[str, float]]:
    """The decode path's best tiles at ``T`` (GEMM 1, then GEMM 2 on its output) and their times."""
    gen = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, spec.hidden_size, generator=gen, device=device).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=device)
    topk_ids = torch.rand(T, spec.num_experts, generator=gen, device=device).argsort(1)[:, : spec.top_k].int()
    out = torch.empty(T, spec.hidden_size, dtype=spec.dtype, device=device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        base = configs.decode_heuristic(spec, T, props.multi_processor_count, bool(torch.version.hip))
    else:
        base = configs.decode_heuristic(spec, T, 8, False)

    def launches(g1: GemmConfig, g2: GemmConfig) -> list:
        return decode_launches(spec, x, tensors, topk_w, topk_ids, out, DecodeConfig(g1, g2))

    def run1(c: GemmConfig) -> None:
        run_launch(*launches(c, base.gemm2)[0])

    g1, t1 = _best_decode(decode_space(base.gemm1, space), run1, timer)
    prepared: dict[GemmConfig, list] = {}

    def run2(c: GemmConfig) -> None:
        if c not in prepared:  # GEMM 1 once per candidate: GEMM 2 reads its intermediate
            prepared[c] = launches(g1, c)
            run_launch(*prepared[c][0])
        run_launch(*prepared[c][1])

    g2, t2 = _best_decode(decode_space(base.gemm2, space), run2, timer)
    return DecodeConfig(g1, g2), {"gemm1_us": t1, "gemm2_us": t2, "total_us": t1 + t2}


def tune_layer(
    spec: MoESpec,
    device: torch.device | str = "cuda",
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    weights: ExpertWeights | None = None,
    progress: Progress | None = None,
    space: str = "full",
) -> dict[str, dict]:
    """Best :class:`MoEConfig` per token bucket for ``spec``: ``{bucket: config json}`` (plus timings).

    ``space`` is one of :data:`SPACES`.
    """
    device = torch.device(device)
    timer = _timer(device)
    weights = weights or random_expert_weights(spec, device=device, seed=0)
    tensors = _prepare(spec, weights, None)
    tokens = list(tokens)
    result: dict[str, dict] = {}
    for step, T in enumerate(tokens):
        if progress:
            progress(f"{configs.layer_key(spec)} T={T}", step, len(tokens))
        timings = [
            _time_block_m(spec, tensors, T, block_m, device, timer, space) for block_m in _block_ms(spec, T)
        ]
        _, config, parts = min(timings, key=lambda r: r[0])
        entry = {**config.to_json(), "tuned_at_tokens": T, "timing": parts}
        if T == 1 and configs.use_decode(T, spec.top_k, spec.num_experts):
            decode, decode_parts = _time_decode(spec, tensors, T, device, timer, space)
            use = decode_parts["total_us"] < parts["total_us"]
            entry["decode"] = {"use": use, **decode.to_json(), "timing": decode_parts}
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
