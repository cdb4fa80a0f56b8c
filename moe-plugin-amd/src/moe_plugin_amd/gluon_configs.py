"""Block selection of ``amd.gluon.mxfp4``: one small table per token bucket and GEMM.

``BLOCK_M`` is the moe_sorting unit (one sorted block = one expert's rows) and is shared by
both GEMMs of a call; ``BLOCK_N``/``BLOCK_K``/warps are per GEMM. ``BLOCK_K`` is 256 where it
divides the padded K (``H_PAD`` for GEMM 1, ``I_PAD`` for GEMM 2), else 128 (at gpt-oss's
2880 -> 2944 it is 128). ``stages`` is 2 (the next K step's activation and weight tiles
are loaded into registers before this step's MFMAs; the weight tile goes straight to the MFMA
operand registers, one ``dwordx4`` per lane thanks to the shuffle) or 1 (load, then MFMA): 2
for the decode and small buckets, which are bound by weight bytes; 1 for the large tiles,
where a second register copy of the tiles costs occupancy (W4A16 at BLOCK_M 128 spills with
2). No multi-buffered LDS pipeline is implemented. Every entry compiles for gfx950 with 0
spills and no scratch at the
gpt-oss shapes (``moe amd profile``; tests/amd/test_profile.py gates it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUCKETS", "GemmConfig", "TileConfig", "select_config"]


@dataclass(frozen=True)
class GemmConfig:
    """One GEMM's tiles: ``BLOCK_N`` columns per program, warps as ``warps_m x (num_warps/warps_m)``,
    ``stages`` 1 or 2 (register prefetch of the next K step)."""

    block_n: int
    num_warps: int
    warps_m: int
    stages: int = 1


@dataclass(frozen=True)
class TileConfig:
    """A call's tiles: ``block_m`` (the sorting unit) and each GEMM's :class:`GemmConfig`."""

    block_m: int
    gemm1: GemmConfig
    gemm2: GemmConfig

    def block_k(self, k_pad: int) -> int:
        return 256 if k_pad % 256 == 0 else 128


#: ``(max T, config)``: the first bucket with ``T <= max T`` applies (the last is unbounded).
BUCKETS: tuple[tuple[int | None, TileConfig], ...] = (
    (16, TileConfig(16, GemmConfig(64, 4, 1, 2), GemmConfig(64, 4, 1, 2))),
    (128, TileConfig(32, GemmConfig(64, 4, 2, 2), GemmConfig(64, 4, 2, 2))),
    (1024, TileConfig(64, GemmConfig(128, 8, 2), GemmConfig(128, 4, 2))),
    (None, TileConfig(128, GemmConfig(128, 8, 2), GemmConfig(128, 8, 2))),
)


def select_config(num_tokens: int) -> TileConfig:
    """The table entry for ``num_tokens`` tokens."""
    for limit, cfg in BUCKETS:
        if limit is None or num_tokens <= limit:
            return cfg
    raise AssertionError("the last bucket is unbounded")
