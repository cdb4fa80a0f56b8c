"""A small emulator of the PTX instructions ``_fused_moe.MXFP4_TO_BF16_PTX`` uses (32-bit registers,
bf16x2 arithmetic through torch), shared by the tests that run that program on a CPU."""

from __future__ import annotations

import torch

__all__ = ["bf16x2", "run_ptx", "word"]

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


def bf16x2(word: int) -> torch.Tensor:
    halves = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    return halves.view(torch.bfloat16).float()


def word(values: torch.Tensor) -> int:
    bits = values.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def _fmabf16x2(a: int, b: int, c: int) -> int:
    return word(bf16x2(a) * bf16x2(b) + bf16x2(c))


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
            r = _fmabf16x2(*x)
        else:
            raise NotImplementedError(op)
        regs[d] = r & M32
    return [regs[f"${i}"] for i in range(len(operands))]
