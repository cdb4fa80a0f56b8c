"""Gluon decode GEMMs on NVIDIA tensor cores (``mma.sync``, sm_80 and newer).

The same contracts, arguments and grids as ``moe_decode_gemm1`` / ``moe_decode_gemm2`` of
:mod:`._fused_moe` (one program per (entry or token, ``BLOCK_N`` rows, K chunk)), but each K step
is a tensor-core MMA ``acc [BLOCK_N, 8] += w [BLOCK_N, BLOCK_K] @ a [BLOCK_K, 8]`` whose column 0
is the program's activation row (the other 7 columns hold it too: one broadcast load, never
read). The weight tile is loaded straight into the MMA's operand registers (``DotOperandLayout``
with 16 bytes per thread and chunk of a row: one 16-byte load each, no shared memory). A K step
then costs 1.0-1.8 instructions per weight for bf16/fp8 and 2.9-5.4 for mxfp4, against 4-8 for
the CUDA-core dot products, which are bound by instruction issue rather than by memory (sm_90,
static: ``benchmarks/results/static-decode-mma-2026-12-04.md``).

Schemes:

- bf16/fp16 weights with activations of the same dtype (``A_QUANT`` 0);
- fp8 weights (``B_QUANT`` 1 per channel, 2 per tensor, 3 128-blocks) with activations that a
  pre-pass quantized (``A_PRE``: fp8 codes and their scales; both operands upcast to fp16 for the
  MMA, exactly);
- mxfp4 weights (``B_QUANT`` 4), dequantized to bf16 in the operand registers by ``_fused_moe``'s
  PTX in their stored (swizzled) order, the activations read in the same order
  (:func:`mx_canonical_index`), with bf16 activations or pre-quantized fp8 codes (W4A8).

In-kernel activation quantization stays on the Triton kernels (``experts._mma_fits``). GEMM 2
rounds the float32 intermediate to the weights' dtype (bf16/fp16) for the MMA, as the sorted path
stores it; the router weight on the input (top-1, unquantized) scales the accumulators, the same
product in another order.

``BLOCK_N`` is a multiple of ``16 * num_warps`` (each warp 16 rows of an MMA; more rows repeat);
``BLOCK_K`` of an operand row's 4 chunks: 32 (bf16/fp16), 64 (fp8), 128 (mxfp4); fp8_block's K
step is its group (one scale per step).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ._fused_moe import MX_PTX_SHIFT, MXFP4_TO_BF16_PTX

#: the CTA barrier: ``thread_barrier`` up to Triton 3.6, ``barrier`` later
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_MX_PTX: gl.constexpr = gl.constexpr(MXFP4_TO_BF16_PTX.value)
_MX_SHIFT: gl.constexpr = gl.constexpr(MX_PTX_SHIFT.value)


@gluon.jit
def _act(gate, up, ACTIVATION: gl.constexpr, alpha, limit):
    """``_fused_moe._activation`` (silu, gelu, swiglu_oai, relu2) on float32 tensors."""
    if ACTIVATION == 0:
        return gate / (1.0 + gl.exp(-gate)) * up
    elif ACTIVATION == 1:
        return 0.5 * gate * (1.0 + gl.erf(gate * 0.7071067811865476)) * up
    elif ACTIVATION == 2:
        gate = gl.minimum(gate, limit)
        up = gl.minimum(gl.maximum(up, -limit), limit)
        return gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
    else:
        r = gl.maximum(gate, 0.0)
        return r * r


@gluon.jit
def _expert(topk_ids_ptr, expert_map_ptr, entry, num_experts, HAS_MAP: gl.constexpr):
    """The local expert of ``entry`` (int64), ``-1`` unless it is kept (in range and local)."""
    expert = gl.load(topk_ids_ptr + entry).to(gl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    if HAS_MAP:
        expert = gl.load(expert_map_ptr + gl.where(valid, expert, 0)).to(gl.int32)
        valid = valid & (expert >= 0)
    return gl.where(valid, expert, -1).to(gl.int64)


@gluon.jit
def _split_range(K, chunk, chunks, BLOCK_K: gl.constexpr):
    per = gl.cdiv(gl.cdiv(K, BLOCK_K), chunks) * BLOCK_K
    k_lo = chunk * per
    return k_lo, gl.minimum(k_lo + per, K)


@gluon.jit
def _split_arrive(count_ptr, SPLIT: gl.constexpr):
    """``_fused_moe._split_arrive``: whether this program is the tile's last to store its partials."""
    _barrier()
    last = gl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    if last:
        gl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last


@gluon.jit
def _split_sum(part_ptrs, stride_split, mask, SPLIT: gl.constexpr):
    total = gl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in gl.static_range(1, SPLIT):
        total += gl.load(part_ptrs + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@gluon.jit
def _mma_step(
    w_ptrs, a, acc, s_ptrs, a_s, B_QUANT: gl.constexpr, MMA: gl.constexpr, K_OK, EVEN_K: gl.constexpr
):
    """``acc`` plus one K step of one weight tile (``w_ptrs``: ``[BLOCK_N, BLOCK_K]`` in operand A's
    layout; ``K_OK`` its K mask unless ``EVEN_K``); fp8 blocks: the step scaled by its weight
    scales ``s_ptrs`` (``[BLOCK_N]``) and activation scale ``a_s``."""
    if EVEN_K:  # no predicated loads (their registers zeroed first)
        w = gl.load(w_ptrs)
    else:
        w = gl.load(w_ptrs, mask=K_OK, other=0.0)
    if B_QUANT == 3:
        step = mma_v2(w, a, gl.zeros(acc.shape, gl.float32, layout=MMA))
        s_n = gl.convert_layout(gl.load(s_ptrs), gl.SliceLayout(1, MMA))
        return acc + step * (s_n * a_s)[:, None]
    return mma_v2(w, a, acc)


@gluon.jit
def _mx_operand(
    w_rows,
    s_rows,
    k0,
    K,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    MMA: gl.constexpr,
    EVEN_K: gl.constexpr,
):
    """One K step of mxfp4 weights as the bf16 A operand ``[BLOCK_N, BLOCK_K]``, in the order the
    bytes are stored (swizzled, ``experts.swizzle_mxfp4``: element ``k' = 2p + h`` is nibble ``h``
    of stored byte ``p``; :func:`_mx_activation` reads the activations in the same order), times
    ``2**-MX_PTX_SHIFT`` (``_fused_moe.MXFP4_TO_BF16_PTX``). ``w_rows``/``s_rows``: the rows' bytes
    and e8m0 scales in ``SliceLayout(1, operand A with 16 bytes per thread and chunk)``: one
    16-byte load, whose bytes dequantize to the 32 consecutive elements that operand A with 32 per
    chunk gives the same thread (no data moves between threads; sm_90 static: 16 bytes per chunk
    3.6 instructions per weight, 4 bytes 4.1)."""
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=16)
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=32)
    pb = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, b_l))
    ptrs = w_rows[:, None] + k0 // 2 + pb[None, :]
    s_ptrs = s_rows[:, None] + k0 // 32 + (pb // 16)[None, :]  # one scale per 16-byte group
    if EVEN_K:
        b = gl.load(ptrs)
        s = gl.load(s_ptrs)
    else:
        k_ok = (pb < (K - k0) // 2)[None, :]
        b = gl.load(ptrs, mask=k_ok, other=0)
        s = gl.load(s_ptrs, mask=k_ok, other=0)
    factor = (gl.minimum(s.to(gl.int32) + (126 - _MX_SHIFT), 254) << 7) * 0x10001
    pairs = gl.inline_asm_elementwise(
        _MX_PTX, "=r,=r,=r,=r,r,r,r,r,r", [b, factor], dtype=gl.int32, is_pure=True, pack=4
    )
    lo = (pairs & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True)
    hi = (pairs >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
    v = gl.reshape(gl.join(lo, hi), (BLOCK_N, BLOCK_K))
    return gl.convert_layout(v, a_l)


def mx_canonical_index(kp):
    """The canonical K index of element ``kp`` of a swizzled mxfp4 row read in stored order (``k'
    = 2p + h``: nibble ``h`` of stored byte ``p``), as :func:`_mx_activation` computes it; works
    on ints and integer tensors (tests check it against ``experts.swizzle_mxfp4``)."""
    return (kp // 32) * 32 + ((kp // 2) % 4) * 8 + ((kp // 8) % 4) * 2 + kp % 2


@gluon.jit
def _mx_activation(a_row, k0, K, BLOCK_K: gl.constexpr, MMA: gl.constexpr, EVEN_K: gl.constexpr):
    """The activation step as operand B ``[BLOCK_K, 8]`` (bf16, every column the row) in the
    swizzled order of :func:`_mx_operand`: ``k' = 2p + h`` reads canonical element ``32g + 8c + 2r
    + h`` where stored byte ``p = 4r + c`` of group ``g`` holds canonical byte ``4c + r``."""
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=32)
    kp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_l))
    k = (kp // 32) * 32 + ((kp // 2) % 4) * 8 + ((kp // 8) % 4) * 2 + kp % 2  # mx_canonical_index
    col = gl.zeros([8], gl.int32, layout=gl.SliceLayout(0, b_l))
    if EVEN_K:
        a = gl.load(a_row + k0 + k[:, None] + col[None, :])
    else:
        a = gl.load(a_row + k0 + k[:, None] + col[None, :], mask=(k < K - k0)[:, None], other=0.0)
    return a.to(gl.bfloat16)


@gluon.jit
def _mx_dot(
    w_rows,
    s_rows,
    u_rows,
    su_rows,
    a_row,
    K,
    k_lo,
    k_hi,
    GATED: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    MMA: gl.constexpr,
    EVEN_K: gl.constexpr,
):
    """:func:`_mma_dot` for mxfp4 weights (bf16 activations, or fp8 codes: exact in bf16); the
    e8m0 scales in the operand, the result times ``2**MX_PTX_SHIFT`` back (exact)."""
    acc = gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA)
    acc_u = gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = _mx_activation(a_row, k0, K, BLOCK_K, MMA, EVEN_K)
        acc = mma_v2(_mx_operand(w_rows, s_rows, k0, K, BLOCK_N, BLOCK_K, MMA, EVEN_K), a, acc)
        if GATED:
            acc_u = mma_v2(_mx_operand(u_rows, su_rows, k0, K, BLOCK_N, BLOCK_K, MMA, EVEN_K), a, acc_u)
    first = (gl.arange(0, 8, layout=gl.SliceLayout(0, MMA)) == 0)[None, :]
    out = gl.sum(gl.where(first, acc, 0.0), axis=1) * (2.0**_MX_SHIFT)
    if GATED:
        return out, gl.sum(gl.where(first, acc_u, 0.0), axis=1) * (2.0**_MX_SHIFT)
    return out, out


@gluon.jit
def _mma_dot(
    w_rows,
    s_rows,
    u_rows,
    su_rows,
    a_row,
    as_row,
    K,
    k_lo,
    k_hi,
    GATED: gl.constexpr,
    B_QUANT: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    MMA: gl.constexpr,
    KW: gl.constexpr,
    OP_DTYPE: gl.constexpr,
    EVEN_K: gl.constexpr,
):
    """``sum_k a[k] * w[n, k]`` over ``[k_lo, k_hi)`` (mxfp4: :func:`_mx_dot`) for the ``BLOCK_N`` rows ``w_rows`` (pointers
    in ``SliceLayout(1, operand A)``, every one valid), float32 in ``SliceLayout(1, MMA)``, and
    the same for the ``u_rows`` when ``GATED`` (one activation load per step for both; else the
    first result twice). fp8 blocks (``B_QUANT`` 3): the step's weight scales ``s_rows[k0 //
    BLOCK_K]`` (``su_rows``) and activation scale ``as_row[k0 // BLOCK_K]`` applied per step.
    ``a_row``: the activation row (cast to ``OP_DTYPE`` for the MMA); ``EVEN_K``: ``K`` a
    multiple of ``BLOCK_K`` (no K mask)."""
    if B_QUANT == 4:
        return _mx_dot(
            w_rows, s_rows, u_rows, su_rows, a_row, K, k_lo, k_hi, GATED, BLOCK_N, BLOCK_K, MMA, EVEN_K
        )
    else:
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=KW)
        offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_l))
        kb = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_l))
        # every column the same row (one broadcast load per address; the sums are column 0's)
        col = gl.zeros([8], gl.int32, layout=gl.SliceLayout(0, b_l))
        acc = gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA)
        acc_u = gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA)
        w_tile = w_rows[:, None] + offs_k[None, :]
        u_tile = u_rows[:, None] + offs_k[None, :]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (offs_k < K - k0)[None, :]
            if EVEN_K:
                a = gl.load(a_row + k0 + kb[:, None] + col[None, :])
            else:
                a = gl.load(a_row + k0 + kb[:, None] + col[None, :], mask=(kb < K - k0)[:, None], other=0.0)
            a = a.to(OP_DTYPE)
            a_s = 1.0
            if B_QUANT == 3:
                a_s = gl.load(as_row + k0 // BLOCK_K)
            acc = _mma_step(w_tile + k0, a, acc, s_rows + k0 // BLOCK_K, a_s, B_QUANT, MMA, k_ok, EVEN_K)
            if GATED:
                acc_u = _mma_step(
                    u_tile + k0, a, acc_u, su_rows + k0 // BLOCK_K, a_s, B_QUANT, MMA, k_ok, EVEN_K
                )
        first = (gl.arange(0, 8, layout=gl.SliceLayout(0, MMA)) == 0)[None, :]
        out = gl.sum(gl.where(first, acc, 0.0), axis=1)
        if GATED:
            return out, gl.sum(gl.where(first, acc_u, 0.0), axis=1)
        return out, out


@gluon.jit
def moe_decode_mma_gemm1(
    x_ptr,
    w_ptr,
    b_ptr,
    inter_ptr,
    topk_ids_ptr,
    expert_map_ptr,
    topk_weights_ptr,
    ws_ptr,
    as_ptr,
    part_ptr,
    count_ptr,
    num_experts,
    K,
    INTER,
    stride_xm,
    stride_we,
    stride_wn,
    stride_be,
    stride_im,
    stride_wse,
    stride_wsn,
    stride_ps,
    stride_asm,
    alpha,
    limit,
    TOP_K: gl.constexpr,
    GATED: gl.constexpr,
    ACTIVATION: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    HAS_MAP: gl.constexpr,
    WEIGHT_ON_INPUT: gl.constexpr,
    A_QUANT: gl.constexpr,
    B_QUANT: gl.constexpr,
    GROUP_N: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    ROW_BLOCK: gl.constexpr,
    SPLIT: gl.constexpr,
    A_PRE: gl.constexpr = 0,
    EVEN_K: gl.constexpr = False,
):
    """``_fused_moe.moe_decode_gemm1`` on tensor cores (module docstring); ``ROW_BLOCK`` unused;
    ``EVEN_K``: ``K`` a multiple of ``BLOCK_K``."""
    NW: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    # elements per thread and chunk of the weights' operand A layout: 16 bytes (fp8, bf16; mxfp4:
    # its bytes, 32 elements once dequantized, _mx_operand)
    KW: gl.constexpr = 16 if B_QUANT != 0 else 8
    OP_DTYPE: gl.constexpr = w_ptr.dtype.element_ty
    rows_l: gl.constexpr = gl.SliceLayout(1, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW))
    out_l: gl.constexpr = gl.SliceLayout(1, MMA)
    entry = gl.program_id(0)
    expert = _expert(topk_ids_ptr, expert_map_ptr, entry, num_experts, HAS_MAP)
    if expert < 0:
        return
    token = (entry // TOP_K).to(gl.int64)
    x_row = x_ptr + token * stride_xm
    as_row = as_ptr + token * stride_asm
    # rows past the end read the last one (valid memory, no masks) and are never stored
    offs_n = gl.minimum(gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=rows_l), INTER - 1)
    w_rows = w_ptr + expert * stride_we + offs_n.to(gl.int64) * stride_wn
    s_rows = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
    su_rows = ws_ptr + expert * stride_wse + ((INTER + offs_n) // GROUP_N) * stride_wsn
    k_lo, k_hi = 0, K
    if SPLIT > 1:
        k_lo, k_hi = _split_range(K, gl.program_id(2), SPLIT, BLOCK_K)
    gate, up = _mma_dot(
        w_rows,
        s_rows,
        w_rows + INTER * stride_wn,
        su_rows,
        x_row,
        as_row,
        K,
        k_lo,
        k_hi,
        GATED,
        B_QUANT,
        BLOCK_N,
        BLOCK_K,
        MMA,
        KW,
        OP_DTYPE,
        EVEN_K,
    )
    offs_o = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=out_l)
    o_mask = offs_o < INTER
    last = True
    if SPLIT > 1:
        p_row = part_ptr + entry.to(gl.int64) * (2 * INTER) + offs_o
        gl.store(p_row + gl.program_id(2) * stride_ps, gate, mask=o_mask)
        if GATED:
            gl.store(p_row + gl.program_id(2) * stride_ps + INTER, up, mask=o_mask)
        last = _split_arrive(count_ptr + entry * gl.num_programs(1) + gl.program_id(1), SPLIT)
        if last:
            gate = _split_sum(p_row, stride_ps, o_mask, SPLIT)
            if GATED:
                up = _split_sum(p_row + INTER, stride_ps, o_mask, SPLIT)
            else:
                up = gate
    if last:
        if WEIGHT_ON_INPUT and not A_PRE:  # (route * x) @ w = route * (x @ w)
            route = gl.load(topk_weights_ptr + entry).to(gl.float32)
            gate = gate * route
            up = up * route
        if A_QUANT == 1:
            a_s = gl.load(as_row)
            gate = gate * a_s
            up = up * a_s
        elif A_QUANT == 2:
            a_s = gl.load(as_ptr)
            gate = gate * a_s
            up = up * a_s
        if B_QUANT == 1:
            gate = gate * gl.load(ws_ptr + expert * stride_wse + offs_o, mask=o_mask, other=0.0)
            up = up * gl.load(ws_ptr + expert * stride_wse + INTER + offs_o, mask=o_mask, other=0.0)
        elif B_QUANT == 2:
            w_s = gl.load(ws_ptr + expert * stride_wse)
            gate = gate * w_s
            up = up * w_s
        if HAS_BIAS:
            gate += gl.load(b_ptr + expert * stride_be + offs_o, mask=o_mask, other=0.0).to(gl.float32)
            if GATED:
                up += gl.load(b_ptr + expert * stride_be + INTER + offs_o, mask=o_mask, other=0.0).to(
                    gl.float32
                )
        h = _act(gate, up, ACTIVATION, alpha, limit)
        gl.store(inter_ptr + entry.to(gl.int64) * stride_im + offs_o, h, mask=o_mask)


@gluon.jit
def moe_decode_mma_gemm2(
    inter_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    topk_ids_ptr,
    expert_map_ptr,
    topk_weights_ptr,
    ws_ptr,
    as_ptr,
    part_ptr,
    count_ptr,
    num_experts,
    K,
    N,
    stride_im,
    stride_we,
    stride_wn,
    stride_be,
    stride_om,
    stride_wse,
    stride_wsn,
    stride_ps,
    stride_asm,
    TOP_K: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    HAS_MAP: gl.constexpr,
    APPLY_WEIGHT: gl.constexpr,
    A_QUANT: gl.constexpr,
    B_QUANT: gl.constexpr,
    GROUP_N: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    ROW_BLOCK: gl.constexpr,
    SLOT_GROUPS: gl.constexpr,
    K_SPLITS: gl.constexpr,
    A_PRE: gl.constexpr = 0,
    EVEN_K: gl.constexpr = False,
):
    """``_fused_moe.moe_decode_gemm2`` on tensor cores (module docstring); ``ROW_BLOCK`` unused;
    ``EVEN_K``: ``K`` a multiple of ``BLOCK_K``."""
    NW: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    KW: gl.constexpr = 16 if B_QUANT != 0 else 8
    OP_DTYPE: gl.constexpr = w_ptr.dtype.element_ty
    rows_l: gl.constexpr = gl.SliceLayout(1, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=KW))
    out_l: gl.constexpr = gl.SliceLayout(1, MMA)
    SPLIT: gl.constexpr = SLOT_GROUPS * K_SPLITS
    PER_GROUP: gl.constexpr = (TOP_K + SLOT_GROUPS - 1) // SLOT_GROUPS
    token = gl.program_id(0).to(gl.int64)
    offs_n = gl.minimum(gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=rows_l), N - 1)
    offs_o = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=out_l)
    o_mask = offs_o < N
    j0 = 0
    chunk = 0
    k_lo, k_hi = 0, K
    if SPLIT > 1:
        j0 = (gl.program_id(2) // K_SPLITS) * PER_GROUP
        chunk = gl.program_id(2) % K_SPLITS
        if K_SPLITS > 1:
            k_lo, k_hi = _split_range(K, chunk, K_SPLITS, BLOCK_K)
    total = gl.zeros([BLOCK_N], gl.float32, layout=out_l)
    for jj in gl.static_range(PER_GROUP):
        j = j0 + jj
        entry = token * TOP_K + j
        expert = _expert(
            topk_ids_ptr, expert_map_ptr, gl.minimum(entry, token * TOP_K + TOP_K - 1), num_experts, HAS_MAP
        )
        if (j < TOP_K) & (expert >= 0):
            a_row = inter_ptr + entry * stride_im
            as_row = as_ptr + entry * stride_asm
            w_rows = w_ptr + expert * stride_we + offs_n.to(gl.int64) * stride_wn
            s_rows = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
            y, _y = _mma_dot(
                w_rows,
                s_rows,
                w_rows,
                s_rows,
                a_row,
                as_row,
                K,
                k_lo,
                k_hi,
                False,
                B_QUANT,
                BLOCK_N,
                BLOCK_K,
                MMA,
                KW,
                OP_DTYPE,
                EVEN_K,
            )
            if A_QUANT == 1:
                y = y * gl.load(as_row)
            elif A_QUANT == 2:
                y = y * gl.load(as_ptr)
            if B_QUANT == 1:
                y = y * gl.load(ws_ptr + expert * stride_wse + offs_o, mask=o_mask, other=0.0)
            elif B_QUANT == 2:
                y = y * gl.load(ws_ptr + expert * stride_wse)
            if HAS_BIAS:
                bias = gl.load(b_ptr + expert * stride_be + offs_o, mask=o_mask, other=0.0).to(gl.float32)
                if K_SPLITS > 1:  # once per slot: in its first K chunk
                    bias = gl.where(chunk == 0, bias, 0.0)
                y += bias
            if APPLY_WEIGHT:
                y = y * gl.load(topk_weights_ptr + entry).to(gl.float32)
            total += y
    out_ptrs = out_ptr + token * stride_om + offs_o
    if SPLIT > 1:
        p_row = part_ptr + token * N + offs_o
        gl.store(p_row + gl.program_id(2) * stride_ps, total, mask=o_mask)
        if _split_arrive(count_ptr + token * gl.num_programs(1) + gl.program_id(1), SPLIT):
            total = _split_sum(p_row, stride_ps, o_mask, SPLIT)
            gl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        gl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=o_mask)
