"""Hook implementations of moe-plugin-portable (entry point ``portable`` in ``moe_core.plugins``).

Kernels are registered here as they land; the distribution is already
discovered, listed by ``moe plugins`` and reported by ``moe doctor``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_core import hookimpl

from . import __version__


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """No kernels yet."""


@hookimpl
def environment_report() -> dict[str, Any]:
    return {"version": __version__, "kernels": 0}
