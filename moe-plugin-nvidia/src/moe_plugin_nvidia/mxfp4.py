"""mxfp4 weights (W4A16) in the layout of FlashInfer's SM90 mixed-input MoE GEMM.

FlashInfer's SM90 path (``cutlass_fused_moe(..., use_w4_group_scaling=True)``
with ``uint8`` weights and bf16 activations) multiplies bf16 activations by
e2m1 weights with one e8m0 scale per 32 along K. Its tiles need both GEMM
dimensions in multiples of 128 (the scale layout folds 64 rows x 128 K), so
``prepare`` pads H and I up to 128 with zero codes (scale byte 127 = 1.0,
zero biases): the padded rows and columns contribute exact zeros, and the
input is padded to ``Hp`` per call (:func:`pad_input`).

Prepared tensors (``E`` local experts, ``Hp``/``Ip`` the padded sizes):

==================  ===========================  ====================================
``fc1``             ``[E, 2Ip, Hp/2]`` uint8     **up rows first, then gate**, packed e2m1
``fc1_scale``       ``[E, 2Ip, Hp/32]`` uint8    e8m0, rows as ``fc1``
``fc2``             ``[E, Hp, Ip/2]`` uint8      packed e2m1
``fc2_scale``       ``[E, Hp, Ip/32]`` uint8     e8m0
``fc1_bias``        ``[E, 2Ip]`` bf16            ``b13`` padded, halves swapped (bias only)
``fc2_bias``        ``[E, Hp]`` bf16             ``b2`` padded (bias only)
==================  ===========================  ====================================

On a CUDA device the four weight tensors are then interleaved for the GEMM's
loads with FlashInfer's own ``interleave_moe_weights_for_sm90_mixed_gemm`` /
``interleave_moe_scales_for_sm90_mixed_gemm`` (scales viewed as int32, as
the kernel reads them) and ``meta["interleaved"]`` is set; elsewhere (CPU
tests) the padded layout above is kept and :func:`to_canonical` inverts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core import ExpertWeights, MoESpec

__all__ = ["PAD", "pad_input", "padded_sizes", "prepare_tensors", "to_canonical"]

#: H and I are padded to multiples of this.
PAD = 128
#: e8m0 byte of 2**0 (scale of the zero padding).
_UNIT_SCALE = 127


def _up(n: int) -> int:
    return -(-n // PAD) * PAD


def padded_sizes(spec: MoESpec) -> tuple[int, int]:
    """``(Hp, Ip)``: hidden and intermediate size rounded up to :data:`PAD`."""
    return _up(spec.hidden_size), _up(spec.intermediate_size)


def _pad2(t: torch.Tensor, rows: int, cols: int, value: int) -> torch.Tensor:
    """Pad the last two dims of ``t`` to ``[rows, cols]`` with ``value``."""
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]), value=value)


def _fc1(t: torch.Tensor, i: int, ip: int, cols: int, value: int) -> torch.Tensor:
    """Canonical ``[E, 2I, K]`` [gate; up] -> ``[E, 2Ip, cols]`` [up; gate], each half padded."""
    gate, up = t[:, :i], t[:, i:]
    return torch.cat([_pad2(up, ip, cols, value), _pad2(gate, ip, cols, value)], dim=1).contiguous()


def prepare_tensors(spec: MoESpec, weights: ExpertWeights, interleave: bool) -> dict[str, torch.Tensor]:
    """Canonical mxfp4 ``weights`` -> the prepared tensors of the module docstring."""
    h, i = spec.hidden_size, spec.intermediate_size
    hp, ip = padded_sizes(spec)
    t = {
        "fc1": _fc1(weights.w13, i, ip, hp // 2, 0),
        "fc1_scale": _fc1(weights.w13_scale, i, ip, hp // 32, _UNIT_SCALE),
        "fc2": _pad2(weights.w2, hp, ip // 2, 0).contiguous(),
        "fc2_scale": _pad2(weights.w2_scale, hp, ip // 32, _UNIT_SCALE).contiguous(),
    }
    if weights.b13 is not None:
        t["fc1_bias"] = _fc1(weights.b13.to(spec.dtype).unsqueeze(-1), i, ip, 1, 0).squeeze(-1)
    if weights.b2 is not None:
        t["fc2_bias"] = F.pad(weights.b2.to(spec.dtype), (0, hp - h)).contiguous()
    if interleave:
        from flashinfer.fused_moe import (
            interleave_moe_scales_for_sm90_mixed_gemm,
            interleave_moe_weights_for_sm90_mixed_gemm,
        )

        for name in ("fc1", "fc2"):
            t[name] = interleave_moe_weights_for_sm90_mixed_gemm(t[name], "fp4")
            t[f"{name}_scale"] = interleave_moe_scales_for_sm90_mixed_gemm(t[f"{name}_scale"], 32).view(
                torch.int32
            )
    return t


def to_canonical(spec: MoESpec, t: dict[str, torch.Tensor]) -> ExpertWeights:
    """The inverse of :func:`prepare_tensors` without interleaving: canonical mxfp4 ``ExpertWeights``."""
    h, i = spec.hidden_size, spec.intermediate_size
    ip = padded_sizes(spec)[1]

    def w13(x: torch.Tensor, cols: int) -> torch.Tensor:
        return torch.cat([x[:, ip : ip + i, :cols], x[:, :i, :cols]], dim=1)

    b13 = t.get("fc1_bias")
    b2 = t.get("fc2_bias")
    return ExpertWeights(
        w13=w13(t["fc1"], h // 2),
        w13_scale=w13(t["fc1_scale"], h // 32),
        w2=t["fc2"][:, :h, : i // 2],
        w2_scale=t["fc2_scale"][:, :h, : i // 32],
        b13=None if b13 is None else w13(b13.unsqueeze(-1), 1).squeeze(-1),
        b2=None if b2 is None else b2[:, :h],
    )


def pad_input(spec: MoESpec, x: torch.Tensor) -> torch.Tensor:
    """``x [T, H]`` -> ``[T, Hp]`` with zero columns (``x`` itself when ``H`` is a multiple of 128)."""
    hp = padded_sizes(spec)[0]
    return x if hp == x.shape[-1] else F.pad(x, (0, hp - x.shape[-1]))
