"""Pure-torch, tile-level emulation of ``amd.gluon.mxfp4``'s Gluon kernels (what CPU CI executes).

Nothing here is a second implementation of the MoE: each function is the kernel's program
body, run for every program of the kernel's grid, with the kernel's index arithmetic
(:func:`b_offsets`, :func:`s_offsets`, :func:`slot_rows` are the formulas of
``_details/_gluon_moe.py``'s ``_b_offsets``, ``_s_offsets`` and the combine store), on the real
prepared tensors (the shuffled bytes of :func:`moe_plugin_amd.gluon_layout.prepare_weights`) and
the real sorted buffers (this plugin's Triton ``moe_sorting``, under the interpreter on a CPU),
with the kernel's epilogue order and roundings:

- operands: W4A16 ``bf16(x)`` times the weight tile upcast to bf16 (``e2m1 * 2**(s - 127)``,
  exact); W4A8 ``fp8(clamp(x * (1 / a13_scale), +-448))`` times the e2m1 tile with its e8m0
  scales; float32 accumulation over ``BLOCK_K`` steps (the summation order inside one MFMA is
  the hardware's; here it is torch's, a float32 rounding difference; ``STAGES`` 2 changes when
  a K step's tiles are loaded, not the order of the K steps);
- GEMM 1 epilogue: ``* a13_scale`` (W4A8) -> ``+ b13`` -> silu / swiglu_oai -> bf16, or
  ``fp8(clamp(act * (1 / a2_scale)))`` (W4A8), stored at the sorted row;
- GEMM 2 epilogue: ``* a2_scale`` (W4A8) -> ``+ b2`` -> ``* sorted_weights[row]`` -> float32
  slot row ``t * k + s`` for rows with ``t < T``;
- slot sum: slots ``0..k-1`` in order, skipping non-local and out-of-range ids.

What it cannot show: register-level layouts (which lane holds which element: the compiler's),
the hardware's exact float32 summation order, and anything about speed. What it does show:
that the shuffle, the offsets, the sorted-block schedule and grid bound, the remap
(``sorted_expert_ids``), the masking, the scatter and the epilogues compute the MoE.
"""

from __future__ import annotations

import torch

from moe_core import MoESpec
from moe_core.quant import E2M1_VALUES
from moe_core.sorting import SortedTokens

from .gluon_configs import TileConfig, select_config
from .gluon_layout import pad_to
from .gluon_moe import active_blocks, sort_tokens

__all__ = ["b_offsets", "emulate_moe", "gemm1_program", "gemm2_program", "s_offsets", "slot_rows", "slot_sum"]

_FP8_MAX = 448.0


def b_offsets(n0: int, k0: int, k_pad: int, block_n: int, block_k: int) -> torch.Tensor:
    """``_b_offsets``: byte offsets ``[BLOCK_K/2, BLOCK_N]`` of the shuffled weight tile."""
    kb = (k0 // 2 + torch.arange(block_k // 2))[:, None]
    n = (n0 + torch.arange(block_n))[None, :]
    chunk = (n // 16) * (k_pad // 128) + kb // 64
    return chunk * 1024 + ((kb % 64) // 16) * 256 + (n % 16) * 16 + kb % 16


def s_offsets(n0: int, k0: int, n_rows: int, block_n: int, block_k: int) -> torch.Tensor:
    """``_s_offsets``: offsets ``[BLOCK_N, BLOCK_K/32]`` of the e8m0 tile in the K-major scales."""
    n = (n0 + torch.arange(block_n))[:, None]
    g = (k0 // 32 + torch.arange(block_k // 32))[None, :]
    return g * n_rows + n


def slot_rows(packed: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine store's destination: ``(token, token * k + slot)`` of packed sorted ids."""
    token = packed & 0xFFFFFF
    slot = (packed >> 24) & 0xFF
    return token, token * top_k + slot


def _weight_tile(
    w: torch.Tensor, s: torch.Tensor, n0: int, k0: int, n_rows: int, k_pad: int, bn: int, bk: int
):
    """The dequantized tile ``[BLOCK_K, BLOCK_N]`` (float32) read exactly as the kernel reads it."""
    packed = w[b_offsets(n0, k0, k_pad, bn, bk)].long()  # [BK/2, BN]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(bk, bn)  # low nibble = even K
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = torch.exp2(s[s_offsets(n0, k0, n_rows, bn, bk)].float() - 127.0)  # [BN, BK/32]
    return values * scale.T.repeat_interleave(32, dim=0)


def _quant_fp8(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / scale.float()
    return (v * inv).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)


def _activation(gate: torch.Tensor, up: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    if spec.activation == "swiglu_oai":
        gate = torch.minimum(gate, torch.tensor(spec.swiglu_limit))
        up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return gate / (1.0 + torch.exp(-spec.swiglu_alpha * gate)) * (up + 1.0)
    return gate / (1.0 + torch.exp(-gate)) * up


def gemm1_program(
    pid_n: int, pid_m: int, spec: MoESpec, x: torch.Tensor, t: dict[str, torch.Tensor],
    st: SortedTokens, y: torch.Tensor, tiles: TileConfig,
) -> None:  # fmt: skip
    """One program of ``moe_gemm1``."""
    T, H = x.shape
    BM, BN = tiles.block_m, tiles.gemm1.block_n
    IP, HP = y.shape[1], pad_to(H)
    BK = tiles.block_k(HP)
    fp8 = spec.quant.activation == "fp8_per_tensor"
    if pid_m * BM >= int(st.num_valid_ids[0]):
        return
    expert = int(st.sorted_expert_ids[pid_m])
    rows = pid_m * BM + torch.arange(BM)
    token = st.sorted_ids[rows].long() & 0xFFFFFF
    row_ok = token < T
    w = t["w13"][expert]
    s = t["w13_scale"][expert].reshape(-1)
    n0 = pid_n * BN
    gate = torch.zeros(BM, BN)
    up = torch.zeros(BM, BN)
    for k0 in range(0, HP, BK):
        kk = k0 + torch.arange(BK)
        xt = torch.zeros(BM, BK, dtype=x.dtype)
        ok = row_ok[:, None] & (kk < H)[None, :]
        xt[ok] = x[token.clamp(max=T - 1)[:, None].expand(BM, BK)[ok], kk[None, :].expand(BM, BK)[ok]]
        a = _quant_fp8(xt.float(), t["a13_scale"]).float() if fp8 else xt.to(torch.bfloat16).float()
        gate += a @ _weight_tile(w, s, n0, k0, 2 * IP, HP, BN, BK)
        up += a @ _weight_tile(w, s, IP + n0, k0, 2 * IP, HP, BN, BK)
    if fp8:
        gate, up = gate * t["a13_scale"], up * t["a13_scale"]
    cols = n0 + torch.arange(BN)
    if spec.has_bias:
        gate = gate + t["b13"][expert, cols][None, :]
        up = up + t["b13"][expert, IP + cols][None, :]
    act = _activation(gate, up, spec)
    y[rows[:, None], cols[None, :]] = _quant_fp8(act, t["a2_scale"]) if fp8 else act.to(y.dtype)


def gemm2_program(
    pid_n: int, pid_m: int, spec: MoESpec, T: int, k: int, t: dict[str, torch.Tensor],
    st: SortedTokens, y: torch.Tensor, slots: torch.Tensor, tiles: TileConfig,
) -> None:  # fmt: skip
    """One program of ``moe_gemm2``."""
    H = slots.shape[1]
    BM, BN = tiles.block_m, tiles.gemm2.block_n
    HP, IP = pad_to(H), y.shape[1]
    BK = tiles.block_k(IP)
    fp8 = spec.quant.activation == "fp8_per_tensor"
    if pid_m * BM >= int(st.num_valid_ids[0]):
        return
    expert = int(st.sorted_expert_ids[pid_m])
    rows = pid_m * BM + torch.arange(BM)
    w = t["w2"][expert]
    s = t["w2_scale"][expert].reshape(-1)
    n0 = pid_n * BN
    acc = torch.zeros(BM, BN)
    for k0 in range(0, IP, BK):
        a = y[rows][:, k0 : k0 + BK].float()
        acc += a @ _weight_tile(w, s, n0, k0, HP, IP, BN, BK)
    if fp8:
        acc = acc * t["a2_scale"]
    cols = n0 + torch.arange(BN)
    if spec.has_bias:
        acc = acc + t["b2"][expert, cols][None, :]
    acc = acc * st.sorted_weights[rows][:, None]
    token, dest = slot_rows(st.sorted_ids[rows].long(), k)
    keep = (token < T)[:, None] & (cols < H)[None, :]
    slots[dest[:, None].expand(BM, BN)[keep], cols[None, :].expand(BM, BN)[keep]] = acc[keep]


def slot_sum(
    slots: torch.Tensor, topk_ids: torch.Tensor, local_map: torch.Tensor, E: int, out: torch.Tensor
) -> None:
    """``moe_slot_sum`` (all programs): slots in order, masked slots skipped."""
    T, k = topk_ids.shape
    total = torch.zeros(T, slots.shape[1])
    for s in range(k):
        e = topk_ids[:, s].long()
        in_range = (e >= 0) & (e < E)
        keep = in_range & (local_map.long()[torch.where(in_range, e, 0)] >= 0)
        total += torch.where(keep[:, None], slots[torch.arange(T) * k + s], 0.0)
    out.copy_(total.to(out.dtype))


def emulate_moe(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    tiles: TileConfig | None = None,
    sorted_tokens: SortedTokens | None = None,
) -> torch.Tensor:
    """``apply``'s launches, emulated program by program -> ``out [T, H]`` (bf16).

    ``sorted_tokens`` defaults to this plugin's sorter (what ``apply`` calls); tests pass a
    corrupted one to show the check catches a wrong remap.
    """
    T, k = topk_ids.shape
    H = spec.hidden_size
    out = torch.empty(T, H, dtype=spec.dtype)
    if T == 0:
        return out
    tiles = tiles or select_config(T)
    st = sorted_tokens or sort_tokens(spec, topk_ids, topk_weights, tiles, tensors)
    IP, HP = pad_to(spec.intermediate_size), pad_to(H)
    fp8 = spec.quant.activation == "fp8_per_tensor"
    blocks = active_blocks(T * k, tensors["w13"].shape[0], tiles.block_m)
    y = torch.full((st.sorted_ids.shape[0], IP), float("nan")).to(
        torch.float8_e4m3fn if fp8 else torch.bfloat16
    )
    slots = torch.full((T * k, H), float("nan"))  # poisoned: a slot never written shows up
    for pid_m in range(blocks):
        for pid_n in range(IP // tiles.gemm1.block_n):
            gemm1_program(pid_n, pid_m, spec, hidden_states, tensors, st, y, tiles)
    for pid_m in range(blocks):
        for pid_n in range(HP // tiles.gemm2.block_n):
            gemm2_program(pid_n, pid_m, spec, T, k, tensors, st, y, slots, tiles)
    slot_sum(slots, topk_ids, tensors["local_map"], spec.num_experts, out)
    return out
