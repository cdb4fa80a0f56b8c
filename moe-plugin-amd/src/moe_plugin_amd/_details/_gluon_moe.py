"""Gluon CDNA4 (gfx950) kernels of ``amd.gluon.mxfp4``: dispatch GEMM, combine GEMM, slot reduce.

Contracts (every pointer contiguous; shapes after :mod:`moe_plugin_amd.gluon_layout`'s
``prepare`` padding: ``H_PAD`` = hidden size, ``N_PAD`` = intermediate size, both multiples
of :data:`PAD`):

``moe_gemm1`` (dispatch, one program per (sorted block ``pid_m``, intermediate tile ``pid_n``)):
    ``x [T, H]`` bf16/fp16 activations (rows gathered through ``sorted_ids``), ``w [E, 2*N_PAD,
    H_PAD/2]`` mxfp4 bytes in the *MFMA-B shuffle* (see ``gluon_layout``), ``ws [E, H_PAD/32,
    2*N_PAD]`` e8m0 bytes (K-major), ``b [E, 2*N_PAD]`` float32, ``y [num_padded, N_PAD]``
    (bf16, or fp8 e4m3 quantized with ``y_scale`` for W4A8). Computes for the rows of block
    ``pid_m`` (expert ``sorted_expert_ids[pid_m]``) the gate tile (rows ``n`` of w13) and the up
    tile (rows ``N_PAD + n``), K-loop over ``H_PAD`` in ``BLOCK_K`` steps, then the epilogue in
    this order: ``acc * a_scale`` (W4A8) -> ``+ bias`` -> activation (silu or swiglu_oai with
    alpha/limit) -> W4A8: ``fp8(clamp(act / y_scale, +-448))`` -> store at the sorted row.
    Blocks at or past ``num_valid_ids[0]`` do nothing. ``STAGES=2`` loads the next K step's
    activation and weight tiles into registers before this step's MFMAs (same K order).

``moe_gemm2`` (combine, one program per (sorted block, hidden tile)):
    ``y`` as above, ``w [E, H_PAD, N_PAD/2]`` (shuffled), ``ws [E, N_PAD/32, H_PAD]``,
    ``b [E, H_PAD]`` float32, ``slots [T*k, H]`` float32. Epilogue: ``acc * y_scale`` (W4A8) ->
    ``+ bias`` -> ``* sorted_weights[row]`` -> store to ``slots[t*k + s]`` for the rows whose
    token ``t < T`` (the packed id is ``(s << 24) | t``). No atomics: each slot row is written by
    exactly one program.

``moe_slot_sum``: ``out[t] = sum_{s=0..k-1, local(ids[t, s])} slots[t*k + s]`` in slot order
    (deterministic), ``local_map [E]`` int32 (-1: not on this rank).

mxfp4 x bf16 (W4A16): the weight tile is upcast in registers with CDNA4's scaled convert
(``cdna4.scaled_upcast``: ``v_cvt_scalef32_pk_bf16_fp4``, the e8m0 scale applied by the
instruction) and multiplied with the bf16 MFMA. mxfp4 x fp8 (W4A8): the e4m3 activation tile
and the packed e2m1 weight tile go straight into the scaled MFMA
(``cdna4.mfma_scaled``: ``v_mfma_scale_f32_16x16x128_f8f6f4``) with the e8m0 weight scales;
the activation operand's scale is the unit (127) and the per-tensor static activation scale is
applied to the fp32 accumulator.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

#: epilogue activations (the profile labels rows with these names)
ACTIVATIONS = {"silu": 0, "swiglu_oai": 1}
#: padding of H and I in prepare (the largest BLOCK_N / BLOCK_K of the block table divides it)
PAD = 256
#: bytes of one shuffled (16 rows x 128 K) weight chunk: 64 lanes x 16 bytes
CHUNK = 1024


@gluon.constexpr_function
def _mfma_layout(a_fp8, num_warps_m, num_warps_n):
    if a_fp8:
        instr = [16, 16, 128]
    else:
        instr = [16, 16, 32]
    return gl.amd.AMDMFMALayout(
        version=4, instr_shape=instr, transposed=True, warps_per_cta=[num_warps_m, num_warps_n]
    )


@gluon.jit
def _b_offsets(
    n0, k0, K_PAD: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, layout: gl.constexpr
):
    """Byte offsets of the packed tile ``[BLOCK_K/2, BLOCK_N]`` (rows n0.., K k0..) in the shuffle."""
    kb = k0 // 2 + gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(1, layout))[:, None]
    n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))[None, :]
    chunk = (n // 16) * (K_PAD // 128) + kb // 64
    return chunk * 1024 + ((kb % 64) // 16) * 256 + (n % 16) * 16 + kb % 16


@gluon.jit
def _s_offsets(
    n0, k0, N_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, layout: gl.constexpr
):
    """Offsets of the e8m0 tile ``[BLOCK_N, BLOCK_K/32]`` in the K-major scales ``[K/32, N_ROWS]``."""
    n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))[:, None]
    g = k0 // 32 + gl.arange(0, BLOCK_K // 32, layout=gl.SliceLayout(0, layout))[None, :]
    return g * N_ROWS + n


@gluon.jit
def _load_w(
    w_base,
    s_base,
    n0,
    k0,
    N_ROWS: gl.constexpr,
    K_PAD: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    A_FP8: gl.constexpr,
    mfma: gl.constexpr,
):
    """The packed weight tile ``[BLOCK_K/2, BLOCK_N]`` (rows n0.., K k0..) and its e8m0 scales, in registers."""
    if A_FP8:  # straight into the scaled MFMA's B operand and scale layouts
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mfma, k_width=16)
        b = gl.load(w_base + _b_offsets(n0, k0, K_PAD, BLOCK_N, BLOCK_K, b_layout))
        s_layout: gl.constexpr = gl.amd.cdna4.get_mfma_scale_layout(b_layout, [BLOCK_N, BLOCK_K // 32])
        s = gl.load(s_base + _s_offsets(n0, k0, N_ROWS, BLOCK_N, BLOCK_K, s_layout))
    else:  # a layout the scaled upcast takes; scales [BLOCK_K/32, BLOCK_N] as the upcast wants them
        p_layout: gl.constexpr = gl.BlockedLayout([8, 1], [16, 4], [1, gl.num_warps()], [0, 1])
        b = gl.load(w_base + _b_offsets(n0, k0, K_PAD, BLOCK_N, BLOCK_K, p_layout))
        s_layout: gl.constexpr = gl.amd.cdna4.get_scaled_upcast_fp4_scale_layout(b, 32, gl.bfloat16, 0)
        sn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))[None, :]
        sg = k0 // 32 + gl.arange(0, BLOCK_K // 32, layout=gl.SliceLayout(1, s_layout))[:, None]
        s = gl.load(s_base + sg * N_ROWS + sn)
    return b, s


@gluon.jit
def _mma_w(a, b, s, acc, A_FP8: gl.constexpr, mfma: gl.constexpr):
    """``acc += a @ dequant(b, s)`` for one K step (``a``: the dot-operand activation tile)."""
    if A_FP8:
        acc = gl.amd.cdna4.mfma_scaled(a, None, "e4m3", b, s, "e2m1", acc)
    else:
        w = gl.amd.cdna4.scaled_upcast(b, s, gl.bfloat16, axis=0)
        w = gl.convert_layout(w, gl.DotOperandLayout(operand_index=1, parent=mfma, k_width=8))
        acc = gl.amd.cdna4.mfma(a, w, acc)
    return acc


@gluon.jit
def _load_x(x_rows, row_ok, k0, H, inv_a, A_FP8: gl.constexpr, BLOCK_K: gl.constexpr, layout: gl.constexpr):
    """The gathered activation tile ``[BLOCK_M, BLOCK_K]`` (W4A8: quantized to e4m3 with ``inv_a``)."""
    kk = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    x = gl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < H), other=0.0)
    if A_FP8:
        a = gl.minimum(gl.maximum(x.to(gl.float32) * inv_a, -448.0), 448.0).to(gl.float8e4nv)
    else:
        a = x.to(gl.bfloat16)
    return a


@gluon.jit
def moe_gemm1(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    sorted_ids_ptr, sorted_expert_ptr, num_valid_ptr,
    a_scale_ptr, y_scale_ptr,
    T, H, stride_x, alpha, limit,
    N_PAD: gl.constexpr, K_PAD: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    WARPS_M: gl.constexpr, A_FP8: gl.constexpr, ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    mfma: gl.constexpr = _mfma_layout(A_FP8, WARPS_M, gl.num_warps() // WARPS_M)
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 8], [gl.num_warps(), 1], [1, 0])
    num_valid = gl.load(num_valid_ptr)
    if pid_m * BLOCK_M < num_valid:
        expert = gl.load(sorted_expert_ptr + pid_m).to(gl.int64)
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
        token = gl.load(sorted_ids_ptr + rows) & 0xFFFFFF
        row_ok = token < T
        x_rows = x_ptr + token.to(gl.int64)[:, None] * stride_x
        if A_FP8:
            a_k_width: gl.constexpr = 16
            inv_a = 1.0 / gl.load(a_scale_ptr)
        else:
            a_k_width: gl.constexpr = 8
            inv_a = 1.0
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mfma, k_width=a_k_width)
        w_base = w_ptr + expert * (2 * N_PAD * (K_PAD // 2))
        s_base = ws_ptr + expert * (2 * N_PAD * (K_PAD // 32))
        n0 = pid_n * BLOCK_N
        gate = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mfma)
        up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mfma)
        N_ROWS: gl.constexpr = 2 * N_PAD
        if STAGES == 2:  # the next K step's tiles are loaded before this step's MFMAs
            x = _load_x(x_rows, row_ok, 0, H, inv_a, A_FP8, BLOCK_K, x_layout)
            bg, sg = _load_w(w_base, s_base, n0, 0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
            bu, su = _load_w(w_base, s_base, N_PAD + n0, 0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
            for k0 in range(BLOCK_K, K_PAD, BLOCK_K):
                x_next = _load_x(x_rows, row_ok, k0, H, inv_a, A_FP8, BLOCK_K, x_layout)
                bg_next, sg_next = _load_w(
                    w_base, s_base, n0, k0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma
                )
                bu_next, su_next = _load_w(
                    w_base, s_base, N_PAD + n0, k0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma
                )
                a = gl.convert_layout(x, a_layout)
                gate = _mma_w(a, bg, sg, gate, A_FP8, mfma)
                up = _mma_w(a, bu, su, up, A_FP8, mfma)
                x, bg, sg, bu, su = x_next, bg_next, sg_next, bu_next, su_next
            a = gl.convert_layout(x, a_layout)
            gate = _mma_w(a, bg, sg, gate, A_FP8, mfma)
            up = _mma_w(a, bu, su, up, A_FP8, mfma)
        else:
            for k0 in range(0, K_PAD, BLOCK_K):
                a = gl.convert_layout(
                    _load_x(x_rows, row_ok, k0, H, inv_a, A_FP8, BLOCK_K, x_layout), a_layout
                )
                bg, sg = _load_w(w_base, s_base, n0, k0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
                gate = _mma_w(a, bg, sg, gate, A_FP8, mfma)
                bu, su = _load_w(w_base, s_base, N_PAD + n0, k0, N_ROWS, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
                up = _mma_w(a, bu, su, up, A_FP8, mfma)
        if A_FP8:
            a_scale = gl.load(a_scale_ptr)
            gate = gate * a_scale
            up = up * a_scale
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mfma))
        if HAS_BIAS:
            gate = gate + gl.load(b_ptr + expert * (2 * N_PAD) + cols)[None, :]
            up = up + gl.load(b_ptr + expert * (2 * N_PAD) + N_PAD + cols)[None, :]
        if ACTIVATION == 1:  # swiglu_oai
            gate = gl.minimum(gate, limit)
            up = gl.minimum(gl.maximum(up, -limit), limit)
            act = gate / (1.0 + gl.exp(-alpha * gate)) * (up + 1.0)
        else:  # silu
            act = gate / (1.0 + gl.exp(-gate)) * up
        out_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mfma))
        y_offs = out_rows.to(gl.int64)[:, None] * N_PAD + cols[None, :]
        if A_FP8:
            inv_y = 1.0 / gl.load(y_scale_ptr)
            q = gl.minimum(gl.maximum(act * inv_y, -448.0), 448.0)
            gl.store(y_ptr + y_offs, q.to(gl.float8e4nv))
        else:
            gl.store(y_ptr + y_offs, act.to(y_ptr.dtype.element_ty))


@gluon.jit
def moe_gemm2(
    y_ptr, w_ptr, ws_ptr, b_ptr, slots_ptr,
    sorted_ids_ptr, sorted_weights_ptr, sorted_expert_ptr, num_valid_ptr,
    y_scale_ptr,
    T, H, TOP_K,
    N_PAD: gl.constexpr, K_PAD: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    WARPS_M: gl.constexpr, A_FP8: gl.constexpr, HAS_BIAS: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    mfma: gl.constexpr = _mfma_layout(A_FP8, WARPS_M, gl.num_warps() // WARPS_M)
    y_layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 4], [gl.num_warps(), 1], [1, 0])
    num_valid = gl.load(num_valid_ptr)
    if pid_m * BLOCK_M < num_valid:
        expert = gl.load(sorted_expert_ptr + pid_m).to(gl.int64)
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, y_layout))
        y_rows = y_ptr + rows.to(gl.int64)[:, None] * K_PAD
        if A_FP8:
            a_k_width: gl.constexpr = 16
        else:
            a_k_width: gl.constexpr = 8
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mfma, k_width=a_k_width)
        w_base = w_ptr + expert * (N_PAD * (K_PAD // 2))
        s_base = ws_ptr + expert * (N_PAD * (K_PAD // 32))
        n0 = pid_n * BLOCK_N
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mfma)
        kk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, y_layout))
        if STAGES == 2:  # the next K step's tiles are loaded before this step's MFMAs
            y = gl.load(y_rows + kk[None, :])
            b, s = _load_w(w_base, s_base, n0, 0, N_PAD, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
            for k0 in range(BLOCK_K, K_PAD, BLOCK_K):
                y_next = gl.load(y_rows + k0 + kk[None, :])
                b_next, s_next = _load_w(w_base, s_base, n0, k0, N_PAD, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
                acc = _mma_w(gl.convert_layout(y, a_layout), b, s, acc, A_FP8, mfma)
                y, b, s = y_next, b_next, s_next
            acc = _mma_w(gl.convert_layout(y, a_layout), b, s, acc, A_FP8, mfma)
        else:
            for k0 in range(0, K_PAD, BLOCK_K):
                a = gl.convert_layout(gl.load(y_rows + k0 + kk[None, :]), a_layout)
                b, s = _load_w(w_base, s_base, n0, k0, N_PAD, K_PAD, BLOCK_N, BLOCK_K, A_FP8, mfma)
                acc = _mma_w(a, b, s, acc, A_FP8, mfma)
        if A_FP8:
            acc = acc * gl.load(y_scale_ptr)
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mfma))
        if HAS_BIAS:
            acc = acc + gl.load(b_ptr + expert * N_PAD + cols)[None, :]
        out_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mfma))
        packed = gl.load(sorted_ids_ptr + out_rows)
        token = packed & 0xFFFFFF
        slot = (packed >> 24) & 0xFF
        acc = acc * gl.load(sorted_weights_ptr + out_rows)[:, None]
        dest = (token.to(gl.int64) * TOP_K + slot)[:, None] * H + cols[None, :]
        gl.store(slots_ptr + dest, acc, mask=(token < T)[:, None] & (cols < H)[None, :])


@gluon.jit
def moe_slot_sum(
    slots_ptr, ids_ptr, local_map_ptr, out_ptr, H, E, TOP_K: gl.constexpr, BLOCK_H: gl.constexpr
):
    t = gl.program_id(0).to(gl.int64)
    pid_h = gl.program_id(1)
    layout: gl.constexpr = gl.BlockedLayout([4], [64], [gl.num_warps()], [0])
    cols = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=layout)
    ok = cols < H
    total = gl.zeros([BLOCK_H], gl.float32, layout)
    for s in gl.static_range(TOP_K):
        e = gl.load(ids_ptr + t * TOP_K + s)
        in_range = (e >= 0) & (e < E)
        local = gl.load(local_map_ptr + gl.where(in_range, e, 0))
        keep = in_range & (local >= 0)
        row = gl.load(slots_ptr + (t * TOP_K + s) * H + cols, mask=ok & keep, other=0.0)
        total = total + row
    gl.store(out_ptr + t * H + cols, total.to(out_ptr.dtype.element_ty), mask=ok)
