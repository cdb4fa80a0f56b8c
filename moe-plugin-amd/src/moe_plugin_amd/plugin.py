"""Hook implementations of moe-plugin-amd (entry point ``amd`` in ``moe_core.plugins``).

Registration imports neither Triton nor aiter: each module's
``kernel_entries()`` only describes its kernels. Triton is imported when a
kernel first runs; aiter only by the aiter fallbacks, on a ROCm device.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from moe_core import hookimpl

from . import __version__
from ._common import interpreting

# Modules with a kernel_entries() function.
_MODULES: tuple[str, ...] = ("sorting", "gluon_moe", "aiter_kernels")


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """Register every kernel of this plugin: the Triton sorter, the Gluon mxfp4 MoE, the aiter/CK fallbacks."""
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for entry in module.kernel_entries():
            register(entry)


@hookimpl
def register_commands(subparsers: Any) -> None:
    """``moe amd profile``: offline compile profile of this plugin's Triton kernels."""
    from .profile import add_command

    add_command(subparsers)


@hookimpl
def environment_report() -> dict[str, Any]:
    from .aiter_kernels import aiter_version

    triton = importlib.util.find_spec("triton") is not None
    return {
        "version": __version__,
        "kernels": sum(len(importlib.import_module(f"{__package__}.{m}").kernel_entries()) for m in _MODULES),
        "triton": triton,
        "interpreter": interpreting(),
        "aiter": aiter_version(),
    }
