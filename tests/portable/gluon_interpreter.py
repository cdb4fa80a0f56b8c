"""Gluon kernels run by Triton's interpreter on a CPU (``TRITON_INTERPRET=1``), for tests.

Gluon has no interpreter of its own. :func:`interpret` rebuilds every ``@gluon.jit`` function of a
module with ``gl`` (and ``mma_v2``, the CTA barrier) bound to :class:`_GluonOnTriton`, whose
operations are ``triton.language``'s with the layouts dropped, and wraps them in Triton's
``InterpretedFunction``: the same source, arguments, grid and constexprs, one program at a time.

What this checks: the kernels' index arithmetic, masks, control flow (early exits, split-K
arrivals: programs run in order, so the last to arrive is the last in the grid), scales, epilogues
and stores, on the real prepared tensors. What it cannot: layouts (which thread holds which
element) and the hardware's float32 summation order inside an MMA (here: numpy's). Inline PTX runs
through :mod:`.ptx_emulator` where a program is registered in :data:`PTX_PROGRAMS`, elementwise with
Triton's ``pack`` grouping (each output element from the input elements of the same index).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction, TensorHandle

from .ptx_emulator import run_ptx

__all__ = ["PTX_PROGRAMS", "interpret"]


class _Layout:
    """Any Gluon layout: the interpreter runs a program as whole tensors (no threads)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def _tensor(data: np.ndarray, like: tl.tensor, dtype: tl.dtype) -> tl.tensor:
    shape = list(data.shape)
    return tl.tensor(TensorHandle(data, dtype), tl.block_type(dtype, shape) if shape else dtype)


@functools.cache
def _mx_pairs(program: str, exponent: int) -> np.ndarray:
    """``int32 [256]``: the output register of ``program`` (``MXFP4_TO_BF16_PTX``) for each byte,
    with the factor pair of bf16 exponent bits ``exponent`` (the kernels' ``(e << 7) * 0x10001``)."""
    factor = (exponent << 7) * 0x10001
    out = np.empty(256, dtype=np.int64)
    for j in range(0, 256, 4):
        packed = j | (j + 1) << 8 | (j + 2) << 16 | (j + 3) << 24
        out[j : j + 4] = run_ptx(program, [0, 0, 0, 0, packed, factor, factor, factor, factor])[:4]
    return out.astype(np.uint32).view(np.int32)


def _mx_dequant(program: str, b: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Elementwise ``MXFP4_TO_BF16_PTX``: byte ``b`` with its factor (one pair per byte)."""
    exps = (factor.astype(np.int64) >> 7) & 0xFF
    if not np.array_equal(factor.astype(np.int64) & 0xFFFFFFFF, (exps << 7) * 0x10001):
        raise NotImplementedError("MXFP4_TO_BF16_PTX emulated for factor pairs (e << 7) * 0x10001 only")
    out = np.empty(b.shape, dtype=np.int32)
    for e in np.unique(exps):
        sel = exps == e
        out[sel] = _mx_pairs(program, int(e))[b[sel].astype(np.int64)]
    return out


#: inline PTX the interpreter can run: program text -> ``fn(*input arrays) -> output array``
PTX_PROGRAMS: dict[str, Callable[..., np.ndarray]] = {}


def _register_ptx() -> None:
    from moe_plugin_portable._details import _fused_moe

    program = _fused_moe.MXFP4_TO_BF16_PTX.value
    PTX_PROGRAMS[program] = functools.partial(_mx_dequant, program)


class _GluonOnTriton(types.SimpleNamespace):
    """The ``gl`` namespace under the interpreter: ``triton.language`` without layouts."""

    def __init__(self, num_warps: list[int]) -> None:
        super().__init__()
        self._num_warps = num_warps

    def __getattr__(self, name: str) -> Any:  # dtypes, constexpr, where, minimum, load, ...
        if name.endswith("Layout"):
            return _Layout
        return getattr(tl, name)

    def num_warps(self) -> tl.constexpr:
        return tl.constexpr(self._num_warps[0])

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def full(shape, value, dtype, layout=None):
        return tl.full(shape, value, dtype)

    @staticmethod
    def convert_layout(value, layout, assert_trivial=False):
        return value

    @staticmethod
    def barrier(*args, **kwargs):  # programs run one after another
        return None

    thread_barrier = barrier

    @staticmethod
    def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        if not PTX_PROGRAMS:
            _register_ptx()
        fn = PTX_PROGRAMS.get(getattr(asm, "value", asm))
        if fn is None:
            raise NotImplementedError(f"no emulation of this inline PTX:\n{asm}")
        args = tl.broadcast(*args) if len(args) > 1 else args
        out = fn(*[a.handle.data for a in args])
        return _tensor(np.asarray(out, dtype=np.int32), args[0], dtype)


def _mma_v2(a, b, acc, input_precision=None):
    """``acc + a @ b`` in float32 (the operands' values exactly: bf16, fp16 and fp8 are float32)."""
    a32, b32 = a.to(tl.float32), b.to(tl.float32)
    data = np.matmul(a32.handle.data, b32.handle.data).astype(np.float32) + acc.handle.data
    return _tensor(data.astype(np.float32), acc, tl.float32)


class _Kernel(InterpretedFunction):
    """An interpreted Gluon kernel: ``num_warps`` of each launch is what ``gl.num_warps()`` reads."""

    def __init__(self, fn: Callable, num_warps: list[int]) -> None:
        super().__init__(fn)
        self._num_warps = num_warps

    def rewrite(self) -> Callable:
        fn = super().rewrite()
        # string annotations ("gl.constexpr"): the interpreter's constexprs are those reading "constexpr"
        fn.__annotations__ = {
            k: "constexpr" if str(v).endswith("constexpr") else v for k, v in fn.__annotations__.items()
        }
        return fn

    def run(self, *args, grid, warmup, **kwargs):
        self._num_warps[0] = kwargs.get("num_warps", 4)
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)


@functools.cache
def interpret(module: types.ModuleType) -> types.SimpleNamespace:
    """Every ``@gluon.jit`` function of ``module`` as an interpreted kernel (``ns.name[grid](...)``),
    by the name it has there. Needs ``TRITON_INTERPRET=1`` before Triton was imported."""
    from triton.experimental.gluon._runtime import GluonJITFunction

    num_warps = [4]
    gl = _GluonOnTriton(num_warps)
    scope = dict(vars(module))
    scope.update(gl=gl, tl=tl, mma_v2=_mma_v2, _barrier=gl.barrier)
    kernels = {}
    for name, value in vars(module).items():
        if isinstance(value, GluonJITFunction):
            fn = value.fn
            rebuilt = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
            kernels[name] = scope[name] = _Kernel(rebuilt, num_warps)
    return types.SimpleNamespace(**kernels)
