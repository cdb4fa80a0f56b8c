"""Triton kernels of the fused MoE on expert-sorted tokens.

Rows are the entries of ``align_block_size`` (vLLM contract): block ``b`` of
``BLOCK_M`` sorted positions belongs to local expert ``expert_ids[b]``; the
entry at a position is a flat index ``t * top_k + slot`` (``>= num_entries``
for padding).

- ``moe_gemm1``: ``h = x[token] @ w13[e].T (+ b13[e])`` for the gate and up
  halves at once (two accumulators), the activation in the epilogue, stored
  at the sorted position: ``inter [num_padded, I]`` in the activation dtype
  (or fp8, quantized in the epilogue: ``OUT_QUANT``).
- ``moe_gemm2``: ``y = inter @ w2[e].T (+ b2[e])``, times the router weight,
  stored at row ``entry`` of ``[T * top_k, H]`` (or at row ``token`` of the
  output directly when ``top_k == 1`` and every expert is local).
- ``moe_combine``: ``out[t] = sum_j y[t * top_k + j]`` over the slots whose
  expert is local, in slot order (deterministic: no atomics).
- ``moe_quant_fp8``: the activation-quantization pre-pass (fp8 e4m3 rows with
  a per-row, a static per-tensor or 1 x ``BLOCK`` group scales), over the
  ``T`` tokens or over the sorted rows of the intermediate.

Quantized schemes (constexprs ``A_QUANT`` for the A operand, ``B_QUANT`` for
the weights; every ``0`` compiles to the bf16/fp16 kernel unchanged):

=============  ==============================  ===================================
``B_QUANT``    weight tile                     where its scale is applied
=============  ==============================  ===================================
1 channel      fp8 ``[BLOCK_K, BLOCK_N]``      epilogue, per column (``[E, N]``)
2 tensor       fp8                             epilogue, one per expert (``[E]``)
3 block        fp8                             every K step: ``dot * sa[m] * sb[n]``
                                               (``BLOCK_K`` divides ``GROUP_K``)
4 mxfp4        e2m1 pairs ``[N, BLOCK_K/2]``   left operand of a transposed dot,
                                               e8m0 per 32 along K (below)
=============  ==============================  ===================================

``A_QUANT``: 1 per row (epilogue), 2 static per tensor (epilogue), 3 groups of
``GROUP_K`` along K (every K step, with ``B_QUANT`` 3). fp8 x fp8 tiles go to
``tl.dot`` as fp8 (wgmma / CDNA3-4 MFMA).

mxfp4 (canonical bytes: elements ``2j``, ``2j + 1`` in the low, high nibble;
stored swizzled: each 16-byte group as its 4 x 4 transpose, ``experts.swizzle_mxfp4``)
computes the transposed tile ``acc^T [BLOCK_N, BLOCK_M] = w [BLOCK_N, BLOCK_K] @
x^T [BLOCK_K, BLOCK_M]``: the weight tile is read as stored (rows K-contiguous),
dequantized in registers, which is where Hopper's wgmma takes its A operand
(a right operand would go back through shared memory), and the few tokens of a
tile are the MMA's narrow N side. ``MX_DOT``: through ``tl.dot_scaled`` (Hopper
upcasts in registers; gfx950 has the scaled MFMA), else dequantized explicitly
to bf16 (``MX_PTX``: by PTX on packed registers) and ``tl.dot`` (the interpreter:
its ``dot_scaled`` rounds the bf16 operand through fp16). fp8 activations of
W4A8 convert to bf16 exactly.

fp8 rounding is bit-exact with ``moe_core.quant`` on every backend: scales
``amax / 448`` with a correctly rounded division, rounded toward zero to 21
significant bits; elements ``clamp(x / scale)`` rounded to nearest even in
float32 arithmetic before the (then exact) conversion to e4m3 (the
interpreter's own fp8 conversion does not round to nearest even).
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "swiglu_oai": 2, "relu2": 3}
#: A operand (activation) quantization: ``QuantScheme.activation`` -> ``A_QUANT``
A_QUANTS = {"none": 0, "fp8_per_token": 1, "fp8_per_tensor": 2, "fp8_group": 3}
#: weight quantization -> ``B_QUANT``
B_QUANTS = {"none": 0, "fp8_channel": 1, "fp8_tensor": 2, "fp8_block": 3, "mxfp4": 4}
#: what GEMM 1 stores: the activation dtype, fp8 with the static scale, fp8 in groups
OUT_QUANTS = {"none": 0, "fp8_tensor": 1, "fp8_group": 2}
#: constexpr value names for reports (``moe_plugin_portable.profile``)
CONSTEXPR_NAMES = {
    "A_QUANT": {v: ("a:" + k.removeprefix("fp8_") if v else "") for k, v in A_QUANTS.items()},
    "B_QUANT": {v: ("w:" + k if v else "") for k, v in B_QUANTS.items()},
    "OUT_QUANT": {v: ("out:" + k if v else "") for k, v in OUT_QUANTS.items()},
    "MODE": {v: "a:" + k.removeprefix("fp8_") for k, v in A_QUANTS.items() if v},  # moe_quant_fp8
}


@triton.jit
def _activation(gate, up, ACTIVATION: tl.constexpr, alpha, limit):
    if ACTIVATION == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACTIVATION == 2:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    else:
        r = tl.maximum(gate, 0.0)
        return r * r


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b``; ``UPCAST`` (interpreter only) works around its integer bf16 matmul."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _e2m1_f16(codes):
    """float32 ``e2m1(codes & 15) * 2**-14`` (int32 ``codes``), exact: the code's bits placed in an
    fp16's exponent and mantissa (e2m1's subnormal is then fp16's; no float32 subnormals)."""
    h = ((codes & 7) << 9) | ((codes & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_mx_rows(ptrs, s_ptrs, k_remaining, n_mask, offs_h, offs_s, EVEN_K: tl.constexpr):
    """An mxfp4 weight tile as stored: swizzled bytes ``[BLOCK_N, BLOCK_K/2]`` (``ptrs``, K-contiguous rows)
    and their e8m0 scales ``[BLOCK_N, BLOCK_K/32]`` (``s_ptrs``); ``k_remaining`` elements left
    along K (a multiple of 32), past them zeros."""
    if EVEN_K:
        b = tl.load(ptrs, mask=n_mask[:, None], other=0)
        s = tl.load(s_ptrs, mask=n_mask[:, None], other=0)
    else:
        b = tl.load(ptrs, mask=n_mask[:, None] & (offs_h[None, :] < k_remaining // 2), other=0)
        s = tl.load(s_ptrs, mask=n_mask[:, None] & (offs_s[None, :] < k_remaining // 32), other=0)
    return b, s


@triton.jit
def _unswizzle_mx(b):
    """The canonical bytes ``[BLOCK_N, BLOCK_K/2]`` of a swizzled mxfp4 tile (``experts.swizzle_mxfp4``:
    each 16-byte group stored as its 4 x 4 transpose). Only a relabeling of registers: a thread of
    NVIDIA's MMA operand layout holds canonical bytes ``q, q + 4, q + 8, q + 12`` of a group, which
    the swizzle stores as one 32-bit word (one shared-memory matrix load, not 16 byte loads)."""
    BN: tl.constexpr = b.shape[0]
    G: tl.constexpr = b.shape[1] // 16
    return tl.reshape(tl.permute(tl.reshape(b, (BN, G, 4, 4)), (0, 1, 3, 2)), (BN, b.shape[1]))


#: PTX of :func:`_dequant_mx_rows`, per 4 bytes ``$4``: ``$0 .. $3`` the bf16 pairs (low nibble,
#: high nibble) of bytes 0 .. 3, ``$5 .. $8`` their factors as bf16 pairs. Byte ``j``'s nibbles go
#: to bits 0-3 and 16-19 (``prmt``; selector 8 reads a zero byte), a multiply by ``2**6 + 2**12``
#: puts each magnitude (bits 0-2) at a bf16's bits 6-8 and its sign (bit 3) at bit 15: that bf16 is
#: ``e2m1 * 2**-126`` (0.5 a subnormal); one multiply by the factor (``fma`` with -0: exact; sm_80
#: and newer) scales it.
_MXFP4_PAIR_PTX = """prmt.b32 y, lo, hi, {selector:#06x};
mul.lo.u32 y, y, 0x1040;
and.b32 y, y, 0x81C081C0;
fma.rn.bf16x2 ${pair}, y, ${factor}, nz;
"""
MXFP4_TO_BF16_PTX = tl.constexpr(
    """{
.reg .b32 lo, hi, y, nz;
mov.b32 nz, 0x80008000;
and.b32 lo, $4, 0x0F0F0F0F;
shr.b32 hi, $4, 4;
and.b32 hi, hi, 0x0F0F0F0F;
"""
    + "".join(_MXFP4_PAIR_PTX.format(selector=0x8480 + 0x101 * j, pair=j, factor=5 + j) for j in range(4))
    + "}"
)
#: The PTX path's weights are ``2**-MX_PTX_SHIFT`` of the true ones (the GEMMs' epilogues multiply
#: the accumulators back, exactly): its factor ``2**(s - 127 + 126 - MX_PTX_SHIFT)`` then is a
#: normal bf16 for e8m0 bytes up to ``127 + MX_PTX_SHIFT + 1``.
MX_PTX_SHIFT = tl.constexpr(32)


@triton.jit
def _dequant_mx_rows(b, s, PTX: tl.constexpr):
    """bf16 ``[BLOCK_N, BLOCK_K]`` of mxfp4 bytes ``b [BLOCK_N, BLOCK_K/2]`` (byte ``j``: elements
    ``2j``, ``2j + 1`` in its low, high nibble) with e8m0 scales ``s [BLOCK_N, BLOCK_K/32]``.
    Exact for e8m0 bytes 2 to 240 (scales ``2**-125 .. 2**113``; byte 0, only all-zero blocks in
    practice, reads as 0).

    ``PTX`` (NVIDIA sm_80+): :data:`MXFP4_TO_BF16_PTX` on packed registers, under 3 instructions
    per element against 8 for the portable float32 path, its bf16 pairs the MMA operand's
    registers as they are. Its weights are ``2**-MX_PTX_SHIFT`` of the true ones (the caller
    multiplies its accumulator back), exact for e8m0 bytes 34 to 160 (scales ``2**-93 ..
    2**33``; larger ones saturate)."""
    BN: tl.constexpr = b.shape[0]
    BK: tl.constexpr = 2 * b.shape[1]
    NB: tl.constexpr = s.shape[1]
    if PTX:
        # the factor 2**(s - 1 - MX_PTX_SHIFT) as a bf16 pair from the bits (saturated), per byte
        scale = tl.minimum(s.to(tl.int32) + (126 - MX_PTX_SHIFT), 254) << 7
        scale = tl.reshape(tl.broadcast_to((scale * 0x10001)[:, :, None], (BN, NB, 16)), (BN, BK // 2))
        pairs = tl.inline_asm_elementwise(
            MXFP4_TO_BF16_PTX, "=r,=r,=r,=r,r,r,r,r,r", [b, scale], dtype=tl.int32, is_pure=True, pack=4
        )
        lo = (pairs & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (BN, BK))
    packed = b.to(tl.int32)
    v = tl.reshape(tl.join(_e2m1_f16(packed & 15), _e2m1_f16(packed >> 4)), (BN, BK))
    # 2**(s - 127) from the bits, times 2**14 for _e2m1_f16's factor
    scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True) * 16384.0
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, NB, 32)), (BN, BK))
    return (v * scale).to(tl.bfloat16)


@triton.jit
def _mx_dot_t(
    b,
    b_scale,
    at,
    acc,
    A_QUANT: tl.constexpr,
    MX_DOT: tl.constexpr,
    MX_PTX: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``acc + dequant(b) @ at``: swizzled mxfp4 weights ``[BLOCK_N, BLOCK_K/2]`` (the left operand:
    dequantized in registers, where Hopper's wgmma reads its A operand) times activations ``at
    [BLOCK_K, BLOCK_M]`` (bf16, or e4m3 codes for W4A8), by ``tl.dot_scaled`` (``MX_DOT``) or
    dequantized to bf16 (by PTX when ``MX_PTX``)."""
    b = _unswizzle_mx(b)
    if MX_DOT:
        if A_QUANT == 0:
            acc = tl.dot_scaled(b, b_scale, "e2m1", at, None, "bf16", acc)
        else:
            acc = tl.dot_scaled(b, b_scale, "e2m1", at, None, "e4m3", acc)
    else:
        acc = _dot(_dequant_mx_rows(b, b_scale, MX_PTX), at.to(tl.bfloat16), acc, UPCAST)
    return acc


@triton.jit
def _load_at(ptrs, row_mask, offs_k, k_remaining, EVEN_K: tl.constexpr):
    """The transposed activation tile ``[BLOCK_K, BLOCK_M]`` (columns of padding read as 0)."""
    if EVEN_K:
        return tl.load(ptrs, mask=row_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=row_mask[None, :] & (offs_k[:, None] < k_remaining), other=0.0)


@triton.jit
def _fp8_scale(amax):
    """``amax / 448`` rounded toward zero to 21 significant bits, 1 for 0 (``moe_core.quant``'s dynamic scale)."""
    scale = tl.math.div_rn(amax, 448.0)
    scale = (scale.to(tl.int32, bitcast=True) & -8).to(tl.float32, bitcast=True)
    return tl.where(scale > 0.0, scale, 1.0)


@triton.jit
def _fp8_quantize(x, scale):
    """e4m3 of ``clamp(x / scale, -448, 448)``, rounded to nearest even (float32 ``x`` and ``scale``).

    Adding ``c = 2**(e + 20)`` (``e``: the exponent of ``|y|``, at least -6, e4m3's smallest
    normal) leaves ``|y|`` rounded to a multiple of ``2**(e - 3)``: e4m3's 3 mantissa bits
    (and its subnormal spacing ``2**-9``); the conversion of that exact value is exact.
    """
    y = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = ((e + 147) << 23).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + c) - c
    return tl.where(bits < 0, -r, r).to(tl.float8e4nv)


@triton.jit
def _pid_grid(num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (m block, n block), grouped along M for L2 reuse of weight tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _load_a(ptrs, row_mask, offs_k, k_remaining, EVEN_K: tl.constexpr):
    """A ``[BLOCK_M, BLOCK_K]`` activation tile (rows of padding read as 0)."""
    if EVEN_K:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)


@triton.jit
def _load_b(ptrs, k_remaining, n_mask, offs_k, EVEN_K: tl.constexpr):
    """A ``[BLOCK_K, BLOCK_N]`` weight tile (bf16/fp16/fp8; for mxfp4 the ``[BLOCK_K/2, BLOCK_N]`` bytes)."""
    if EVEN_K:
        return tl.load(ptrs, mask=n_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=(offs_k[:, None] < k_remaining) & n_mask[None, :], other=0.0)


@triton.jit
def _block_dot(a, b, acc, a_scale, b_scale, UPCAST: tl.constexpr):
    """``acc + (a @ b) * a_scale[:, None] * b_scale[None, :]`` (one K step of fp8 block scaling)."""
    part = _dot(a, b, tl.zeros(acc.shape, dtype=tl.float32), UPCAST)
    return acc + part * a_scale[:, None] * b_scale[None, :]


@triton.jit
def moe_gemm1(
    x_ptr,
    w_ptr,
    b_ptr,
    inter_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    topk_weights_ptr,
    xs_ptr,
    ws_ptr,
    os_ptr,
    num_entries,
    K,
    INTER,
    stride_xm,
    stride_we,
    stride_wn,
    stride_be,
    stride_im,
    stride_xsm,
    stride_wse,
    stride_wsn,
    stride_osm,
    alpha,
    limit,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    OUT_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    MX_DOT: tl.constexpr = False,
    MX_PTX: tl.constexpr = False,
):
    """``x_ptr`` rows are tokens (fp8 when ``A_QUANT``; ``xs_ptr`` their scales); ``ws_ptr``: the
    weight scales; ``os_ptr``: the output's static scale (``OUT_QUANT`` 1) or its group scales
    ``[rows, cdiv(INTER, GROUP_K)]`` (``OUT_QUANT`` 2, ``BLOCK_N`` a multiple of ``GROUP_K``)."""
    pid_m, pid_n = _pid_grid(tl.cdiv(INTER, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m)
    row_mask = entry < num_entries
    token = tl.where(row_mask, entry // TOP_K, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]

    if B_QUANT == 4:  # mxfp4, transposed: acc^T [BLOCK_N, BLOCK_M] = w13 tile @ x^T
        offs_h = tl.arange(0, BLOCK_K // 2)
        offs_s = tl.arange(0, BLOCK_K // 32)
        g_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_h[None, :]
        gs_ptrs = ws_ptr + expert * stride_wse + offs_n[:, None].to(tl.int64) * stride_wsn + offs_s[None, :]
        u_ptrs = g_ptrs + INTER * stride_wn
        us_ptrs = gs_ptrs + INTER * stride_wsn
        at_ptrs = x_ptr + token[None, :] * stride_xm + offs_k[:, None]
        acc_gt = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_ut = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            at = _load_at(at_ptrs, row_mask, offs_k, K - k0, EVEN_K)
            g, g_s = _load_mx_rows(g_ptrs, gs_ptrs, K - k0, n_mask, offs_h, offs_s, EVEN_K)
            acc_gt = _mx_dot_t(g, g_s, at, acc_gt, A_QUANT, MX_DOT, MX_PTX, UPCAST)
            if GATED:
                u, u_s = _load_mx_rows(u_ptrs, us_ptrs, K - k0, n_mask, offs_h, offs_s, EVEN_K)
                acc_ut = _mx_dot_t(u, u_s, at, acc_ut, A_QUANT, MX_DOT, MX_PTX, UPCAST)
            at_ptrs += BLOCK_K
            g_ptrs += BLOCK_K // 2
            u_ptrs += BLOCK_K // 2
            gs_ptrs += BLOCK_K // 32
            us_ptrs += BLOCK_K // 32
        acc_g = tl.trans(acc_gt)
        acc_u = tl.trans(acc_ut)
        if MX_PTX and not MX_DOT:  # _dequant_mx_rows' weights were 2**-MX_PTX_SHIFT of the true ones
            acc_g = acc_g * (2.0**MX_PTX_SHIFT)
            acc_u = acc_u * (2.0**MX_PTX_SHIFT)
    else:
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        u_ptrs = g_ptrs + INTER * stride_wn
        if B_QUANT == 3:  # fp8 blocks: scales of the (GROUP_N x GROUP_K) weight blocks and A's groups
            gs_ptrs = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
            us_ptrs = ws_ptr + expert * stride_wse + ((INTER + offs_n) // GROUP_N) * stride_wsn
            as_ptrs = xs_ptr + token * stride_xsm
        for k0 in range(0, K, BLOCK_K):
            a = _load_a(a_ptrs, row_mask, offs_k, K - k0, EVEN_K)
            g = _load_b(g_ptrs, K - k0, n_mask, offs_k, EVEN_K)
            if B_QUANT == 3:
                kg = k0 // GROUP_K
                a_s = tl.load(as_ptrs + kg, mask=row_mask, other=0.0)
                acc_g = _block_dot(a, g, acc_g, a_s, tl.load(gs_ptrs + kg, mask=n_mask, other=0.0), UPCAST)
            else:
                acc_g = _dot(a, g, acc_g, UPCAST)
            if GATED:
                u = _load_b(u_ptrs, K - k0, n_mask, offs_k, EVEN_K)
                if B_QUANT == 3:
                    u_s = tl.load(us_ptrs + kg, mask=n_mask, other=0.0)
                    acc_u = _block_dot(a, u, acc_u, a_s, u_s, UPCAST)
                else:
                    acc_u = _dot(a, u, acc_u, UPCAST)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K

    # dequantize: per-row / per-tensor activation scales, per-channel / per-expert weight scales
    if A_QUANT == 1:
        a_s = tl.load(xs_ptr + token * stride_xsm, mask=row_mask, other=0.0)
        acc_g = acc_g * a_s[:, None]
        acc_u = acc_u * a_s[:, None]
    elif A_QUANT == 2:
        a_s = tl.load(xs_ptr)
        acc_g = acc_g * a_s
        acc_u = acc_u * a_s
    if B_QUANT == 1:
        acc_g = acc_g * tl.load(ws_ptr + expert * stride_wse + offs_n, mask=n_mask, other=0.0)[None, :]
        acc_u = (
            acc_u * tl.load(ws_ptr + expert * stride_wse + INTER + offs_n, mask=n_mask, other=0.0)[None, :]
        )
    elif B_QUANT == 2:
        w_s = tl.load(ws_ptr + expert * stride_wse)
        acc_g = acc_g * w_s
        acc_u = acc_u * w_s
    if WEIGHT_ON_INPUT:  # (quantized inputs had the weight applied before their quantization)
        route = tl.load(topk_weights_ptr + entry, mask=row_mask, other=0.0).to(tl.float32)
        acc_g = acc_g * route[:, None]
        acc_u = acc_u * route[:, None]
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + expert * stride_be + INTER + offs_n, mask=n_mask, other=0.0).to(
                tl.float32
            )[None, :]
    h = _activation(acc_g, acc_u, ACTIVATION, alpha, limit)
    i_ptrs = inter_ptr + offs_m[:, None].to(tl.int64) * stride_im + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if OUT_QUANT == 0:
        tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=out_mask)
    elif OUT_QUANT == 1:  # static per-tensor fp8 (the scale GEMM 2's input is given)
        tl.store(i_ptrs, _fp8_quantize(h, tl.load(os_ptr)), mask=out_mask)
    else:  # dynamic 1 x GROUP_K groups: BLOCK_N // GROUP_K whole groups per tile
        NG: tl.constexpr = BLOCK_N // GROUP_K
        h3 = tl.reshape(tl.where(n_mask[None, :], h, 0.0), (BLOCK_M, NG, GROUP_K))
        scale = _fp8_scale(tl.max(tl.abs(h3), axis=2))
        q = tl.reshape(_fp8_quantize(h3, scale[:, :, None]), (BLOCK_M, BLOCK_N))
        tl.store(i_ptrs, q, mask=out_mask)
        offs_g = pid_n * NG + tl.arange(0, NG)
        s_ptrs = os_ptr + offs_m[:, None].to(tl.int64) * stride_osm + offs_g[None, :]
        tl.store(s_ptrs, scale, mask=row_mask[:, None] & (offs_g < tl.cdiv(INTER, GROUP_K))[None, :])


@triton.jit
def moe_gemm2(
    inter_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    topk_weights_ptr,
    xs_ptr,
    ws_ptr,
    num_entries,
    K,
    N,
    stride_im,
    stride_we,
    stride_wn,
    stride_be,
    stride_ym,
    stride_xsm,
    stride_wse,
    stride_wsn,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    ROW_IS_TOKEN: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    MX_DOT: tl.constexpr = False,
    MX_PTX: tl.constexpr = False,
):
    """``inter_ptr`` rows are sorted positions (fp8 when ``A_QUANT``; ``xs_ptr`` their scales, by position)."""
    pid_m, pid_n = _pid_grid(tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m)
    row_mask = entry < num_entries
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = inter_ptr + offs_m[:, None].to(tl.int64) * stride_im + offs_k[None, :]

    if B_QUANT == 4:  # mxfp4, transposed: acc^T [BLOCK_N, BLOCK_M] = w2 tile @ inter^T
        offs_h = tl.arange(0, BLOCK_K // 2)
        offs_s = tl.arange(0, BLOCK_K // 32)
        b_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_h[None, :]
        bs_ptrs = ws_ptr + expert * stride_wse + offs_n[:, None].to(tl.int64) * stride_wsn + offs_s[None, :]
        at_ptrs = inter_ptr + offs_m[None, :].to(tl.int64) * stride_im + offs_k[:, None]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            at = _load_at(at_ptrs, row_mask, offs_k, K - k0, EVEN_K)
            b, b_s = _load_mx_rows(b_ptrs, bs_ptrs, K - k0, n_mask, offs_h, offs_s, EVEN_K)
            acc_t = _mx_dot_t(b, b_s, at, acc_t, A_QUANT, MX_DOT, MX_PTX, UPCAST)
            at_ptrs += BLOCK_K
            b_ptrs += BLOCK_K // 2
            bs_ptrs += BLOCK_K // 32
        acc = tl.trans(acc_t)
        if MX_PTX and not MX_DOT:  # _dequant_mx_rows' weights were 2**-MX_PTX_SHIFT of the true ones
            acc = acc * (2.0**MX_PTX_SHIFT)
    else:
        b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        if B_QUANT == 3:
            bs_ptrs = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
            as_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xsm
        for k0 in range(0, K, BLOCK_K):
            a = _load_a(a_ptrs, row_mask, offs_k, K - k0, EVEN_K)
            b = _load_b(b_ptrs, K - k0, n_mask, offs_k, EVEN_K)
            if B_QUANT == 3:
                kg = k0 // GROUP_K
                a_s = tl.load(as_ptrs + kg, mask=row_mask, other=0.0)
                acc = _block_dot(a, b, acc, a_s, tl.load(bs_ptrs + kg, mask=n_mask, other=0.0), UPCAST)
            else:
                acc = _dot(a, b, acc, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    if A_QUANT == 1:
        acc = acc * tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xsm, mask=row_mask, other=0.0)[:, None]
    elif A_QUANT == 2:
        acc = acc * tl.load(xs_ptr)
    if B_QUANT == 1:
        acc = acc * tl.load(ws_ptr + expert * stride_wse + offs_n, mask=n_mask, other=0.0)[None, :]
    elif B_QUANT == 2:
        acc = acc * tl.load(ws_ptr + expert * stride_wse)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if APPLY_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + entry, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if ROW_IS_TOKEN:
        row = tl.where(row_mask, entry // TOP_K, 0).to(tl.int64)
    else:
        row = tl.where(row_mask, entry, 0).to(tl.int64)
    y_ptrs = y_ptr + row[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_quant_fp8(
    x_ptr,
    q_ptr,
    s_ptr,
    static_ptr,
    sorted_ids_ptr,
    num_padded_ptr,
    topk_weights_ptr,
    num_entries,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    MODE: tl.constexpr,
    SORTED: tl.constexpr,
    WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr = False,
):
    """fp8 rows ``q[r] = quantize(x[r])`` (``MODE``: ``A_QUANT`` 1 per row, 2 static, 3 groups of ``BLOCK``).

    Grid ``(rows, column blocks)``: one program per row (mode 1: it loops over ``K`` twice, for
    the row's max and then the codes, unless ``ONE_PASS``: ``BLOCK >= K``, the row held in
    registers from one load) or per ``BLOCK`` columns of a row. ``SORTED``: rows are sorted
    positions (the intermediate), those past ``num_padded`` or holding padding are skipped. ``WEIGHT``: the row is scaled by its
    router weight first (``top_k == 1``, weight on the input). Scales: ``s[r]`` per row,
    ``s[r, group]`` per group.
    """
    row = tl.program_id(0)
    if SORTED:
        if row >= tl.load(num_padded_ptr):
            return
        if tl.load(sorted_ids_ptr + row) >= num_entries:
            return
    row = row.to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    route = 1.0
    if WEIGHT:
        route = tl.load(topk_weights_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    if MODE == 1 and ONE_PASS:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if WEIGHT:
            x = x * route
        scale = _fp8_scale(tl.max(tl.abs(x), axis=0))
        tl.store(q_row + offs, _fp8_quantize(x, scale), mask=offs < K)
        tl.store(s_ptr + row * stride_sm, scale)
    elif MODE == 1:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            if WEIGHT:
                x = x * route
            amax = tl.maximum(amax, tl.abs(x))
        scale = _fp8_scale(tl.max(amax, axis=0))
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            if WEIGHT:
                x = x * route
            tl.store(q_row + k0 + offs, _fp8_quantize(x, scale), mask=k0 + offs < K)
        tl.store(s_ptr + row * stride_sm, scale)
    else:
        cols = tl.program_id(1) * BLOCK + offs
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if WEIGHT:
            x = x * route
        if MODE == 2:
            scale = tl.load(static_ptr)
        else:
            scale = _fp8_scale(tl.max(tl.abs(x), axis=0))
            tl.store(s_ptr + row * stride_sm + tl.program_id(1), scale)
        tl.store(q_row + cols, _fp8_quantize(x, scale), mask=cols < K)


@triton.jit
def moe_combine(
    y_ptr,
    out_ptr,
    topk_ids_ptr,
    expert_map_ptr,
    N,
    num_experts,
    TOP_K: tl.constexpr,
    HAS_MAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(topk_ids_ptr + token * TOP_K + j)
        valid = (expert >= 0) & (expert < num_experts)
        if HAS_MAP:
            local = tl.load(expert_map_ptr + tl.where(valid, expert, 0))
            valid = valid & (local >= 0)
        y = tl.load(y_ptr + (token * TOP_K + j) * N + offs_n, mask=n_mask, other=0.0)
        acc += tl.where(valid, y.to(tl.float32), 0.0)  # rows of dropped slots were never written
    tl.store(out_ptr + token * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------- decode (small T)
#
# Two launches, no sorting, no combine: GEMM 1 over (entry, N block) programs, GEMM 2 over
# (token, H block) programs that loop over the token's k slots in slot order. Each program
# is a GEMV: a ``[BLOCK_N, BLOCK_K]`` weight tile (rows K-contiguous, coalesced for any
# BLOCK_N) times one activation row, accumulated elementwise in float32 and reduced over K
# once at the end. Weights are read once per entry that hits them (configs.use_decode says
# when that pays). Activations are quantized in the kernel, per K step or per row, with the
# pre-pass's arithmetic (same codes); the intermediate is float32 (never rounded twice).
#
# Split (``SPLIT > 1``, the third grid axis): at decode ``T`` a program's K steps are serial
# load latencies, and too few programs keep too few bytes in flight to stream the weights.
# GEMM 1 then splits K into ``SPLIT`` chunks, GEMM 2 its (slot, K) steps into ``SLOT_GROUPS``
# groups of slots times ``K_SPLITS`` chunks. Each program stores its float32 partial at its
# split index; the last of a tile's programs to arrive (an acq_rel counter per tile in
# ``count_ptr``, which it resets to 0) sums the partials in split order (deterministic) and
# runs the epilogue. Counters start at 0 and are 0 again after every launch.


@triton.jit
def _decode_row_amax(row_ptr, K, route, BLOCK_K: tl.constexpr):
    """``max |row[:K] * route|`` of one float row (per-token fp8 scale), in float32, in steps of
    ``BLOCK_K`` (the decode kernels' ``ROW_BLOCK``: ``K`` in one step where it fits, every load
    in flight at once)."""
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(row_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32) * route
        amax = tl.maximum(amax, tl.abs(v))
    return tl.max(amax, axis=0)


@triton.jit
def _decode_a(row_ptr, offs, K, route, a_scale, group_s_ptr, A_QUANT: tl.constexpr, A_PRE: tl.constexpr):
    """One K step of the activation row in float32; fp8-quantized codes (as float32) when
    ``A_QUANT`` (1 per row, 2 static: ``a_scale`` given; 3 groups: this step is one group,
    its scale returned second). ``A_PRE``: the row holds those codes already (fp8, from
    ``moe_quant_fp8``; ``route`` applied), group scales at ``group_s_ptr`` (this step's)."""
    if A_PRE:
        a = tl.load(row_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        if A_QUANT == 3:
            a_scale = tl.load(group_s_ptr)
        return a, a_scale
    a = tl.load(row_ptr + offs, mask=offs < K, other=0.0).to(tl.float32) * route
    if A_QUANT == 3:
        a_scale = _fp8_scale(tl.max(tl.abs(a), axis=0))
    if A_QUANT != 0:
        a = _fp8_quantize(a, a_scale).to(tl.float32)
    return a, a_scale


@triton.jit
def _decode_w(w_row_ptrs, n_mask, offs_k, K):
    """A ``[BLOCK_N, BLOCK_K]`` float32 weight tile (bf16/fp16/fp8 codes)."""
    return tl.load(
        w_row_ptrs[:, None] + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0
    ).to(tl.float32)


@triton.jit
def _e2m1_pair(words, J: tl.constexpr):
    """The two float32 ``e2m1 * 2**-14`` of the codes at bits ``4J .. 4J + 3`` and ``16 + 4J ..
    19 + 4J`` of int32 ``words`` (``J`` in 0..3), exact: each code's bits placed in an fp16's
    exponent and mantissa (e2m1's subnormal is then fp16's; no float32 subnormals). Magnitude
    bits to 9-11, sign to 15, of both 16-bit lanes at once: two shifts of the word and one
    bit-select (the compiler's ``lop3``), where shifting the code down first would take three."""
    mag = (words << (9 - 4 * J)) if J < 3 else (words >> 3)
    h = (mag & 0x0E000E00) | ((words << (12 - 4 * J)) & -0x7FFF8000)  # -0x7FFF8000: 0x80008000
    lo = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _word_elements(a):
    """The 8 slices ``a[..., i]`` (``[NB, 4]`` each, in order) of ``a [NB, 4, 8]``."""
    NB: tl.constexpr = a.shape[0]
    a = tl.reshape(a, (NB, 4, 2, 2, 2))  # i = 4h + 2c1 + c0
    e0, e1 = tl.split(a)  # c0
    e00, e01 = tl.split(e0)  # c1
    e10, e11 = tl.split(e1)
    a0, a4 = tl.split(e00)  # h
    a2, a6 = tl.split(e01)
    a1, a5 = tl.split(e10)
    a3, a7 = tl.split(e11)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _mx_words(w_row_ptrs, s_row_ptrs, n_mask, offs_b, k0, k_hi):
    """The mxfp4 tile at K offset ``k0`` as stored: int32 words ``[BLOCK_N, NB, 4]`` (rows of ``K/2``
    bytes, ``K`` a multiple of 32: 16-byte aligned) and e8m0 scales ``[BLOCK_N, NB]``, zeros at and
    past ``k_hi``."""
    kb_mask = k0 // 32 + offs_b < k_hi // 32
    offs_w = tl.arange(0, 4)
    word_ptrs = (w_row_ptrs + k0 // 2).to(tl.pointer_type(tl.int32))
    words = tl.load(
        word_ptrs[:, None, None] + offs_b[None, :, None] * 4 + offs_w[None, None, :],
        mask=n_mask[:, None, None] & kb_mask[None, :, None],
        other=0,
    )
    s = tl.load(
        s_row_ptrs[:, None] + k0 // 32 + offs_b[None, :], mask=n_mask[:, None] & kb_mask[None, :], other=0
    )
    return words, s


@triton.jit
def _decode_mxfp4(
    words, s, offs_b, k0, K, a_row_ptr, route, a_scale, A_QUANT: tl.constexpr, A_PRE: tl.constexpr
):
    """``2**-14 * sum a[k] * w[n, k]`` over each 32-block of an mxfp4 tile (:func:`_mx_words`) at K
    offset ``k0``, the blocks' e8m0 scales applied: float32 ``[BLOCK_N, NB]`` (``2**-14``:
    :func:`_e2m1_pair`'s).

    Word ``w`` of a block holds its canonical bytes ``w, w + 4, w + 8, w + 12`` (the swizzle), so
    bits ``4c`` hold element ``2w + 8 (c // 2) + c % 2``. The activation (``a_row_ptr``,
    fp8-quantized per ``A_QUANT``) is read once per step and split into the elements each nibble
    position holds."""
    # the activation step once, as [NB, 4, 8] (block, word, nibble of the word), quantized once;
    # then its 8 nibble slices [NB, 4], each shared by the BLOCK_N rows
    offs_w = tl.arange(0, 4)
    offs_c = tl.arange(0, 8)
    offs_c = (offs_c // 2) * 8 + offs_c % 2
    offs_e = offs_b[:, None, None] * 32 + offs_w[None, :, None] * 2 + offs_c[None, None, :]
    a, _s = _decode_a(a_row_ptr + k0, offs_e, K - k0, route, a_scale, a_row_ptr, A_QUANT, A_PRE)
    a0, a1, a2, a3, a4, a5, a6, a7 = _word_elements(a)
    # one chain of fused multiply-adds per word (no separate products summed afterwards)
    v0, v1 = _e2m1_pair(words, 0)  # nibbles c and 4 + c of the word
    part = v0 * a0[None, :, :]
    part += v1 * a4[None, :, :]
    v0, v1 = _e2m1_pair(words, 1)
    part += v0 * a1[None, :, :]
    part += v1 * a5[None, :, :]
    v0, v1 = _e2m1_pair(words, 2)
    part += v0 * a2[None, :, :]
    part += v1 * a6[None, :, :]
    v0, v1 = _e2m1_pair(words, 3)
    part += v0 * a3[None, :, :]
    part += v1 * a7[None, :, :]
    # e8m0 byte s: 2**(s - 127) from its bits (byte 0, only all-zero blocks in practice: 0)
    return tl.sum(part, axis=2) * (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _sum8(p):
    """``[BLOCK_N, BLOCK_K / 8]``: the sums of ``p [BLOCK_N, BLOCK_K]`` over each 8 consecutive elements."""
    return tl.sum(tl.reshape(p, (p.shape[0], p.shape[1] // 8, 8)), axis=2)


@triton.jit
def _decode_gemv(
    a_row_ptr,
    w_row_ptrs,
    s_row_ptrs,
    u_row_ptrs,
    su_row_ptrs,
    n_mask,
    K,
    k_lo,
    k_hi,
    route,
    a_scale,
    as_row_ptr,
    GATED: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_PRE: tl.constexpr,
):
    """``sum a[k] * w[n, k]`` over ``k_lo <= k < k_hi`` (``k_lo`` a multiple of ``BLOCK_K``, ``k_hi <= K``)
    for one ``BLOCK_N`` slice of rows, float32 ``[BLOCK_N]``, and the
    same for the ``u`` rows when ``GATED`` (gate and up in one loop: one activation load and
    twice the weight loads in flight per step; else the first result is returned twice).

    ``w_row_ptrs``: the rows' first elements (bytes for mxfp4); ``s_row_ptrs``: their scale
    rows (fp8_block: ``[kb]`` per row's block; mxfp4: e8m0 ``[K/32]``). Per-row / per-tensor
    activation and weight scales are the caller's (applied to the result); fp8 groups
    (``A_QUANT`` 3 with ``B_QUANT`` 3: ``BLOCK_K`` equals the group) are applied per step.
    ``A_PRE``: ``a_row_ptr`` holds fp8 codes quantized beforehand, ``as_row_ptr`` their group
    scales (``A_QUANT`` 3; one per ``BLOCK_K`` step); 2: each thread reads the codes it
    multiplies in the weight tile's layout (the bf16/fp8 weights; else as 1).
    """
    if B_QUANT == 4:
        NB: tl.constexpr = BLOCK_K // 32
        offs_b = tl.arange(0, NB)
        acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        # the next step's words are loaded before this step's arithmetic: two steps of weights
        # in flight per program (the loop is a chain of load latencies otherwise). Measured on
        # the H200 at T=1: mxfp4 10-12% faster; the bf16/fp8 tiles below, twice the bytes per
        # step, doubled their registers and were slower (fp8 1.4-1.6x), so they load in the step.
        w_next, s_next = _mx_words(w_row_ptrs, s_row_ptrs, n_mask, offs_b, k_lo, k_hi)
        u_next, su_next = w_next, s_next
        if GATED:
            u_next, su_next = _mx_words(u_row_ptrs, su_row_ptrs, n_mask, offs_b, k_lo, k_hi)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w, ws, u, us = w_next, s_next, u_next, su_next
            w_next, s_next = _mx_words(w_row_ptrs, s_row_ptrs, n_mask, offs_b, k0 + BLOCK_K, k_hi)
            if GATED:
                u_next, su_next = _mx_words(u_row_ptrs, su_row_ptrs, n_mask, offs_b, k0 + BLOCK_K, k_hi)
            acc += _decode_mxfp4(w, ws, offs_b, k0, K, a_row_ptr, route, a_scale, A_QUANT, A_PRE)
            if GATED:
                acc_u += _decode_mxfp4(u, us, offs_b, k0, K, a_row_ptr, route, a_scale, A_QUANT, A_PRE)
    else:
        # partial sums per 8 consecutive elements (within a thread's vector load: no shuffles), so
        # that the accumulators take BLOCK_K / 8 of the registers a [BLOCK_N, BLOCK_K] one would
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        zero_n = tl.zeros((BLOCK_N, 1), dtype=tl.int32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if A_PRE == 2:
                # fp8 codes, nothing to compute on them: read in the weight tile's layout, each
                # thread the elements it multiplies (vector loads hitting L1), instead of once per
                # step and exchanged through shared memory (byte loads, a store, two barriers;
                # sm_90 GEMM 1 of deepseek-v3-tp8 fp8_block: 122 -> 105 instructions per step).
                # Only for tiles of a few elements per thread: converting every thread's copy
                # costs more than the exchange beyond (and for bf16 rows).
                a = tl.load(
                    a_row_ptr + k0 + offs_k[None, :] + zero_n, mask=(offs_k < K - k0)[None, :], other=0.0
                ).to(tl.float32)
                a_s = a_scale
                if A_QUANT == 3:
                    a_s = tl.load(as_row_ptr + k0 // BLOCK_K)
            else:
                a, a_s = _decode_a(
                    a_row_ptr + k0, offs_k, K - k0, route, a_scale, as_row_ptr + k0 // BLOCK_K, A_QUANT, A_PRE
                )
                a = a[None, :]
            w = _decode_w(w_row_ptrs + k0, n_mask, offs_k, K - k0)
            if GATED:
                u = _decode_w(u_row_ptrs + k0, n_mask, offs_k, K - k0)
            if B_QUANT == 3:
                b_s = tl.load(s_row_ptrs + k0 // BLOCK_K, mask=n_mask, other=0.0)
                acc += _sum8(w * a) * (b_s * a_s)[:, None]
                if GATED:
                    bu_s = tl.load(su_row_ptrs + k0 // BLOCK_K, mask=n_mask, other=0.0)
                    acc_u += _sum8(u * a) * (bu_s * a_s)[:, None]
            else:
                acc += _sum8(w * a)
                if GATED:
                    acc_u += _sum8(u * a)
    out = tl.sum(acc, axis=1)
    out_u = tl.sum(acc_u, axis=1)
    if B_QUANT == 4:  # _e2m1_pair's factor
        out = out * 16384.0
        out_u = out_u * 16384.0
    if GATED:
        return out, out_u
    return out, out


@triton.jit
def _split_range(K, chunk, chunks, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)``: chunk ``chunk`` of ``chunks`` of ``K``'s ``BLOCK_K`` steps (maybe empty)."""
    per = tl.cdiv(tl.cdiv(K, BLOCK_K), chunks) * BLOCK_K
    k_lo = chunk * per
    return k_lo, tl.minimum(k_lo + per, K)


@triton.jit
def _split_arrive(count_ptr, SPLIT: tl.constexpr):
    """After this program stored its partials: whether it is the last of the tile's ``SPLIT``
    programs (then every partial is visible to it, and the counter is reset to 0)."""
    tl.debug_barrier()  # every thread's partial stored before the release
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    if last:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _split_sum(part_ptrs, stride_split, mask, SPLIT: tl.constexpr):
    """``sum_s part[s]`` in split order (float32), read past L1 (other programs wrote them)."""
    total = tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        total += tl.load(part_ptrs + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _decode_expert(topk_ids_ptr, expert_map_ptr, entry, num_experts, HAS_MAP: tl.constexpr):
    """The local expert of ``entry`` (int64), ``-1`` unless it is kept (in range and local)."""
    expert = tl.load(topk_ids_ptr + entry).to(tl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    if HAS_MAP:
        expert = tl.load(expert_map_ptr + tl.where(valid, expert, 0)).to(tl.int32)
        valid = valid & (expert >= 0)
    return tl.where(valid, expert, -1).to(tl.int64)


@triton.jit
def _decode_gemm1_tile(
    entry,
    tile,
    chunk,
    tiles,
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
    ready_ptr,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    A_PRE: tl.constexpr,
    CHAIN: tl.constexpr,
):
    """:func:`moe_decode_gemm1`'s program ``(entry, tile, chunk)`` (``tiles`` along N); ``CHAIN``: a
    release increment of ``ready[entry]`` once the tile's intermediate is stored."""
    expert = _decode_expert(topk_ids_ptr, expert_map_ptr, entry, num_experts, HAS_MAP)
    if expert >= 0:
        token = (entry // TOP_K).to(tl.int64)
        x_row = x_ptr + token * stride_xm
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < INTER
        route = 1.0
        if WEIGHT_ON_INPUT and not A_PRE:  # (before the activation's quantization: the reference's order)
            route = tl.load(topk_weights_ptr + entry).to(tl.float32)
        as_row = as_ptr + token * stride_asm
        a_scale = 1.0
        if A_QUANT == 1:
            if A_PRE:
                a_scale = tl.load(as_row)
            else:
                a_scale = _fp8_scale(_decode_row_amax(x_row, K, route, ROW_BLOCK))
        elif A_QUANT == 2:
            a_scale = tl.load(as_ptr)
        w_rows = w_ptr + expert * stride_we + offs_n.to(tl.int64) * stride_wn
        u_rows = w_rows + INTER * stride_wn
        if B_QUANT == 3:  # fp8 blocks: the scale row of each weight row's block
            s_rows = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
            su_rows = ws_ptr + expert * stride_wse + ((INTER + offs_n) // GROUP_N) * stride_wsn
        elif B_QUANT == 4:  # mxfp4: e8m0 rows [K/32]
            s_rows = ws_ptr + expert * stride_wse + offs_n.to(tl.int64) * stride_wsn
            su_rows = s_rows + INTER * stride_wsn
        else:
            s_rows = ws_ptr
            su_rows = ws_ptr
        k_lo, k_hi = 0, K
        if SPLIT > 1:
            k_lo, k_hi = _split_range(K, chunk, SPLIT, BLOCK_K)
        gate, up = _decode_gemv(
            x_row,
            w_rows,
            s_rows,
            u_rows,
            su_rows,
            n_mask,
            K,
            k_lo,
            k_hi,
            route,
            a_scale,
            as_row,
            GATED,
            A_QUANT,
            B_QUANT,
            BLOCK_N,
            BLOCK_K,
            A_PRE,
        )
        last = True
        if SPLIT > 1:
            p_row = part_ptr + entry.to(tl.int64) * (2 * INTER) + offs_n
            tl.store(p_row + chunk * stride_ps, gate, mask=n_mask)
            if GATED:
                tl.store(p_row + chunk * stride_ps + INTER, up, mask=n_mask)
            last = _split_arrive(count_ptr + entry * tiles + tile, SPLIT)
            if last:
                gate = _split_sum(p_row, stride_ps, n_mask, SPLIT)
                if GATED:
                    up = _split_sum(p_row + INTER, stride_ps, n_mask, SPLIT)
                else:
                    up = gate
        if last:
            if A_QUANT == 1 or A_QUANT == 2:
                gate = gate * a_scale
                up = up * a_scale
            if B_QUANT == 1:
                gate = gate * tl.load(ws_ptr + expert * stride_wse + offs_n, mask=n_mask, other=0.0)
                up = up * tl.load(ws_ptr + expert * stride_wse + INTER + offs_n, mask=n_mask, other=0.0)
            elif B_QUANT == 2:
                w_s = tl.load(ws_ptr + expert * stride_wse)
                gate = gate * w_s
                up = up * w_s
            if HAS_BIAS:
                gate += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if GATED:
                    up += tl.load(b_ptr + expert * stride_be + INTER + offs_n, mask=n_mask, other=0.0).to(
                        tl.float32
                    )
            h = _activation(gate, up, ACTIVATION, alpha, limit)
            tl.store(inter_ptr + entry.to(tl.int64) * stride_im + offs_n, h, mask=n_mask)
            if CHAIN:  # every thread stored its part of the tile before the release
                tl.debug_barrier()
                tl.atomic_add(ready_ptr + entry, 1, sem="release", scope="gpu")


@triton.jit
def moe_decode_gemm1(
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
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    A_PRE: tl.constexpr = 0,
):
    """``inter[entry, n] = act(x[entry // TOP_K] @ w13[e].T + b13[e])`` (float32), grid
    ``(T * TOP_K, cdiv(INTER, BLOCK_N), SPLIT)``; entries whose expert is not kept are skipped.
    ``as_ptr``: the static activation scale (``A_QUANT`` 2); ``ws_ptr``: weight scales;
    ``A_PRE`` (1, 2: :func:`_decode_gemv`'s): ``x`` holds the fp8 codes of ``moe_quant_fp8`` (the
    router weight on the input applied), ``as_ptr`` their scales (rows of stride ``stride_asm``: one per token, or its groups);
    ``SPLIT > 1``: K in ``SPLIT`` chunks, partials ``part [SPLIT, T * TOP_K, 2 * INTER]``
    (split stride ``stride_ps``; row stride ``2 * INTER``), counters ``[T * TOP_K, tiles]``."""
    _decode_gemm1_tile(
        tl.program_id(0),
        tl.program_id(1),
        tl.program_id(2),
        tl.num_programs(1),
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
        count_ptr,
        TOP_K,
        GATED,
        ACTIVATION,
        HAS_BIAS,
        HAS_MAP,
        WEIGHT_ON_INPUT,
        A_QUANT,
        B_QUANT,
        GROUP_N,
        BLOCK_N,
        BLOCK_K,
        ROW_BLOCK,
        SPLIT,
        A_PRE,
        False,
    )


@triton.jit
def _decode_gemm2_tile(
    token,
    tile,
    part,
    tiles,
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
    ready_ptr,
    ready_target,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SLOT_GROUPS: tl.constexpr,
    K_SPLITS: tl.constexpr,
    A_PRE: tl.constexpr,
    CHAIN: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """:func:`moe_decode_gemm2`'s program ``(token, tile, part)`` (``tiles`` along N); ``CHAIN``: each
    slot first waits for ``ready[entry]`` to reach ``ready_target`` (GEMM 1's tiles of the entry);
    ``PREFETCH`` (NVIDIA): the slots' weight rows are prefetched toward L2 before any wait."""
    SPLIT: tl.constexpr = SLOT_GROUPS * K_SPLITS
    PER_GROUP: tl.constexpr = (TOP_K + SLOT_GROUPS - 1) // SLOT_GROUPS
    token = token.to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    j0 = 0
    chunk = 0
    k_lo, k_hi = 0, K
    if SPLIT > 1:
        j0 = (part // K_SPLITS) * PER_GROUP
        chunk = part % K_SPLITS
        if K_SPLITS > 1:
            k_lo, k_hi = _split_range(K, chunk, K_SPLITS, BLOCK_K)
    if PREFETCH:  # every slot's weight rows toward L2 first: they stream while GEMM 1 finishes
        for jj in tl.static_range(PER_GROUP):
            j = j0 + jj
            entry = token * TOP_K + j
            expert = _decode_expert(
                topk_ids_ptr,
                expert_map_ptr,
                tl.minimum(entry, token * TOP_K + TOP_K - 1),
                num_experts,
                HAS_MAP,
            )
            if (j < TOP_K) & (expert >= 0):
                rows = tl.minimum(offs_n, N - 1).to(tl.int64)
                _prefetch_rows(w_ptr + expert * stride_we + rows * stride_wn, k_lo, k_hi, B_QUANT == 4)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for jj in tl.static_range(PER_GROUP):
        j = j0 + jj
        entry = token * TOP_K + j
        expert = _decode_expert(
            topk_ids_ptr, expert_map_ptr, tl.minimum(entry, token * TOP_K + TOP_K - 1), num_experts, HAS_MAP
        )
        if (j < TOP_K) & (expert >= 0):
            if CHAIN:  # GEMM 1's tiles of this entry stored (acquire)
                _wait_ready(ready_ptr + entry, ready_target)
            a_row = inter_ptr + entry * stride_im
            as_row = as_ptr + entry * stride_asm
            a_scale = 1.0
            if A_QUANT == 1:
                if A_PRE:
                    a_scale = tl.load(as_row)
                else:
                    a_scale = _fp8_scale(_decode_row_amax(a_row, K, 1.0, ROW_BLOCK))
            elif A_QUANT == 2:
                a_scale = tl.load(as_ptr)
            w_rows = w_ptr + expert * stride_we + offs_n.to(tl.int64) * stride_wn
            if B_QUANT == 3:
                s_rows = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
            elif B_QUANT == 4:
                s_rows = ws_ptr + expert * stride_wse + offs_n.to(tl.int64) * stride_wsn
            else:
                s_rows = ws_ptr
            y, _y = _decode_gemv(
                a_row,
                w_rows,
                s_rows,
                w_rows,
                s_rows,
                n_mask,
                K,
                k_lo,
                k_hi,
                1.0,
                a_scale,
                as_row,
                False,
                A_QUANT,
                B_QUANT,
                BLOCK_N,
                BLOCK_K,
                A_PRE,
            )
            if A_QUANT == 1 or A_QUANT == 2:
                y = y * a_scale
            if B_QUANT == 1:
                y = y * tl.load(ws_ptr + expert * stride_wse + offs_n, mask=n_mask, other=0.0)
            elif B_QUANT == 2:
                y = y * tl.load(ws_ptr + expert * stride_wse)
            if HAS_BIAS:
                bias = tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if K_SPLITS > 1:  # once per slot: in its first K chunk
                    bias = tl.where(chunk == 0, bias, 0.0)
                y += bias
            if APPLY_WEIGHT:
                y = y * tl.load(topk_weights_ptr + entry).to(tl.float32)
            total += y
    out_ptrs = out_ptr + token * stride_om + offs_n
    if SPLIT > 1:
        p_row = part_ptr + token * N + offs_n
        tl.store(p_row + part * stride_ps, total, mask=n_mask)
        if _split_arrive(count_ptr + token * tiles + tile, SPLIT):
            total = _split_sum(p_row, stride_ps, n_mask, SPLIT)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def moe_decode_gemm2(
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
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SLOT_GROUPS: tl.constexpr,
    K_SPLITS: tl.constexpr,
    A_PRE: tl.constexpr = 0,
):
    """``out[t, n] = sum_j w[t, j] * (inter[t * TOP_K + j] @ w2[e_j].T + b2[e_j])`` over the kept
    slots ``j`` (deterministic order), grid ``(T, cdiv(N, BLOCK_N), SLOT_GROUPS * K_SPLITS)``; a
    token with no kept slot gets zeros. ``as_ptr``: the static scale of the intermediate
    (``A_QUANT`` 2). Program ``s`` takes the slots of group ``s // K_SPLITS`` (``cdiv(TOP_K,
    SLOT_GROUPS)`` consecutive ones) over K chunk ``s % K_SPLITS``; more than one program per tile:
    partials ``part [SLOT_GROUPS * K_SPLITS, T, N]`` (split stride ``stride_ps``), counters
    ``[T, tiles]``. ``A_PRE`` (1, 2: :func:`_decode_gemv`'s): ``inter`` holds the fp8 codes of
    ``moe_quant_fp8``, ``as_ptr`` their scales (rows of stride ``stride_asm``: one per entry, or
    its groups)."""
    _decode_gemm2_tile(
        tl.program_id(0),
        tl.program_id(1),
        tl.program_id(2),
        tl.num_programs(1),
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
        count_ptr,
        0,
        TOP_K,
        HAS_BIAS,
        HAS_MAP,
        APPLY_WEIGHT,
        A_QUANT,
        B_QUANT,
        GROUP_N,
        BLOCK_N,
        BLOCK_K,
        ROW_BLOCK,
        SLOT_GROUPS,
        K_SPLITS,
        A_PRE,
        False,
        False,
    )


@triton.jit
def moe_decode_chain(
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
    w_ptr2,
    b_ptr2,
    out_ptr,
    ws_ptr2,
    as_ptr2,
    part_ptr2,
    count_ptr2,
    N,
    stride_we2,
    stride_wn2,
    stride_be2,
    stride_om,
    stride_wse2,
    stride_wsn2,
    stride_ps2,
    stride_asm2,
    sync_ptr,
    ready_ptr,
    num_tokens,
    TILES1,
    TILES2,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    A_QUANT: tl.constexpr,
    B_QUANT: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    A_PRE: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    ROW_BLOCK2: tl.constexpr,
    SLOT_GROUPS: tl.constexpr,
    K_SPLITS: tl.constexpr,
    A_PRE2: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Both decode GEMMs in one launch of ``P1 + P2`` programs (1-D grid): the arguments of
    :func:`moe_decode_gemm1`, then those of :func:`moe_decode_gemm2` that differ (suffixed ``2``
    where the names collide; its intermediate, routing and ``K`` are GEMM 1's), GEMM 1's
    ``P1 = T * TOP_K * TILES1 * SPLIT`` programs and GEMM 2's ``P2 = T * TILES2 * SPLIT2``. Each program takes a ticket (an atomic counter at ``sync_ptr``): the first ``P1``
    tickets run GEMM 1's tiles (entry fastest, as that launch's grid), the rest GEMM 2's, whose
    slots wait for their entry's ``TILES1`` tiles (``ready [T * TOP_K]``). Tickets follow the
    order programs start in, so a waiting program only waits for programs that are running:
    no deadlock whatever order the hardware starts them in. The last program to finish (a
    second counter) resets both counters and ``ready`` to 0. Same arithmetic as the two launches
    (bit-equal results); neither GEMM pre-quantizes its input (``A_PRE`` 0)."""
    SPLIT2: tl.constexpr = SLOT_GROUPS * K_SPLITS
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    entries = num_tokens * TOP_K
    P1 = entries * TILES1 * SPLIT
    if ticket < P1:
        entry = ticket % entries
        tile = (ticket // entries) % TILES1
        chunk = ticket // (entries * TILES1)
        _decode_gemm1_tile(
            entry,
            tile,
            chunk,
            TILES1,
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
            ready_ptr,
            TOP_K,
            GATED,
            ACTIVATION,
            HAS_BIAS,
            HAS_MAP,
            WEIGHT_ON_INPUT,
            A_QUANT,
            B_QUANT,
            GROUP_N,
            BLOCK_N,
            BLOCK_K,
            ROW_BLOCK,
            SPLIT,
            A_PRE,
            True,
        )
    else:
        t2 = ticket - P1
        token = t2 % num_tokens
        tile2 = (t2 // num_tokens) % TILES2
        part = t2 // (num_tokens * TILES2)
        _decode_gemm2_tile(
            token,
            tile2,
            part,
            TILES2,
            inter_ptr,
            w_ptr2,
            b_ptr2,
            out_ptr,
            topk_ids_ptr,
            expert_map_ptr,
            topk_weights_ptr,
            ws_ptr2,
            as_ptr2,
            part_ptr2,
            count_ptr2,
            num_experts,
            INTER,
            N,
            stride_im,
            stride_we2,
            stride_wn2,
            stride_be2,
            stride_om,
            stride_wse2,
            stride_wsn2,
            stride_ps2,
            stride_asm2,
            ready_ptr,
            TILES1,
            TOP_K,
            HAS_BIAS,
            HAS_MAP,
            APPLY_WEIGHT,
            A_QUANT,
            B_QUANT,
            GROUP_N,
            BLOCK_N2,
            BLOCK_K2,
            ROW_BLOCK2,
            SLOT_GROUPS,
            K_SPLITS,
            A_PRE2,
            True,
            PREFETCH,
        )
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if done == P1 + num_tokens * TILES2 * SPLIT2 - 1:  # the last program: every other one is done
        offs = tl.arange(0, 1024)
        for e0 in range(0, entries, 1024):
            tl.store(ready_ptr + e0 + offs, 0, mask=e0 + offs < entries)
        tl.store(sync_ptr + offs, 0, mask=offs < 2)


@triton.jit
def _wait_ready(ptr, target):
    """Spin until the int32 at ``ptr`` reaches ``target`` (acquire: the stores released before each
    increment are then visible to this program)."""
    n = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    while n < target:
        n = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _prefetch_rows(row_ptrs, k_lo, k_hi, MX: tl.constexpr):
    """Prefetch elements ``[k_lo, k_hi)`` of each weight row (``row_ptrs [BLOCK_N]``, valid rows; ``MX``:
    packed mxfp4 bytes, two elements per byte) into L2, one PTX ``prefetch.global.L2`` per 128-byte line
    (NVIDIA only)."""
    BYTES: tl.constexpr = row_ptrs.dtype.element_ty.primitive_bitwidth // 8
    lo = k_lo * BYTES
    hi = k_hi * BYTES
    if MX:
        lo = k_lo // 2
        hi = k_hi // 2
    rows = row_ptrs.to(tl.pointer_type(tl.int8))
    offs = tl.arange(0, 8) * 128
    for b0 in range(lo, hi, 8 * 128):
        ptrs = rows[:, None] + tl.minimum(b0 + offs, hi - 1)[None, :]
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )
