"""Kernel launches: ``kernel[grid](*args, **kwargs)``, with a cached fast path around Triton's launcher.

``JITFunction.run`` spends tens of microseconds of host time per launch (binding
and specialising every argument, building the cache key, looking up knobs)
before it calls the compiled kernel's launcher. :func:`run_launch` does the
first launch of each *specialization* through ``JITFunction.run`` (which
compiles and returns the ``CompiledKernel``), remembers that kernel, and
launches later calls with the same specialization through its launcher
directly, exactly as ``JITFunction.run`` does (Triton 3.3 to 3.9)::

    kernel.run(grid0, grid1, grid2, stream, kernel.function, kernel.packed_metadata,
               launch_metadata, launch_enter_hook, launch_exit_hook, *all_params)

The specialization key is a superset of what Triton specialises on, so a cached
kernel is never launched with arguments it was not compiled for: the kernel,
the constexprs and options (every keyword argument), the device, Triton's debug,
instrumentation and (ROCm) buffer-ops knobs, and per runtime argument: tensors by dtype, 16-byte
alignment of the data pointer and (ROCm: buffer ops) whether the storage is
within 2 GB (``untyped_storage().size() <= 2**31 - 1``, as Triton's HIP backend decides);
integers by value 1, divisibility by 16 and 32/64-bit range; bools
by value; floats; ``None``. Anything else (an unknown argument type, launch
hooks or pre-run hooks installed, a Triton without these internals, the
interpreter, a launcher that rejects the arguments with a ``TypeError``, after which
the kernel always launches normally) takes the normal launch.

``MOE_PORTABLE_FAST_LAUNCH``: ``1`` (the default) takes the fast path; ``check``
launches normally and asserts that Triton chose the kernel the cache holds (tests,
GPU checks); ``0`` always launches normally. Measured on the H200 (triton 3.6,
``tools/profile_apply.py``): host time per eager ``moe_apply`` 20-35% lower (e.g.
379 -> 283 us on the 4-launch path, 139 -> 104 us on the 2-launch decode path), and
every cached launch of the run checked equal to Triton's own choice.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_core.env import getenv

__all__ = ["FAST_LAUNCH_ENV", "clear_cache", "fast_launch_stats", "run_launch", "specialization_key"]

FAST_LAUNCH_ENV = "MOE_PORTABLE_FAST_LAUNCH"
_I32 = 2**31
_I64 = 2**63
#: specialization key -> (launcher, function, packed_metadata, constexpr tail, kernel)
_CACHE: dict[tuple[Any, ...], tuple[Any, ...]] = {}
#: kernels (JITFunction) whose internals are not what the fast path expects
_SLOW: set[int] = set()
_STATS = {"fast": 0, "slow": 0, "compiled": 0, "checked": 0}
_RUNTIME: list[Any] = []  # [JITFunction, knobs, get_device, get_stream, hip] once resolved


def clear_cache() -> None:
    """Forget every cached kernel (they launch normally once more)."""
    _CACHE.clear()
    _SLOW.clear()


def fast_launch_stats() -> dict[str, int]:
    """Launch counts since import: ``fast`` (cached launcher), ``slow`` (``JITFunction.run``),
    ``compiled`` (first launches of a specialization, cached), ``checked``."""
    return dict(_STATS)


def _runtime() -> list[Any] | None:
    if not _RUNTIME:
        try:
            from triton import knobs
            from triton.runtime import driver
            from triton.runtime.jit import JITFunction

            active = driver.active
            _RUNTIME.extend(
                [
                    JITFunction,
                    knobs,
                    active.get_current_device,
                    active.get_current_stream,
                    bool(torch.version.hip),
                ]
            )
        except Exception:  # no usable GPU driver, or a Triton without these modules
            _RUNTIME.append(None)
    return _RUNTIME if _RUNTIME[0] is not None else None


def _hook_active(hook: Any) -> bool:
    """A launch hook that would need ``launch_metadata`` (Triton <= 3.6: a callable or None;
    later: a ``HookChain``, active when it holds calls)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def specialization_key(args: tuple[Any, ...], hip: bool = False) -> tuple[Any, ...] | None:
    """Per runtime argument, what Triton may specialise on (module docstring); ``None`` when an
    argument is of a type the fast path does not know."""
    key: list[Any] = []
    append = key.append
    for a in args:
        cls = a.__class__
        if cls is int:
            append((a == 1, a % 16 == 0, 0 if -_I32 <= a < _I32 else (2 if a >= _I64 else 1)))  # i32/i64/u64
        elif cls is bool:
            append(a)
        elif cls is float:
            append(float)
        elif a is None:
            append(None)
        elif isinstance(a, torch.Tensor):
            if hip:
                append((a.dtype, a.data_ptr() % 16 == 0, a.untyped_storage().nbytes() < _I32))
            else:
                append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(key)


def run_launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``kernel[grid](*args, **kwargs)``, through the cached launcher when it is safe (module docstring)."""
    mode = getenv(FAST_LAUNCH_ENV, "1")
    rt = _runtime() if mode != "0" else None
    if rt is None or not isinstance(kernel, rt[0]) or id(kernel) in _SLOW:
        _STATS["slow"] += 1
        kernel[grid](*args, **kwargs)
        return
    _, knobs, get_device, get_stream, hip = rt
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (
        _hook_active(enter)
        or _hook_active(leave)
        or getattr(kernel, "pre_run_hooks", None)
        or getattr(runtime, "add_stages_inspection_hook", None) is not None
    ):
        _STATS["slow"] += 1
        kernel[grid](*args, **kwargs)
        return
    arg_key = specialization_key(args, hip)
    if arg_key is None:
        _STATS["slow"] += 1
        kernel[grid](*args, **kwargs)
        return
    device = get_device()
    key = (
        id(kernel),
        device,
        runtime.debug,
        getattr(knobs.compilation, "instrumentation_mode", None),
        getattr(getattr(knobs, "amd", None), "use_buffer_ops", None) if hip else None,  # "S" or not
        tuple(kwargs.items()),
        arg_key,
    )
    try:
        entry = _CACHE.get(key)
    except TypeError:  # an unhashable keyword argument: not a launch the cache can key
        _STATS["slow"] += 1
        kernel[grid](*args, **kwargs)
        return
    if entry is None or mode == "check":
        compiled = kernel[grid](*args, **kwargs)
        if entry is not None:
            _STATS["checked"] += 1
            assert compiled is entry[4], f"fast launch: Triton chose another kernel for {kernel} than cached"
            return
        _STATS["compiled"] += 1
        _remember(kernel, key, compiled, args, kwargs)
        return
    launcher, function, packed, tail, _ = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        launcher(grid[0], g1, g2, get_stream(device), function, packed, None, enter, leave, *args, *tail)
    except TypeError:  # the launcher parses its arguments before launching: this Triton differs
        _SLOW.add(id(kernel))
        _STATS["slow"] += 1
        kernel[grid](*args, **kwargs)
        return
    _STATS["fast"] += 1


def _remember(kernel: Any, key: tuple[Any, ...], compiled: Any, args: tuple[Any, ...], kwargs: dict) -> None:
    """Cache ``compiled`` for ``key`` when its internals are the expected ones, else mark the kernel slow.

    Every parameter must be given: the runtime ones positionally first, then the constexprs
    by keyword (the launcher takes all parameters in order, as ``JITFunction.run`` passes them).
    """
    try:
        names = list(kernel.arg_names)
        params = kernel.params
        tail_names = names[len(args) :]
        ok = (
            all(not p.is_constexpr for p in params[: len(args)])
            and all(p.is_constexpr for p in params[len(args) :])
            and all(n in kwargs for n in tail_names)
        )
        launcher = compiled.run  # initialises the handles (already done by the launch)
        function, packed = compiled.function, compiled.packed_metadata
    except Exception:
        ok = False
    if not ok or compiled is None or function is None:
        _SLOW.add(id(kernel))
        return
    _CACHE[key] = (launcher, function, packed, tuple(kwargs[n] for n in tail_names), compiled)
