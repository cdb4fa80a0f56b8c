"""A decode step fused into one weight-streaming launch: a probe, not in the package.

    python tools/fused_decode.py     # CPU check under TRITON_INTERPRET=1 (tiny shapes, vs the reference)

``tools/decode_stages.py`` times it (``fused``) against the plugin's decode step and the read-only
kernels. Canonical weights (``moe_core`` layout: ``w13 [E, 2I, H]`` gate rows then up rows,
``w2 [E, H, I]``; bf16/fp16, or mxfp4 W4A16: packed e2m1 ``[E, N, K/2]``, e8m0 ``[E, N, K/32]``),
``silu`` or ``swiglu_oai``, optional biases; no expert map.

Launch 1, program ``(slot, s)``: the ``BI`` intermediate rows ``s * BI ...`` of the slot's expert,
``h = act(x @ W13[rows].T + b13)`` in float32 registers, then their share of GEMM 2,
``part[slot, s] = router_weight * W2[:, rows] @ h`` (float32 ``[H]``). Every weight byte is read
once, by one program, in one launch; GEMM 2 needs no intermediate in memory. Launch 2 sums a
token's ``k * (I / BI)`` partials in a fixed order (deterministic, no atomics), adds the
weighted ``b2`` and writes ``out``. The price: the partials (``T * k * I / BI * H`` floats)
written and read once, and GEMM 2's rows read in ``BI``-element segments (mxfp4: ``BI / 2``
bytes; below 32 a sector is fetched for less than its size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_plugin_portable._details._fused_moe import _e2m1_f16

#: (BI, BK, BH, num_warps) searched by :func:`best_call`
SHAPES = ((16, 256, 64, 4), (32, 128, 64, 4), (32, 256, 64, 4), (64, 128, 64, 8), (64, 256, 128, 8))


@triton.jit
def _mx_rows_dot(w_ptr, s_ptr, rows, rmask, kb, kbmask, row_bytes, row_scales, xe, xo):
    """sum over the bytes ``kb`` of rows ``rows``: (low nibble * xe + high nibble * xo) * scale."""
    mask = rmask[:, None] & kbmask[None, :]
    b = tl.load(w_ptr + rows[:, None] * row_bytes + kb[None, :], mask=mask, other=0).to(tl.int32)
    sc = tl.load(s_ptr + rows[:, None] * row_scales + kb[None, :] // 16, mask=mask, other=0).to(tl.int32)
    # the plugin's exact e2m1 decode (times 2**-14, folded back into the e8m0 scale's exponent)
    scale = ((sc + 14) << 23).to(tl.float32, bitcast=True)
    return tl.sum((_e2m1_f16(b) * xe[None, :] + _e2m1_f16(b >> 4) * xo[None, :]) * scale, axis=1)


@triton.jit
def _fused_part(
    x_ptr, w13_ptr, s13_ptr, b13_ptr, w2_ptr, s2_ptr, ids_ptr, tw_ptr, part_ptr,
    H, INTER, K_SLOTS, alpha, limit,
    MX: tl.constexpr, SWIGLU_OAI: tl.constexpr, HAS_BIAS: tl.constexpr,
    BI: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(0)
    s = tl.program_id(1)
    n_s = tl.num_programs(1)
    t = slot // K_SLOTS
    e = tl.load(ids_ptr + slot).to(tl.int64)
    rows = s * BI + tl.arange(0, BI)
    rmask = rows < INTER
    acc_g = tl.zeros([BI], dtype=tl.float32)
    acc_u = tl.zeros([BI], dtype=tl.float32)
    x_row = x_ptr + t.to(tl.int64) * H
    if MX:
        w13 = w13_ptr + e * (2 * INTER) * (H // 2)
        s13 = s13_ptr + e * (2 * INTER) * (H // 32)
        for k0 in range(0, H // 2, BK // 2):
            kb = k0 + tl.arange(0, BK // 2)
            kbmask = kb < H // 2
            xe = tl.load(x_row + 2 * kb, mask=kbmask, other=0.0).to(tl.float32)
            xo = tl.load(x_row + 2 * kb + 1, mask=kbmask, other=0.0).to(tl.float32)
            acc_g += _mx_rows_dot(w13, s13, rows, rmask, kb, kbmask, H // 2, H // 32, xe, xo)
            acc_u += _mx_rows_dot(w13, s13, rows + INTER, rmask, kb, kbmask, H // 2, H // 32, xe, xo)
    else:
        w13 = w13_ptr + e * (2 * INTER) * H
        for k0 in range(0, H, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < H
            x = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & kmask[None, :]
            wg = tl.load(w13 + rows[:, None] * H + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            wu = tl.load(w13 + (rows + INTER)[:, None] * H + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_g += tl.sum(wg * x[None, :], axis=1)
            acc_u += tl.sum(wu * x[None, :], axis=1)
    if HAS_BIAS:
        acc_g += tl.load(b13_ptr + e * 2 * INTER + rows, mask=rmask, other=0.0).to(tl.float32)
        acc_u += tl.load(b13_ptr + e * 2 * INTER + INTER + rows, mask=rmask, other=0.0).to(tl.float32)
    if SWIGLU_OAI:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = g * tl.sigmoid(alpha * g) * (u + 1.0)
    else:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    h = tl.where(rmask, h, 0.0)
    wt = tl.load(tw_ptr + slot).to(tl.float32)
    part = part_ptr + (slot.to(tl.int64) * n_s + s) * H
    if MX:
        he, ho = tl.split(tl.reshape(h, [BI // 2, 2]))
        jb = s * (BI // 2) + tl.arange(0, BI // 2)
        jmask = jb < INTER // 2
        w2 = w2_ptr + e * H * (INTER // 2)
        s2 = s2_ptr + e * H * (INTER // 32)
        for h0 in range(0, H, BH):
            hh = h0 + tl.arange(0, BH)
            hmask = hh < H
            o = _mx_rows_dot(w2, s2, hh, hmask, jb, jmask, INTER // 2, INTER // 32, he, ho)
            tl.store(part + hh, o * wt, mask=hmask)
    else:
        w2 = w2_ptr + e * H * INTER
        for h0 in range(0, H, BH):
            hh = h0 + tl.arange(0, BH)
            hmask = hh < H
            w = tl.load(
                w2 + hh[:, None] * INTER + rows[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0
            )
            o = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
            tl.store(part + hh, o * wt, mask=hmask)


@triton.jit
def _fused_sum(
    part_ptr, b2_ptr, ids_ptr, tw_ptr, out_ptr, H, K_SLOTS, S,
    HAS_BIAS: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = hh < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for j in range(K_SLOTS):
        slot = t * K_SLOTS + j
        for s in range(S):
            acc += tl.load(part_ptr + (slot.to(tl.int64) * S + s) * H + hh, mask=hmask, other=0.0)
        if HAS_BIAS:
            e = tl.load(ids_ptr + slot).to(tl.int64)
            wt = tl.load(tw_ptr + slot).to(tl.float32)
            acc += wt * tl.load(b2_ptr + e * H + hh, mask=hmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * H + hh, acc.to(out_ptr.dtype.element_ty), mask=hmask)


def fused_call(spec, weights, x, topk_w, topk_ids, out, shape=SHAPES[0]):
    """The two launches for these tensors as one callable (``weights``: canonical ExpertWeights)."""
    bi, bk, bh, warps = shape
    T, H = x.shape
    k, inter = spec.top_k, spec.intermediate_size
    mx = spec.quant.name == "mxfp4"
    if (spec.quant.is_quantized and not mx) or spec.activation not in ("silu", "swiglu_oai"):
        raise ValueError(
            f"the fused probe takes bf16/fp16 or mxfp4 W4A16 with silu or swiglu_oai, got {spec.describe()}"
        )
    if mx and bi < 32:
        raise ValueError(
            "mxfp4 slices of fewer than 32 rows: GEMM 2's row segments under 16 bytes, not probed"
        )
    n_s = triton.cdiv(inter, bi)
    part = torch.empty(T * k * n_s * H, dtype=torch.float32, device=x.device)
    ids = topk_ids.to(torch.int32).contiguous()
    tw = topk_w.to(torch.float32).contiguous()
    has_bias = weights.b13 is not None
    dummy = part
    s13 = weights.w13_scale if mx else dummy
    s2 = weights.w2_scale if mx else dummy
    b13 = weights.b13 if has_bias else dummy
    b2 = weights.b2 if has_bias else dummy
    alpha = float(spec.swiglu_alpha or 0.0)
    limit = float(spec.swiglu_limit or 0.0)
    sum_bh = 256

    def call():
        _fused_part[(T * k, n_s)](
            x, weights.w13, s13, b13, weights.w2, s2, ids, tw, part, H, inter, k, alpha, limit,
            MX=mx, SWIGLU_OAI=spec.activation == "swiglu_oai", HAS_BIAS=has_bias,
            BI=bi, BK=bk, BH=bh, num_warps=warps,
        )  # fmt: skip
        _fused_sum[(T, triton.cdiv(H, sum_bh))](
            part, b2, ids, tw, out, H, k, n_s, HAS_BIAS=has_bias, BH=sum_bh, num_warps=4
        )

    return call


def check(device: str = "cpu") -> list[tuple[str, float]]:
    """Tiny shapes against the float64 reference (TRITON_INTERPRET=1 on the CPU): ``[(case, rel err)]``."""
    from moe_core import MoESpec
    from moe_core.reference import fused_experts_reference
    from moe_core.testing import random_expert_weights, relative_error, tolerance

    results = []
    cases = {
        "bf16-silu": {},
        "bf16-swiglu_oai-bias": {"activation": "swiglu_oai", "has_bias": True},
        "mxfp4-silu": {"quant": "mxfp4", "hidden_size": 128, "intermediate_size": 96},
        "mxfp4-swiglu_oai-bias": {"quant": "mxfp4", "hidden_size": 128, "intermediate_size": 64, "activation": "swiglu_oai", "has_bias": True},
    }  # fmt: skip
    for name, kw in cases.items():
        spec = MoESpec(**{"num_experts": 6, "top_k": 3, "hidden_size": 72, "intermediate_size": 40, **kw})
        weights = random_expert_weights(spec, device=device, seed=3)
        for T in (1, 3):
            gen = torch.Generator(device=device).manual_seed(T)
            x = torch.randn(T, spec.hidden_size, generator=gen, device=device).to(spec.dtype)
            w = torch.rand(T, spec.top_k, generator=gen, device=device)
            ids = torch.rand(T, spec.num_experts, generator=gen, device=device).argsort(1)[:, : spec.top_k]
            want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
            for shape in SHAPES[1:3]:
                out = torch.full_like(x, float("nan"))
                fused_call(spec, weights, x, w, ids, out, shape)()
                err = float(relative_error(out, want))
                assert err <= tolerance(spec), f"{name} T={T} {shape}: relative error {err:.2e}"
                results.append((f"{name} T={T} {shape}", err))
    return results


if __name__ == "__main__":
    for case, err in check("cuda" if torch.cuda.is_available() else "cpu"):
        print(f"{case}: relative error {err:.2e}")
