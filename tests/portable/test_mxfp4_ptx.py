"""The mxfp4 layout helpers of moe_plugin_portable: ``experts.swizzle_mxfp4`` and the PTX program
``MXFP4_TO_BF16_PTX`` (the GEMMs' dequantization on NVIDIA), run here by a small emulator of the
instructions it uses, against ``moe_core.quant``'s dequantization of every byte and a range of
scales. The GPU tests run the same program in the kernels."""

from __future__ import annotations

import re

import pytest
import torch

from moe_core import quant as mq
from moe_plugin_portable import experts

from .ptx_emulator import bf16x2, run_ptx, word


def test_emulator_knows_every_instruction():
    from moe_plugin_portable._details import _fused_moe

    ops = {m.group(1) for m in re.finditer(r"^\s*([a-z][\w.]*)\s", _fused_moe.MXFP4_TO_BF16_PTX.value, re.M)}
    assert ops <= {"mov.b32", "and.b32", "shr.b32", "mul.lo.u32", "prmt.b32", "fma.rn.bf16x2"}


@pytest.mark.parametrize("scale_byte", [34, 100, 127, 128, 140, 160])
def test_ptx_dequantizes_every_byte(scale_byte):
    """Every byte, with the factor the kernel passes (``2**(s - 1 - MX_PTX_SHIFT)``): the weights
    times ``2**-MX_PTX_SHIFT`` exactly (the GEMMs' epilogues multiply it back)."""
    from moe_plugin_portable._details import _fused_moe

    program, shift = _fused_moe.MXFP4_TO_BF16_PTX.value, _fused_moe.MX_PTX_SHIFT.value
    scale = float(mq.e8m0_to_float(torch.tensor([scale_byte], dtype=torch.uint8))[0])
    factor = word(torch.tensor([2.0 ** (scale_byte - 1 - shift)] * 2))
    codes = torch.arange(256, dtype=torch.int32)
    expect = mq.e2m1_to_float(mq.unpack_e2m1(codes.to(torch.uint8)[:, None])) * scale * 2.0**-shift
    got = torch.empty(256, 2)
    for j in range(0, 256, 4):
        packed = sum(int(codes[j + i]) << 8 * i for i in range(4))
        pairs = run_ptx(program, [0, 0, 0, 0, packed, factor, factor, factor, factor])[:4]
        for i, pair in enumerate(pairs):
            got[j + i] = bf16x2(pair)  # (low nibble, high nibble) of byte j + i
    assert torch.equal(got, expect)  # exact, signs of zero included
    assert torch.equal(torch.signbit(got), torch.signbit(expect))


def test_factors_per_byte():
    """Each byte gets its own factor pair: ``$5 .. $8`` for bytes 0 .. 3."""
    from moe_plugin_portable._details import _fused_moe

    program = _fused_moe.MXFP4_TO_BF16_PTX.value
    packed = 0xA2A2A2A2  # every byte: low nibble code 2 (1.0), high nibble code 10 (-1.0)
    factors = [word(torch.tensor([2.0**e] * 2)) for e in (126, 127, 100, 0)]
    pairs = run_ptx(program, [0, 0, 0, 0, packed, *factors])[:4]
    got = [bf16x2(p).tolist() for p in pairs]
    assert got == [[1.0, -1.0], [2.0, -2.0], [2.0**-26, -(2.0**-26)], [2.0**-126, -(2.0**-126)]]


def test_swizzle_is_a_group_transpose_and_its_own_inverse():
    w = torch.randint(0, 256, (3, 5, 48), dtype=torch.uint8)
    s = experts.swizzle_mxfp4(w)
    assert s.is_contiguous() and s.shape == w.shape
    for q in range(4):
        for i in range(4):
            assert torch.equal(s[..., 4 * q + i :: 16], w[..., 4 * i + q :: 16])
    assert torch.equal(experts.swizzle_mxfp4(s), w)
    with pytest.raises(ValueError, match="16-byte groups"):
        experts.swizzle_mxfp4(w[..., :40])
