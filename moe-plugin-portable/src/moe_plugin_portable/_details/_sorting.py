"""Triton kernels of the sorting contracts (``moe_core.sorting``): one or two launches, no host sync.

The ``N = T * k`` flat entries are cut into ``NT`` tiles of ``BT`` entries.

- ``sort_count`` (one program per tile): the tile's histogram over the (local)
  experts, stored at row ``tile`` of ``hist [NT, E]``.
- ``sort_place`` (``G >= NT`` programs): every program first rebuilds the
  per-expert statistics it needs, redundantly (no inter-program sync): the
  expert totals, the prefix of its tile (entries of each expert in the tiles
  before it) and its tile's own row, either from ``hist`` (``FROM_IDS=False``,
  after ``sort_count``) or straight from the ids (``FROM_IDS=True``: small
  ``N``, a single launch). From the totals: padded sizes, expert start offsets
  (exclusive scan over experts), ``num_tokens_post_padded``. Then:

  - program ``p < NT`` places tile ``p``: it sorts the keys
    ``expert * BT + index_in_tile`` (dropped entries get expert ``E`` and sort
    last), so the entry at sorted position ``j`` of expert ``e`` lands at
    ``start[e] + prefix[e] + j - (entries of experts < e in the tile)``:
    stable (ascending flat index within an expert), exactly the reference;
  - every program fills its share of the blocks: the block's expert by binary
    search over the cumulative block counts (``expert_ids``, ``-1`` past the
    used blocks) and the padding slots past the expert's entries.

Entry slots and padding slots are disjoint and together cover the output, so
nothing is pre-filled and no ordering between programs is needed. Per-expert
vectors live in registers (``E_PAD`` lanes); lookups into them use ``tl.gather``.

``OP``: 0 ``align_block_size`` (vLLM), 1 ``moe_sorting`` (aiter/CK: ids packed
``(slot << 24) | token``, weights, ``num_valid_ids``), 2 ``ragged_metadata``
(``BLOCK == 1``: counts, offsets, gather and scatter indices).
``MAP``: 0 none, 1 ``expert_map`` (global -> local or -1), 2 ``expert_mask``
(local id = rank among the nonzero entries).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: ``OP`` constexpr of ``sort_place`` per contract.
OPS = {"align_block_size": 0, "moe_sorting": 1, "ragged_metadata": 2}


@triton.jit
def _unit(N_DIMS: tl.constexpr, D: tl.constexpr):
    """``[0, 1]`` along hypercube dimension ``D`` (counted from the innermost), shape 1 elsewhere."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - D - 1) + [2] + [1] * D)


@triton.jit
def _sort_keys(x, LOG_N: tl.constexpr):
    """Ascending bitonic sort of ``2**LOG_N`` *distinct* int32 keys.

    On the hypercube ``[2] * LOG_N`` view, each compare-and-swap finds the
    partner as ``pair sum - self`` (a plain ``tl.sum``: exact in wrap-around
    int32, and the interpreter's fast path, where ``tl.sort``'s xor reduction
    runs element by element in Python).
    """
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        for i in tl.static_range(stage):
            # compare along hypercube dimension stage - 1 - i (from the innermost)
            partner = tl.sum(h, axis=LOG_N - stage + i, keep_dims=True) - h
            right = _unit(LOG_N, stage - 1 - i)
            if stage < LOG_N:
                swap = (h > partner) != ((_unit(LOG_N, stage) ^ right) != 0)
            else:
                swap = (h > partner) != (right != 0)
            h = tl.where(swap, partner, h)
    return tl.reshape(h, [2**LOG_N])


@triton.jit
def _local_map(map_ptr, E, E_PAD: tl.constexpr, MAP: tl.constexpr):
    """Global expert id -> local id (``-1``: not local) as an ``[E_PAD]`` register vector."""
    eo = tl.arange(0, E_PAD)
    if MAP == 1:
        v = tl.load(map_ptr + eo, mask=eo < E, other=-1)
        lmap = tl.where((v >= 0) & (v < E), v, -1).to(tl.int32)
    elif MAP == 2:
        local = tl.load(map_ptr + eo, mask=eo < E, other=0) != 0
        rank = tl.cumsum(local.to(tl.int32), 0) - 1
        lmap = tl.where(local, rank, -1)
    else:
        lmap = eo
    return lmap


@triton.jit
def _local_ids(ids_ptr, s0, s1, offs, N, E, lmap, K: tl.constexpr, MAP: tl.constexpr):
    """(local expert, kept) of the flat entries ``offs``; dropped entries read expert 0."""
    inb = offs < N
    t = offs // K
    s = offs - t * K
    x = tl.load(ids_ptr + t.to(tl.int64) * s0 + s * s1, mask=inb, other=-1)
    valid = inb & (x >= 0) & (x < E)  # in the ids' own dtype: no int64 -> int32 wrap-around
    e = tl.where(valid, x, 0).to(tl.int32)
    if MAP != 0:
        loc = tl.gather(lmap, e, 0)
        valid = valid & (loc >= 0)
        e = tl.where(valid, loc, 0)
    return e, valid


@triton.jit(do_not_specialize=["N"])
def sort_count(
    ids_ptr,
    map_ptr,
    hist_ptr,
    N,
    E,
    s0,
    s1,
    K: tl.constexpr,
    MAP: tl.constexpr,
    BT: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """``hist[tile, e]`` = kept entries of local expert ``e`` in tile ``program_id``."""
    pid = tl.program_id(0)
    lmap = _local_map(map_ptr, E, E_PAD, MAP)
    offs = pid * BT + tl.arange(0, BT)
    e, valid = _local_ids(ids_ptr, s0, s1, offs, N, E, lmap, K, MAP)
    h = tl.histogram(e, E_PAD, mask=valid)
    eo = tl.arange(0, E_PAD)
    tl.store(hist_ptr + pid * E + eo, h, mask=eo < E)


# Sizes that vary with T are not specialised (divisibility by 16, == 1): one
# compiled variant per (op, k, E, block, tile) whatever the batch size.
@triton.jit(do_not_specialize=["N", "T", "NT", "MAX_BLOCKS", "BLOCKS_PER_PROG"])
def sort_place(
    ids_ptr,
    map_ptr,
    hist_ptr,
    w_ptr,
    out_ids_ptr,
    out_vals_ptr,
    out_blk_ptr,
    out_num_ptr,
    out_offsets_ptr,
    N,
    E,
    T,
    NT,
    MAX_BLOCKS,
    BLOCKS_PER_PROG,
    s0,
    s1,
    ws0,
    ws1,
    K: tl.constexpr,
    MAP: tl.constexpr,
    OP: tl.constexpr,
    FROM_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
    BT: tl.constexpr,
    LOG_BT: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E: tl.constexpr,
    TC: tl.constexpr,
    BC: tl.constexpr,
    SC: tl.constexpr,
):
    """Place the entries of tile ``program_id`` and fill this program's share of the blocks.

    Outputs by ``OP`` (pointers an op does not use are dummies):

    - ``out_ids``: ``sorted_token_ids`` / ``sorted_ids`` / ``gather_indx``;
    - ``out_vals``: - / ``sorted_weights`` / ``scatter_indx``;
    - ``out_blk``: ``expert_ids`` / ``sorted_expert_ids`` / -;
    - ``out_num``: ``num_tokens_post_padded`` / ``num_valid_ids`` / ``expert_counts``;
    - ``out_offsets``: - / - / ``expert_offsets``.
    """
    pid = tl.program_id(0)
    eo = tl.arange(0, E_PAD)
    lmap = _local_map(map_ptr, E, E_PAD, MAP)

    # ---- per-expert statistics, rebuilt by every program
    total = tl.zeros([E_PAD], dtype=tl.int32)
    prefix = tl.zeros([E_PAD], dtype=tl.int32)
    row = tl.zeros([E_PAD], dtype=tl.int32)
    if FROM_IDS:
        for c in range(0, NT):
            offs = c * BT + tl.arange(0, BT)
            e, valid = _local_ids(ids_ptr, s0, s1, offs, N, E, lmap, K, MAP)
            h = tl.histogram(e, E_PAD, mask=valid)
            total += h
            prefix += tl.where(c < pid, h, 0)
            row += tl.where(c == pid, h, 0)
    else:
        for c0 in range(0, NT, TC):
            rows = c0 + tl.arange(0, TC)
            hm = tl.load(
                hist_ptr + rows[:, None] * E + eo[None, :],
                mask=(rows[:, None] < NT) & (eo[None, :] < E),
                other=0,
            )
            total += tl.sum(hm, 0)
            prefix += tl.sum(tl.where(rows[:, None] < pid, hm, 0), 0)
            row += tl.sum(tl.where(rows[:, None] == pid, hm, 0), 0)
    nblk = (total + (BLOCK - 1)) // BLOCK
    pad_end = tl.cumsum(nblk * BLOCK, 0)
    pad_start = pad_end - nblk * BLOCK
    num_padded = tl.sum(nblk, 0) * BLOCK

    if pid == 0:
        if OP == 0:
            tl.store(out_num_ptr, num_padded)
        elif OP == 1:
            tl.store(out_num_ptr, num_padded)
            tl.store(out_num_ptr + 1, T)
        else:
            tl.store(out_num_ptr + eo, total, mask=eo < E)
            tl.store(out_offsets_ptr + eo, pad_start, mask=eo < E)
            tl.store(out_offsets_ptr + E, num_padded)

    # ---- place the entries of tile ``pid``
    if pid < NT:
        lane = tl.arange(0, BT)
        offs = pid * BT + lane
        e, valid = _local_ids(ids_ptr, s0, s1, offs, N, E, lmap, K, MAP)
        key = _sort_keys(tl.where(valid, e, E) * BT + lane, LOG_BT)
        e_s = key >> LOG_BT
        flat = pid * BT + (key & (BT - 1))
        kept = e_s < E
        base = pad_start + prefix - (tl.cumsum(row, 0) - row)
        dest = tl.gather(base, tl.minimum(e_s, E_PAD - 1), 0) + lane
        if OP == 1:
            t = flat // K
            s = flat - t * K
            tl.store(out_ids_ptr + dest, (s << 24) | t, mask=kept)
            w = tl.load(w_ptr + t.to(tl.int64) * ws0 + s * ws1, mask=kept, other=0.0)
            tl.store(out_vals_ptr + dest, w.to(tl.float32), mask=kept)
        else:
            tl.store(out_ids_ptr + dest, flat, mask=kept)
        if OP == 2:
            tl.store(out_vals_ptr + flat, tl.where(kept, dest, -1), mask=flat < N)  # scatter_indx

    # ---- fill this program's blocks: expert per block and the padding slots
    b_lo = pid * BLOCKS_PER_PROG
    b_hi = tl.minimum(b_lo + BLOCKS_PER_PROG, MAX_BLOCKS)
    if OP == 2:
        for p0 in range(b_lo, b_hi, BC):
            p = p0 + tl.arange(0, BC)
            tl.store(out_ids_ptr + p, tl.zeros([BC], dtype=tl.int32) - 1, mask=(p < b_hi) & (p >= num_padded))
    else:
        blk_end = tl.cumsum(nblk, 0)
        entries_end = pad_start + total
        if OP == 1:
            fill = T
        else:
            fill = N
        for b0 in range(b_lo, b_hi, BC):
            b = b0 + tl.arange(0, BC)
            # expert of block b = number of experts whose blocks end at or before b
            pos = tl.zeros([BC], dtype=tl.int32)
            for i in tl.static_range(LOG_E):
                probe = tl.gather(blk_end, pos + ((E_PAD >> (i + 1)) - 1), 0)
                pos = tl.where(probe <= b, pos + (E_PAD >> (i + 1)), pos)
            pos = tl.where(tl.gather(blk_end, pos, 0) <= b, pos + 1, pos)
            used = pos < E
            tl.store(out_blk_ptr + b, tl.where(used, pos, -1), mask=b < b_hi)
            end = tl.where(used, tl.gather(entries_end, tl.minimum(pos, E_PAD - 1), 0), 0)
            for s0_ in range(0, BLOCK, SC):
                sl = s0_ + tl.arange(0, SC)
                p = b[:, None] * BLOCK + sl[None, :]
                m = (b[:, None] < b_hi) & (sl[None, :] < BLOCK) & (p >= end[:, None])
                tl.store(out_ids_ptr + p, tl.zeros([BC, SC], dtype=tl.int32) + fill, mask=m)
                if OP == 1:
                    tl.store(out_vals_ptr + p, tl.zeros([BC, SC], dtype=tl.float32), mask=m)
