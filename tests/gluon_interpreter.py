"""Gluon kernels run by Triton's interpreter on a CPU (``TRITON_INTERPRET=1``), for tests.

Gluon has no interpreter of its own. :func:`interpret` rebuilds every ``@gluon.jit`` function of a
module with ``gl`` (and ``mma_v2``, the CTA barrier) bound to :class:`_GluonOnTriton`, whose
operations are ``triton.language``'s with the layouts dropped, and wraps them in Triton's
``InterpretedFunction``: the same source, arguments, grid and constexprs, one program at a time.

What this checks: the kernels' index arithmetic, masks, control flow (early exits, split-K
arrivals: programs run in order, so the last to arrive is the last in the grid), scales, epilogues
and stores, on the real prepared tensors. What it cannot: layouts (which thread holds which
element) and the hardware's float32 summation order inside an MMA (here: numpy's).

Hardware ops, by value: NVIDIA ``mma_v2`` (float32 ``acc + a @ b``); AMD CDNA4 ``mfma``,
``mfma_scaled`` (e4m3 x e2m1 with e8m0 scales) and ``scaled_upcast`` (e2m1 to bf16), OCP
semantics; inline PTX through :mod:`.portable.ptx_emulator` where a program is registered in
:data:`PTX_PROGRAMS`, elementwise (each output element from the input elements of the same index,
which is what Triton's ``pack`` grouping gives). Anything else raises ``NotImplementedError``.
Loads and stores take their masks as booleans (the interpreter computes ``block & scalar`` of
int1 in int32). Float down-conversions round as on the GPUs once :mod:`.interpreter_fixes` is
installed (``tests/conftest.py`` does it under the interpreter).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction, TensorHandle

from .portable.ptx_emulator import run_ptx

__all__ = ["PTX_PROGRAMS", "create_inline_asm", "interpret"]


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


#: inline PTX the interpreter can run: program text -> ``fn(*input arrays) -> int32 output array``
PTX_PROGRAMS: dict[str, Callable[..., np.ndarray]] = {}


def _ptx_program(asm: Any) -> Callable[..., np.ndarray]:
    if not PTX_PROGRAMS:
        from moe_plugin_portable._details import _fused_moe

        program = _fused_moe.MXFP4_TO_BF16_PTX.value
        PTX_PROGRAMS[program] = functools.partial(_mx_dequant, program)
    fn = PTX_PROGRAMS.get(getattr(asm, "value", asm))
    if fn is None:
        raise NotImplementedError(f"no emulation of this inline PTX:\n{asm}")
    return fn


class _AsmCall:
    def __init__(self, results: list[TensorHandle]) -> None:
        self.results = results

    def get_result(self, index: int) -> TensorHandle:
        return self.results[index]


def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
    """A ``triton.runtime.interpreter.InterpreterBuilder.create_inline_asm`` (which raises for any
    inline assembly) that runs the programs of :data:`PTX_PROGRAMS`: patch it in to run Triton
    kernels' ``tl.inline_asm_elementwise`` under the interpreter."""
    out = _ptx_program(asm)(*[v.data for v in values])
    return _AsmCall([TensorHandle(np.asarray(out, dtype=np.int32), tl.int32)])


def _mma_v2(a, b, acc, input_precision=None):
    """``acc + a @ b`` in float32 (the operands' values exactly: bf16, fp16 and fp8 are float32)."""
    return _matmul_acc(a.to(tl.float32).handle.data, b.to(tl.float32).handle.data, acc)


def _matmul_acc(a: np.ndarray, b: np.ndarray, acc: tl.tensor) -> tl.tensor:
    data = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float32) + acc.handle.data
    return _tensor(data.astype(np.float32), acc, tl.float32)


_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _e2m1_along(packed: np.ndarray, axis: int) -> np.ndarray:
    """float32 values of e2m1 pairs packed along ``axis`` (element ``2i``: the low nibble of byte ``i``)."""
    lo, hi = _E2M1[packed & 15], _E2M1[packed >> 4]
    both = np.stack([lo, hi], axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def _e8m0(s: np.ndarray) -> np.ndarray:
    return np.ldexp(np.float32(1.0), s.astype(np.int32) - 127).astype(np.float32)


def _bool_mask(mask: Any) -> Any:
    """``mask`` with boolean data (the interpreter computes ``block & scalar`` of int1 in int32)."""
    if isinstance(mask, tl.tensor) and mask.handle.data.dtype != np.bool_:
        return mask != 0
    return mask


class _CDNA4:
    """``gl.amd.cdna4``: the scaled MFMA and the scaled fp4 upcast, by value (OCP mx semantics)."""

    get_mfma_scale_layout = staticmethod(lambda *args, **kwargs: _Layout())
    get_scaled_upcast_fp4_scale_layout = staticmethod(lambda *args, **kwargs: _Layout())

    @staticmethod
    def mfma(a, b, acc):
        return _mma_v2(a, b, acc)

    @staticmethod
    def scaled_upcast(b, s, dtype, axis):
        """bf16 ``[2 * b.shape[axis], ...]``: e2m1 pairs of ``b`` times ``2**(s - 127)`` (one e8m0
        per 32 elements along ``axis``)."""
        if dtype != tl.bfloat16 or axis != 0:
            raise NotImplementedError("scaled_upcast emulated for bf16 along axis 0")
        v = _e2m1_along(b.handle.data, 0) * np.repeat(_e8m0(s.handle.data), 32, axis=0)
        bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: e2m1 * 2**e
        return _tensor(bits, b, tl.bfloat16)

    @staticmethod
    def mfma_scaled(a, a_scale, a_format, b, b_scale, b_format, acc):
        """``acc + a @ (e2m1(b) * 2**(b_scale - 127))`` (``b`` packed along K, ``b_scale [N, K/32]``)."""
        if a_scale is not None or a_format != "e4m3" or b_format != "e2m1":
            raise NotImplementedError("mfma_scaled emulated for unscaled e4m3 x scaled e2m1")
        w = _e2m1_along(b.handle.data, 0) * np.repeat(_e8m0(b_scale.handle.data).T, 32, axis=0)
        return _matmul_acc(a.to(tl.float32).handle.data, w, acc)


class _AMD:
    AMDMFMALayout = _Layout
    cdna4 = _CDNA4


class _GluonOnTriton(types.SimpleNamespace):
    """The ``gl`` namespace under the interpreter: ``triton.language`` without layouts."""

    def __init__(self, num_warps: list[int]) -> None:
        super().__init__()
        self._num_warps = num_warps

    amd = _AMD

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
    def load(pointer, mask=None, other=None, **kwargs):
        return tl.load(pointer, mask=_bool_mask(mask), other=other, **kwargs)

    @staticmethod
    def store(pointer, value, mask=None, **kwargs):
        return tl.store(pointer, value, mask=_bool_mask(mask), **kwargs)

    @staticmethod
    def convert_layout(value, layout, assert_trivial=False):
        return value

    @staticmethod
    def barrier(*args, **kwargs):  # programs run one after another
        return None

    thread_barrier = barrier

    @staticmethod
    def inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
        fn = _ptx_program(asm)
        args = tl.broadcast(*args) if len(args) > 1 else args
        out = fn(*[a.handle.data for a in args])
        return _tensor(np.asarray(out, dtype=np.int32), args[0], dtype)


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


def _rebind(fn: Callable, scope: dict[str, Any]) -> Callable:
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)


@functools.cache
def interpret(module: types.ModuleType) -> types.SimpleNamespace:
    """Every ``@gluon.jit`` function of ``module`` as an interpreted kernel (``ns.name[grid](...)``),
    by the name it has there. Needs ``TRITON_INTERPRET=1`` before Triton was imported."""
    from triton.experimental.gluon._runtime import GluonJITFunction
    from triton.runtime import jit

    ConstexprFunction = getattr(jit, "ConstexprFunction", ())

    num_warps = [4]
    gl = _GluonOnTriton(num_warps)
    scope = dict(vars(module))
    scope.update(gl=gl, tl=tl, mma_v2=_mma_v2, _barrier=gl.barrier)
    kernels = {}
    for name, value in vars(module).items():
        if isinstance(value, GluonJITFunction):
            kernels[name] = scope[name] = _Kernel(_rebind(value.fn, scope), num_warps)
        elif isinstance(value, ConstexprFunction):  # (layout helpers: plain Python on the shim)
            scope[name] = _rebind(value.fn, scope)
    return types.SimpleNamespace(**kernels)
