"""Triton kernels of the fused MoE on expert-sorted tokens.

Rows are the entries of ``align_block_size`` (vLLM contract): block ``b`` of
``BLOCK_M`` sorted positions belongs to local expert ``expert_ids[b]``; the
entry at a position is a flat index ``t * top_k + slot`` (``>= num_entries``
for padding).

- ``moe_gemm1``: ``h = x[token] @ w13[e].T (+ b13[e])`` for the gate and up
  halves at once (two accumulators), the activation in the epilogue, stored
  at the sorted position: ``inter [num_padded, I]`` in the activation dtype.
- ``moe_gemm2``: ``y = inter @ w2[e].T (+ b2[e])``, times the router weight,
  stored at row ``entry`` of ``[T * top_k, H]`` (or at row ``token`` of the
  output directly when ``top_k == 1`` and every expert is local).
- ``moe_combine``: ``out[t] = sum_j y[t * top_k + j]`` over the slots whose
  expert is local, in slot order (deterministic: no atomics).

The weight tile load is the one place a quantized scheme changes: it is
isolated in ``_load_b`` so fp8/fp4 variants add their dequantization there.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "swiglu_oai": 2, "relu2": 3}


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
def _load_b(ptrs, k_remaining, n_mask, offs_k, EVEN_K: tl.constexpr):
    """A ``[BLOCK_K, BLOCK_N]`` weight tile (the hook for quantized weights)."""
    if EVEN_K:
        return tl.load(ptrs, mask=n_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=(offs_k[:, None] < k_remaining) & n_mask[None, :], other=0.0)


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
    num_entries,
    K,
    INTER,
    stride_xm,
    stride_we,
    stride_wn,
    stride_be,
    stride_im,
    alpha,
    limit,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
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

    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        acc_g = _dot(a, _load_b(g_ptrs, K - k0, n_mask, offs_k, EVEN_K), acc_g, UPCAST)
        if GATED:
            acc_u = _dot(a, _load_b(u_ptrs, K - k0, n_mask, offs_k, EVEN_K), acc_u, UPCAST)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    if WEIGHT_ON_INPUT:
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
    tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


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
    num_entries,
    K,
    N,
    stride_im,
    stride_we,
    stride_wn,
    stride_be,
    stride_ym,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_WEIGHT: tl.constexpr,
    ROW_IS_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
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

    a_ptrs = inter_ptr + offs_m[:, None].to(tl.int64) * stride_im + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        acc = _dot(a, _load_b(b_ptrs, K - k0, n_mask, offs_k, EVEN_K), acc, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

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
