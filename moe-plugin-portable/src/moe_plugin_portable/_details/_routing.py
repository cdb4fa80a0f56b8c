"""Triton kernel of ``select_experts``: every routing method in one launch, ``BLOCK_T`` tokens per program.

A program loads ``BLOCK_T`` rows of logits as a ``[BLOCK_T, BLOCK_G * BLOCK_EG]``
register tile. Lane ``l`` is expert ``g * EPG + j`` with ``g = l // BLOCK_EG``,
``j = l % BLOCK_EG`` (``EPG = E // GROUPS`` experts per group; one group for
every method but ``biased_grouped``), valid when ``g < GROUPS`` and
``j < EPG``: each group is padded to a power of two on its own, so the group
phase is a plain reshape to ``[BLOCK_T, BLOCK_G, BLOCK_EG]``.

Every lane carries a 64-bit *key* ``(ordered(score) << 32) | (C - expert)``:
``ordered`` maps a float32 to an int32 of the same order (``-0.0`` is folded
onto ``+0.0``), ``C = 2**31 - 1``. The largest key is the largest score and,
among equal scores, the lowest expert id, so one integer max reduction is
one step of "max, then the lowest index among those equal to the max" (the
reference's stable descending sort). Padded lanes, and lanes already taken,
hold ``NEG`` (below the key of ``-inf``), so they are never chosen while a
valid lane is left; lanes of dropped groups hold the key of ``-inf`` with
their own index, exactly the reference's ``masked_fill(-inf)``.

Per method (``METHOD``), all math in float32:

- 0 ``softmax``: choice ``exp(x - max)`` (monotone in the probability; the
  weight is ``exp / sum``).
- 1 ``softmax_after_topk``: choice ``x``; weights softmax over the chosen k.
- 2 ``sigmoid``: choice ``x``; weights ``sigmoid(x)``.
- 3 ``biased_grouped``: ``s = sigmoid(x)``, choice ``s + bias``; group score =
  sum of the two largest choice scores of the group (one when a group has
  one expert); a group is kept when fewer than ``TOPK_GROUP`` groups have a
  larger group key (ties: lowest group id); top-k among kept experts;
  weights ``s`` of the chosen experts (re-loaded and recomputed).

Then optional renormalization (``/ max(sum, 1e-20)``), times ``scale``, and
the shared-expert slots ``E .. E + N_SHARED - 1`` with weight 1.0; one masked
store of the ``[BLOCK_T, BLOCK_S]`` weight and id tiles into the final
``[T, K + N_SHARED]`` outputs. Plain ``tl`` ops only (NVIDIA, AMD, interpreter).
NaN logits are outside the contract.
"""

from __future__ import annotations

import triton
import triton.language as tl

METHODS = {"softmax": 0, "softmax_after_topk": 1, "sigmoid": 2, "biased_grouped": 3}

#: below every valid key (the key of -inf is about -0.998 * 2**63)
_NEG: tl.constexpr = tl.constexpr(-(2**63) + 1)


@triton.jit
def _key(v, expert):
    """Order-preserving int64 key of float32 ``v``; ties go to the lowest ``expert``."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v == 0.0, 0, bits)  # -0.0 ties with +0.0, as in torch's sort
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - expert.to(tl.int64))


@triton.jit
def _value(key):
    """The float32 a key was made of (``-0.0`` comes back as ``+0.0``)."""
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _expert(key):
    return (2147483647 - (key & 0x7FFFFFFF)).to(tl.int32)


@triton.jit
def select_experts_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    T,
    stride_t,
    stride_e,
    stride_bias,
    stride_out,
    scale,
    E: tl.constexpr,
    K: tl.constexpr,
    N_SHARED: tl.constexpr,
    METHOD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_EG: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    EPG: tl.constexpr = E // GROUPS
    BLOCK_E: tl.constexpr = BLOCK_G * BLOCK_EG

    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    row_off = rows.to(tl.int64) * stride_t

    lane = tl.arange(0, BLOCK_E)
    g = lane // BLOCK_EG
    j = lane % BLOCK_EG
    if EPG == BLOCK_EG:
        expert = lane  # unpadded groups: lanes are experts (lets the compiler vectorise the load)
        valid = lane < E
    else:
        expert = g * EPG + j
        valid = (g < GROUPS) & (j < EPG)
    mask = row_ok[:, None] & valid[None, :]
    x = tl.load(logits_ptr + row_off[:, None] + expert[None, :] * stride_e, mask=mask, other=0.0)
    x = x.to(tl.float32)

    # choice scores
    if METHOD == 0:
        x_max = tl.max(tl.where(valid[None, :], x, float("-inf")), axis=1)
        choice = tl.exp(x - x_max[:, None])
        denom = tl.sum(tl.where(valid[None, :], choice, 0.0), axis=1)
    elif METHOD == 3:
        choice = tl.sigmoid(x)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_bias, mask=valid, other=0.0).to(tl.float32)
            choice = choice + bias[None, :]
    else:
        choice = x
    key = tl.where(valid[None, :], _key(choice, expert[None, :]), _NEG)

    # DeepSeek-V3 group selection: keep the TOPK_GROUP groups of largest top-2 sums
    if METHOD == 3 and TOPK_GROUP < GROUPS:
        key3 = tl.reshape(key, [BLOCK_T, BLOCK_G, BLOCK_EG])
        first = tl.max(key3, axis=2)
        group_score = _value(first)
        if EPG > 1:
            second = tl.max(tl.where(key3 == first[:, :, None], _NEG, key3), axis=2)
            group_score = group_score + _value(second)
        gid = tl.arange(0, BLOCK_G)
        gkey = tl.where((gid < GROUPS)[None, :], _key(group_score, gid[None, :]), _NEG)
        better = (gkey[:, None, :] > gkey[:, :, None]).to(tl.int32)  # [t, g, h]: group h beats g
        kept = (tl.sum(better, axis=2) < TOPK_GROUP) & (gid < GROUPS)[None, :]
        kept3 = tl.broadcast_to(kept[:, :, None], [BLOCK_T, BLOCK_G, BLOCK_EG])
        kept_lane = tl.reshape(kept3, [BLOCK_T, BLOCK_E])
        dropped = _key(tl.full([BLOCK_T, BLOCK_E], float("-inf"), tl.float32), expert[None, :])
        key = tl.where(kept_lane | (key == _NEG), key, dropped)

    # top-k: K rounds of "largest key", each taken lane knocked out
    slot = tl.arange(0, BLOCK_S)
    top_keys = tl.full([BLOCK_T, BLOCK_S], _NEG, tl.int64)
    for i in tl.static_range(K):
        best = tl.max(key, axis=1)
        key = tl.where(key == best[:, None], _NEG, key)
        top_keys = tl.where(slot[None, :] == i, best[:, None], top_keys)

    routed = slot[None, :] < K
    ids = tl.where(routed, _expert(top_keys), 0)
    vals = tl.where(routed, _value(top_keys), 0.0)
    if METHOD == 0:
        w = vals / denom[:, None]
    elif METHOD == 1:
        v_max = tl.max(tl.where(routed, vals, float("-inf")), axis=1)
        w = tl.where(routed, tl.exp(vals - v_max[:, None]), 0.0)
        w = w / tl.sum(w, axis=1)[:, None]
    elif METHOD == 2:
        w = tl.sigmoid(vals)
    else:
        xs = tl.load(logits_ptr + row_off[:, None] + ids * stride_e, mask=row_ok[:, None] & routed, other=0.0)
        w = tl.sigmoid(xs.to(tl.float32))
    w = tl.where(routed, w, 0.0)
    if RENORMALIZE and METHOD != 1:
        w = w / tl.maximum(tl.sum(w, axis=1), 1e-20)[:, None]
    w = w * scale

    if N_SHARED > 0:
        shared = (slot[None, :] >= K) & (slot[None, :] < K + N_SHARED)
        ids = tl.where(shared, E - K + slot[None, :], ids)
        w = tl.where(shared, 1.0, w)
    out_off = rows.to(tl.int64)[:, None] * stride_out + slot[None, :]
    out_mask = row_ok[:, None] & (slot[None, :] < K + N_SHARED)
    tl.store(weights_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)
