"""Exceptions raised by moe_core and its plugins.

Every error the library raises on purpose derives from :class:`MoEError`, so an
engine can catch the whole family with one ``except`` clause.
"""

from __future__ import annotations

__all__ = ["MoEError", "MoEInputError", "PluginError", "UnsupportedError"]


class MoEError(Exception):
    """Base class of every error raised by moe_core and its plugins."""


class MoEInputError(MoEError, ValueError):
    """A tensor or argument is invalid (shape, dtype, device, range, layout).

    Raised by the validation layer before any kernel is launched, so the
    engine's state (CUDA context, output buffers) is untouched.
    """


class UnsupportedError(MoEError):
    """No registered kernel supports the request on this device.

    The message lists every candidate kernel with the reason it refused.
    """


class PluginError(MoEError):
    """A plugin failed to import or to register its kernels.

    Only raised when strict mode is on (``MOE_STRICT_PLUGINS=1``); otherwise the
    failure is recorded, shown by ``moe plugins``, and the plugin is skipped.
    """
