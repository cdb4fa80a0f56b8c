"""Triton kernels of ``amd.triton.moe_sorting``: a counting sort in three paths, no comparison sort.

Terms: ``N = T * k`` flat entries (entry ``i = t * k + s``), each with a local
expert ``e`` (``expert_mask`` numbering) or dropped (id outside ``[0, E)`` or a
non-local expert). Per-expert vectors have ``E_PAD`` lanes (a power of two
``>= E``) and live in registers; the layout of the output follows from the
per-expert counts ``c_e``::

    nblk_e     = ceil(c_e / B)                 (experts without entries take no unit)
    pad_start  = exclusive cumsum of nblk * B  (first slot of expert e)
    blk_end    = inclusive cumsum of nblk      (units of experts <= e)

Placement is stable: an entry's slot is ``pad_start[e]`` plus the number of
entries of ``e`` before it in flat order, computed as

- a running per-expert count over chunks of ``C`` entries taken in order
  (``tl.histogram`` of each chunk), plus
- the entry's rank among the equal experts earlier in its chunk (a ``C x C``
  comparison, :func:`_rank_in_chunk`),

or, on the per-expert path, as a prefix sum (``tl.cumsum``) of the entries
that hit the program's expert. Entries and padding are disjoint slots; padding,
unit expert ids and the tail past the used units are written by
:func:`_fill_units`, each program over a static share of the units, so every
output slot is written exactly once and nothing is cleared first.

Kernels by path (the host picks the path from ``T``, see ``moe_plugin_amd.sorting``):

- ``sort_oneshot`` (small ``T``, one launch): every program histograms all
  ``N`` entries (a few hundred at most); program 0 scatters them in chunks;
  every program fills its share of the units.
- ``sort_expert_count`` + ``sort_expert_scatter`` (medium ``T``, two
  launches, ``EPP`` experts per program, 1 by default as in FlyDSL): a program
  counts the entries of its experts; then it derives their start slots from
  all counts, scans the entries in order, places its own with a prefix sum
  per expert (stopping as soon as all are placed) and fills its share of the
  units.
- ``sort_tile_count`` + ``sort_tile_prefix`` + ``sort_tile_scatter`` (large
  ``T``, three launches): per-tile histograms ``hist [NT, E]``; an exclusive
  scan down each expert column (in place) and the totals; then each tile
  program places its entries from its row of offsets, and every program fills
  its share of the units.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _local_map(mask_ptr, E, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr):
    """``[E_PAD]`` local id of each global expert: its rank among the masked ones, ``-1`` if not local."""
    eo = tl.arange(0, E_PAD)
    if HAS_MASK:
        on = tl.load(mask_ptr + eo, mask=eo < E, other=0) != 0
        local = tl.where(on, tl.cumsum(on.to(tl.int32), 0) - 1, -1)
    else:
        local = eo
    return local


@triton.jit
def _entries(ids_ptr, s0, s1, offs, N, E, local, K: tl.constexpr, HAS_MASK: tl.constexpr):
    """Local expert (0 when dropped) and whether each flat entry ``offs`` is kept."""
    inside = offs < N
    t = offs // K
    s = offs - t * K
    raw = tl.load(ids_ptr + t.to(tl.int64) * s0 + s * s1, mask=inside, other=-1)
    kept = inside & (raw >= 0) & (raw < E)  # compared in the ids' dtype: int64 never wraps
    e = tl.where(kept, raw, 0).to(tl.int32)
    if HAS_MASK:
        e = tl.gather(local, e, 0)
        kept = kept & (e >= 0)
        e = tl.where(kept, e, 0)
    return e, kept


@triton.jit
def _rank_in_chunk(e, kept, C: tl.constexpr):
    """For each entry of a chunk: kept entries of the same expert before it in the chunk."""
    key = tl.where(kept, e, -1)
    lane = tl.arange(0, C)
    earlier = lane[None, :] < lane[:, None]
    same = (key[:, None] == key[None, :]) & earlier & kept[None, :]
    return tl.sum(same.to(tl.int32), 1)


@triton.jit
def _place(out_ids_ptr, out_w_ptr, w_ptr, ws0, ws1, flat, dest, kept, K: tl.constexpr):
    """Write the packed ``(slot << 24) | token`` and the float32 weight of kept entries at ``dest``."""
    t = flat // K
    s = flat - t * K
    tl.store(out_ids_ptr + dest, (s << 24) | t, mask=kept)
    w = tl.load(w_ptr + t.to(tl.int64) * ws0 + s * ws1, mask=kept, other=0.0)
    tl.store(out_w_ptr + dest, w.to(tl.float32), mask=kept)


@triton.jit
def _scatter_chunks(
    ids_ptr,
    w_ptr,
    out_ids_ptr,
    out_w_ptr,
    start,
    stop,
    base,
    local,
    s0,
    s1,
    ws0,
    ws1,
    E,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    C: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Place the entries ``[start, stop)`` in order; ``base [E_PAD]``: next free slot per expert."""
    nxt = base
    for c0 in range(start, stop, C):
        offs = c0 + tl.arange(0, C)
        e, kept = _entries(ids_ptr, s0, s1, offs, stop, E, local, K, HAS_MASK)
        dest = tl.gather(nxt, e, 0) + _rank_in_chunk(e, kept, C)
        _place(out_ids_ptr, out_w_ptr, w_ptr, ws0, ws1, offs, dest, kept, K)
        nxt += tl.histogram(e, E_PAD, mask=kept)


@triton.jit
def _layout(counts, B: tl.constexpr):
    """From per-expert counts: first slot, end of entries, end unit (inclusive scan), used slots/units."""
    nblk = (counts + (B - 1)) // B
    size = nblk * B
    pad_start = tl.cumsum(size, 0) - size
    blk_end = tl.cumsum(nblk, 0)
    return pad_start, pad_start + counts, blk_end, tl.sum(size, 0), tl.sum(nblk, 0)


@triton.jit
def _fill_units(
    out_ids_ptr,
    out_w_ptr,
    out_blk_ptr,
    blk_end,
    entries_end,
    used_units,
    T,
    first,
    count,
    MAX_UNITS,
    B: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E: tl.constexpr,
    BC: tl.constexpr,
    SC: tl.constexpr,
):
    """Units ``[first, first + count)``: their expert (``-1`` past the used ones) and every slot that
    holds no entry (padding of a used unit, all of an unused one): token ``T``, weight 0."""
    stop = tl.minimum(first + count, MAX_UNITS)
    for u0 in range(first, stop, BC):
        u = u0 + tl.arange(0, BC)
        # expert of unit u = number of experts whose units all end at or before u (binary lifting)
        expert = tl.zeros([BC], dtype=tl.int32)
        for i in tl.static_range(LOG_E):
            below = tl.gather(blk_end, expert + ((E_PAD >> (i + 1)) - 1), 0) <= u
            expert = tl.where(below, expert + (E_PAD >> (i + 1)), expert)
        used = u < used_units
        inside = u < stop
        tl.store(out_blk_ptr + u, tl.where(used, expert, -1), mask=inside)
        first_pad = tl.where(used, tl.gather(entries_end, expert, 0), 0)
        for j0 in tl.static_range(0, B, SC):
            j = j0 + tl.arange(0, SC)
            slot = u[:, None] * B + j[None, :]
            pad = inside[:, None] & (j[None, :] < B) & (slot >= first_pad[:, None])
            tl.store(out_ids_ptr + slot, tl.zeros([BC, SC], dtype=tl.int32) + T, mask=pad)
            tl.store(out_w_ptr + slot, tl.zeros([BC, SC], dtype=tl.float32), mask=pad)


# ----------------------------------------------------------------------------- oneshot (1 launch)


# Sizes that grow with T are not specialised: one compiled variant per (k, E, unit, mask, chunk).
@triton.jit(do_not_specialize=["N", "T", "MAX_UNITS", "UNITS_PER_PROG"])
def sort_oneshot(
    ids_ptr,
    w_ptr,
    mask_ptr,
    out_ids_ptr,
    out_w_ptr,
    out_blk_ptr,
    out_num_ptr,
    N,
    E,
    T,
    MAX_UNITS,
    UNITS_PER_PROG,
    s0,
    s1,
    ws0,
    ws1,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    B: tl.constexpr,
    C: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E: tl.constexpr,
    BC: tl.constexpr,
    SC: tl.constexpr,
):
    """Small ``T``: histogram + prefix sum of all entries in registers; program 0 places the entries."""
    pid = tl.program_id(0)
    local = _local_map(mask_ptr, E, E_PAD, HAS_MASK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, N, C):
        e, kept = _entries(ids_ptr, s0, s1, c0 + tl.arange(0, C), N, E, local, K, HAS_MASK)
        counts += tl.histogram(e, E_PAD, mask=kept)
    pad_start, entries_end, blk_end, used_slots, used_units = _layout(counts, B)
    if pid == 0:
        tl.store(out_num_ptr, used_slots)
        tl.store(out_num_ptr + 1, T)
        _scatter_chunks(
            ids_ptr, w_ptr, out_ids_ptr, out_w_ptr, 0, N, pad_start, local,
            s0, s1, ws0, ws1, E, K, HAS_MASK, C, E_PAD,
        )  # fmt: skip
    _fill_units(
        out_ids_ptr, out_w_ptr, out_blk_ptr, blk_end, entries_end, used_units, T,
        pid * UNITS_PER_PROG, UNITS_PER_PROG, MAX_UNITS, B, E_PAD, LOG_E, BC, SC,
    )  # fmt: skip


# ----------------------------------------------------------------------------- per expert (2 launches)


@triton.jit(do_not_specialize=["N"])
def sort_expert_count(
    ids_ptr,
    mask_ptr,
    counts_ptr,
    N,
    E,
    s0,
    s1,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EPP: tl.constexpr,
    CM: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """``counts[e]`` = kept entries of local expert ``e``, for the ``EPP`` experts of this program."""
    experts = tl.program_id(0) * EPP + tl.arange(0, EPP)
    local = _local_map(mask_ptr, E, E_PAD, HAS_MASK)
    hits = tl.zeros([EPP], dtype=tl.int32)
    for c0 in range(0, N, CM):
        e, kept = _entries(ids_ptr, s0, s1, c0 + tl.arange(0, CM), N, E, local, K, HAS_MASK)
        hits += tl.sum((kept[:, None] & (e[:, None] == experts[None, :])).to(tl.int32), 0)
    tl.store(counts_ptr + experts, hits, mask=experts < E)


@triton.jit(do_not_specialize=["N", "T", "MAX_UNITS", "UNITS_PER_PROG"])
def sort_expert_scatter(
    ids_ptr,
    w_ptr,
    mask_ptr,
    counts_ptr,
    out_ids_ptr,
    out_w_ptr,
    out_blk_ptr,
    out_num_ptr,
    N,
    E,
    T,
    MAX_UNITS,
    UNITS_PER_PROG,
    s0,
    s1,
    ws0,
    ws1,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    B: tl.constexpr,
    EPP: tl.constexpr,
    CM: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E: tl.constexpr,
    BC: tl.constexpr,
    SC: tl.constexpr,
):
    """The ``EPP`` experts of this program: start slots from every expert's count, then a prefix sum
    per expert over its entries, in flat order."""
    pid = tl.program_id(0)
    eo = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + eo, mask=eo < E, other=0)
    pad_start, entries_end, blk_end, used_slots, used_units = _layout(counts, B)
    if pid == 0:
        tl.store(out_num_ptr, used_slots)
        tl.store(out_num_ptr + 1, T)
    experts = pid * EPP + tl.arange(0, EPP)
    mine = tl.minimum(experts, E_PAD - 1)
    todo = tl.sum(tl.where(experts < E, tl.gather(counts, mine, 0), 0), 0)
    if todo > 0:
        local = _local_map(mask_ptr, E, E_PAD, HAS_MASK)
        nxt = tl.gather(pad_start, mine, 0)  # next free slot of each of the program's experts
        c0 = todo * 0
        placed = todo * 0
        while (placed < todo) & (c0 < N):  # stops after the last entry of the program's experts
            offs = c0 + tl.arange(0, CM)
            e, kept = _entries(ids_ptr, s0, s1, offs, N, E, local, K, HAS_MASK)
            match = kept[:, None] & (e[:, None] == experts[None, :])  # [CM, EPP], one hit per row at most
            order = tl.cumsum(match.to(tl.int32), 0)
            dest = tl.sum(tl.where(match, nxt[None, :] + order - 1, 0), 1)
            hit = tl.sum(match.to(tl.int32), 1) > 0
            _place(out_ids_ptr, out_w_ptr, w_ptr, ws0, ws1, offs, dest, hit, K)
            found = tl.sum(match.to(tl.int32), 0)
            nxt += found
            placed += tl.sum(found, 0)
            c0 += CM
    _fill_units(
        out_ids_ptr, out_w_ptr, out_blk_ptr, blk_end, entries_end, used_units, T,
        pid * UNITS_PER_PROG, UNITS_PER_PROG, MAX_UNITS, B, E_PAD, LOG_E, BC, SC,
    )  # fmt: skip


# ----------------------------------------------------------------------------- tiled (3 launches)


@triton.jit(do_not_specialize=["N"])
def sort_tile_count(
    ids_ptr,
    mask_ptr,
    hist_ptr,
    N,
    E,
    s0,
    s1,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BT: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """``hist[tile, e]`` = kept entries of local expert ``e`` in tile ``program_id`` (``BT`` entries)."""
    pid = tl.program_id(0)
    local = _local_map(mask_ptr, E, E_PAD, HAS_MASK)
    e, kept = _entries(ids_ptr, s0, s1, pid * BT + tl.arange(0, BT), N, E, local, K, HAS_MASK)
    eo = tl.arange(0, E_PAD)
    tl.store(hist_ptr + pid * E + eo, tl.histogram(e, E_PAD, mask=kept), mask=eo < E)


@triton.jit(do_not_specialize=["NT"])
def sort_tile_prefix(
    hist_ptr,
    counts_ptr,
    NT,
    E,
    EB: tl.constexpr,
    TR: tl.constexpr,
):
    """Experts ``[program_id * EB, +EB)``: ``hist`` becomes the exclusive scan down each column (entries
    of the expert in the tiles before), ``counts`` the column totals."""
    cols = tl.program_id(0) * EB + tl.arange(0, EB)
    total = tl.zeros([EB], dtype=tl.int32)
    for r0 in range(0, NT, TR):
        rows = r0 + tl.arange(0, TR)
        where = (rows[:, None] < NT) & (cols[None, :] < E)
        ptrs = hist_ptr + rows[:, None] * E + cols[None, :]
        h = tl.load(ptrs, mask=where, other=0)
        tl.store(ptrs, tl.cumsum(h, 0) - h + total[None, :], mask=where)
        total += tl.sum(h, 0)
    tl.store(counts_ptr + cols, total, mask=cols < E)


@triton.jit(do_not_specialize=["N", "T", "NT", "MAX_UNITS", "UNITS_PER_PROG"])
def sort_tile_scatter(
    ids_ptr,
    w_ptr,
    mask_ptr,
    hist_ptr,
    counts_ptr,
    out_ids_ptr,
    out_w_ptr,
    out_blk_ptr,
    out_num_ptr,
    N,
    E,
    T,
    NT,
    MAX_UNITS,
    UNITS_PER_PROG,
    s0,
    s1,
    ws0,
    ws1,
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    B: tl.constexpr,
    BT: tl.constexpr,
    C: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E: tl.constexpr,
    BC: tl.constexpr,
    SC: tl.constexpr,
):
    """Tile ``program_id < NT``: place its entries from its row of offsets; every program: fill units."""
    pid = tl.program_id(0)
    eo = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + eo, mask=eo < E, other=0)
    pad_start, entries_end, blk_end, used_slots, used_units = _layout(counts, B)
    if pid == 0:
        tl.store(out_num_ptr, used_slots)
        tl.store(out_num_ptr + 1, T)
    if pid < NT:
        local = _local_map(mask_ptr, E, E_PAD, HAS_MASK)
        base = pad_start + tl.load(hist_ptr + pid * E + eo, mask=eo < E, other=0)
        stop = tl.minimum(pid * BT + BT, N)
        _scatter_chunks(
            ids_ptr, w_ptr, out_ids_ptr, out_w_ptr, pid * BT, stop, base, local,
            s0, s1, ws0, ws1, E, K, HAS_MASK, C, E_PAD,
        )  # fmt: skip
    _fill_units(
        out_ids_ptr, out_w_ptr, out_blk_ptr, blk_end, entries_end, used_units, T,
        pid * UNITS_PER_PROG, UNITS_PER_PROG, MAX_UNITS, B, E_PAD, LOG_E, BC, SC,
    )  # fmt: skip
