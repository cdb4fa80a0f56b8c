"""Hook implementations of moe-plugin-portable (entry point ``portable`` in ``moe_core.plugins``).

Registration imports no Triton: each module's ``kernel_entries()`` only
describes its kernels; Triton is imported when a kernel first runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from moe_core import hookimpl

from . import __version__
from ._common import interpreting

# Modules with a kernel_entries() function, added as their kernels land.
_MODULES: tuple[str, ...] = ("experts",)


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """Register every kernel of this plugin (routing, sorting, experts)."""
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for entry in module.kernel_entries():
            register(entry)


@hookimpl
def environment_report() -> dict[str, Any]:
    spec = importlib.util.find_spec("triton")
    version = None
    if spec is not None:
        from importlib.metadata import version as dist_version

        version = dist_version("triton")
    return {"version": __version__, "triton": version, "interpreter": interpreting()}
