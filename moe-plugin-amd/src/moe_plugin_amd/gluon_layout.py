"""The prepared-weight layout of ``amd.gluon.mxfp4`` (pad + MFMA-B shuffle), and its inverse.

Canonical mxfp4 weights (``moe_core.quant``): ``w13 [E, 2I, H/2]`` uint8 (two e2m1 codes per
byte, element ``2j`` in the low nibble), ``w13_scale [E, 2I, H/32]`` e8m0, ``w2 [E, H, I/2]``,
``w2_scale [E, H, I/32]``; ``b13 [E, 2I]``, ``b2 [E, H]``.

Prepared (``prepare_weights``), with ``H_PAD``/``I_PAD`` = ``H``/``I`` rounded up to
:data:`PAD` (128) and ``E`` the local experts *in the order of moe_sorting's local numbering*
(the rank of the global id among the local experts; see ``local_order``):

``w13 [E, 2*I_PAD * H_PAD/2]`` uint8
    the rows ``[gate (I rows), zeros, up (I rows), zeros]`` (gate rows ``0..I_PAD``, up rows
    ``I_PAD..2*I_PAD``), K zero-padded to ``H_PAD``, then *shuffled*: a GEMM weight ``[N, K/2]``
    becomes chunks of 16 rows x 64 bytes (128 K values), chunk ``(nb, kb)`` at
    ``(nb * K/128 + kb) * 1024``; inside a chunk byte ``(n, b)`` (``n < 16``, ``b < 64``) sits
    at ``(b // 16) * 256 + n * 16 + b % 16``. That is the CDNA4 16x16x128 MFMA B-operand
    order: lane ``l`` (column ``l % 16``, K group ``l // 16``) loads its 16 bytes (32 e2m1) in
    one ``dwordx4`` and a wave reads 1 KB contiguous. The kernel's ``_b_offsets`` is this
    formula.
``w13_scale [E, H_PAD/32, 2*I_PAD]`` uint8
    e8m0 transposed to K-major (``[K/32, N]``: the 16 lanes of a K group read 16 adjacent
    bytes); padding 127 (1.0: the padded codes are 0, so padded weights are 0).
``w2 [E, H_PAD * I_PAD/2]``, ``w2_scale [E, I_PAD/32, H_PAD]``: the same for ``[H, I]``.
``b13 [E, 2*I_PAD]``, ``b2 [E, H_PAD]`` float32 (zeros where absent or padded).
``a13_scale``, ``a2_scale`` float32 ``[1]`` (W4A8; 1.0 otherwise).
``local_map [E_global]`` int32: global id -> prepared expert index, -1 off this rank;
``expert_mask [E_global]`` bool: ``local_map >= 0`` (moe_sorting's EP mask).

Zero-padded gate/up rows give ``act(0 + 0) = 0`` for silu and swiglu_oai, so the padded
intermediate columns are 0 and the zero-padded K of ``w2`` adds nothing.
:func:`unshuffle` / :func:`canonical_weights` invert all of it (the round-trip tests).
"""

from __future__ import annotations

import torch

from moe_core import ExpertWeights, MoEInputError, MoESpec
from moe_core.quant import is_high_precision, quantize_weights

__all__ = [
    "PAD",
    "canonical_weights",
    "local_order",
    "pad_to",
    "prepare_weights",
    "shuffle",
    "shuffle_scale",
    "unshuffle",
    "unshuffle_scale",
]

#: H and I are padded to a multiple of this (the shuffle chunk's 128 K values; BLOCK_N | PAD)
PAD = 128
_UNIT_SCALE = 127  # e8m0 1.0


def pad_to(n: int, multiple: int = PAD) -> int:
    return -(-n // multiple) * multiple


def shuffle(w: torch.Tensor) -> torch.Tensor:
    """Packed ``[E, N, K/2]`` (``N % 16 == 0``, ``K % 128 == 0``) -> the MFMA-B shuffle, flat ``[E, N*K/2]``."""
    E, N, KB = w.shape
    if N % 16 or KB % 64:
        raise MoEInputError(f"shuffle needs N % 16 == 0 and K % 128 == 0, got N={N} K={2 * KB}")
    chunks = w.reshape(E, N // 16, 16, KB // 64, 4, 16)  # e, nb, n, kb, kq, byte
    return chunks.permute(0, 1, 3, 4, 2, 5).reshape(E, N * KB).contiguous()  # e, nb, kb, kq, n, byte


def unshuffle(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`shuffle`: flat ``[E, N*K/2]`` -> ``[E, N, K/2]``."""
    E = flat.shape[0]
    chunks = flat.reshape(E, n // 16, k // 128, 4, 16, 16)  # e, nb, kb, kq, n, byte
    return chunks.permute(0, 1, 4, 2, 3, 5).reshape(E, n, k // 2).contiguous()


def shuffle_scale(s: torch.Tensor) -> torch.Tensor:
    """e8m0 ``[E, N, K/32]`` -> K-major ``[E, K/32, N]``."""
    return s.transpose(1, 2).contiguous()


def unshuffle_scale(s: torch.Tensor) -> torch.Tensor:
    return s.transpose(1, 2).contiguous()


def _pad_rows_cols(t: torch.Tensor, rows: int, cols: int, fill: int | float) -> torch.Tensor:
    out = torch.full((t.shape[0], rows, cols), fill, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1], : t.shape[2]] = t
    return out


def local_order(spec: MoESpec) -> list[int]:
    """Canonical (local) expert index of each prepared expert, in moe_sorting's local numbering.

    moe_sorting numbers the local experts by ascending *global* id (rank in the mask); the
    canonical weights are indexed by ``spec``'s expert map. Without expert parallelism: identity.
    """
    g2l = spec.global_to_local()
    return [g2l[g] for g in range(spec.num_experts) if g2l[g] >= 0]


def _local_map(spec: MoESpec, device: torch.device) -> torch.Tensor:
    g2l = spec.global_to_local()
    out, rank = [], 0
    for g in range(spec.num_experts):
        out.append(rank if g2l[g] >= 0 else -1)
        rank += g2l[g] >= 0
    return torch.tensor(out, dtype=torch.int32, device=device)


def _scalar_scale(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    return t.detach().float().reshape(1).to(device).contiguous()


def prepare_weights(spec: MoESpec, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """Canonical (mxfp4, or high precision to quantize) ``weights`` -> the prepared tensors above."""
    if is_high_precision(weights.w13):
        weights = quantize_weights(weights, spec.quant)
    H, inter = spec.hidden_size, spec.intermediate_size
    HP, IP = pad_to(H), pad_to(inter)
    order = torch.tensor(local_order(spec), dtype=torch.long, device=weights.w13.device)
    w13, s13 = weights.w13[order], weights.w13_scale[order]
    w2, s2 = weights.w2[order], weights.w2_scale[order]
    gate = _pad_rows_cols(w13[:, :inter], IP, HP // 2, 0)
    up = _pad_rows_cols(w13[:, inter:], IP, HP // 2, 0)
    sg = _pad_rows_cols(s13[:, :inter], IP, HP // 32, _UNIT_SCALE)
    su = _pad_rows_cols(s13[:, inter:], IP, HP // 32, _UNIT_SCALE)
    E = order.numel()
    dev = weights.w13.device
    local_map = _local_map(spec, dev)
    b13 = torch.zeros(E, 2 * IP, dtype=torch.float32, device=dev)
    b2 = torch.zeros(E, HP, dtype=torch.float32, device=dev)
    if weights.b13 is not None:
        b = weights.b13[order].float()
        b13[:, :inter], b13[:, IP : IP + inter] = b[:, :inter], b[:, inter:]
    if weights.b2 is not None:
        b2[:, :H] = weights.b2[order].float()
    return {
        "w13": shuffle(torch.cat([gate, up], dim=1)),
        "w13_scale": shuffle_scale(torch.cat([sg, su], dim=1)),
        "w2": shuffle(_pad_rows_cols(w2, HP, IP // 2, 0)),
        "w2_scale": shuffle_scale(_pad_rows_cols(s2, HP, IP // 32, _UNIT_SCALE)),
        "b13": b13,
        "b2": b2,
        "a13_scale": _scalar_scale(weights.a13_scale, dev),
        "a2_scale": _scalar_scale(weights.a2_scale, dev),
        "local_map": local_map,
        "expert_mask": local_map >= 0,
    }


def canonical_weights(spec: MoESpec, prepared: dict[str, torch.Tensor]) -> ExpertWeights:
    """Inverse of :func:`prepare_weights` (mxfp4 canonical weights, biases float32, canonical expert order)."""
    H, inter = spec.hidden_size, spec.intermediate_size
    HP, IP = pad_to(H), pad_to(inter)
    w13 = unshuffle(prepared["w13"], 2 * IP, HP)
    s13 = unshuffle_scale(prepared["w13_scale"])
    w2 = unshuffle(prepared["w2"], HP, IP)[:, :H, : inter // 2]
    s2 = unshuffle_scale(prepared["w2_scale"])[:, :H, : inter // 32]
    rows = torch.cat([torch.arange(inter), IP + torch.arange(inter)])
    inverse = torch.argsort(torch.tensor(local_order(spec)))
    b13, b2 = prepared["b13"], prepared["b2"]
    return ExpertWeights(
        w13=w13[:, rows, : H // 2][inverse].contiguous(),
        w13_scale=s13[:, rows, : H // 32][inverse].contiguous(),
        w2=w2[inverse].contiguous(),
        w2_scale=s2[inverse].contiguous(),
        b13=b13[:, rows.to(b13.device)][inverse].contiguous(),
        b2=b2[:, :H][inverse].contiguous(),
    )
