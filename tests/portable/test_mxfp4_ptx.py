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

M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = src[sel & 7]
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _bf16x2(word: int) -> torch.Tensor:
    halves = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return halves.view(torch.bfloat16).float()


def _word(values: torch.Tensor) -> int:
    bits = values.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    return _word(_bf16x2(a) * _bf16x2(b) + _bf16x2(c))


def run_ptx(program: str, operands: list[int]) -> list[int]:
    """Execute ``program`` (the subset of PTX it uses) with ``$i`` = ``operands[i]`` (inputs set,
    outputs read back); every register 32 bits."""
    regs = {f"${i}": v for i, v in enumerate(operands)}

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for line in program.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *args = [t.strip() for t in rest.split(",")]
        x = [val(t) for t in args]
        if op == "mov.b32":
            r = x[0]
        elif op == "and.b32":
            r = x[0] & x[1]
        elif op == "shr.b32":
            r = x[0] >> x[1]
        elif op == "mul.lo.u32":
            r = x[0] * x[1]
        elif op == "prmt.b32":
            r = _prmt(*x)
        elif op == "fma.rn.bf16x2":
            r = _fma_bf16x2(*x)
        else:
            raise NotImplementedError(op)
        regs[d] = r & M32
    return [regs[f"${i}"] for i in range(len(operands))]


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
    factor = _word(torch.tensor([2.0 ** (scale_byte - 1 - shift)] * 2))
    codes = torch.arange(256, dtype=torch.int32)
    expect = mq.e2m1_to_float(mq.unpack_e2m1(codes.to(torch.uint8)[:, None])) * scale * 2.0**-shift
    got = torch.empty(256, 2)
    for j in range(0, 256, 4):
        word = sum(int(codes[j + i]) << 8 * i for i in range(4))
        pairs = run_ptx(program, [0, 0, 0, 0, word, factor, factor, factor, factor])[:4]
        for i, pair in enumerate(pairs):
            got[j + i] = _bf16x2(pair)  # (low nibble, high nibble) of byte j + i
    assert torch.equal(got, expect)  # exact, signs of zero included
    assert torch.equal(torch.signbit(got), torch.signbit(expect))


def test_factors_per_byte():
    """Each byte gets its own factor pair: ``$5 .. $8`` for bytes 0 .. 3."""
    from moe_plugin_portable._details import _fused_moe

    program = _fused_moe.MXFP4_TO_BF16_PTX.value
    word = 0xA2A2A2A2  # every byte: low nibble code 2 (1.0), high nibble code 10 (-1.0)
    factors = [_word(torch.tensor([2.0**e] * 2)) for e in (126, 127, 100, 0)]
    pairs = run_ptx(program, [0, 0, 0, 0, word, *factors])[:4]
    got = [_bf16x2(p).tolist() for p in pairs]
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
