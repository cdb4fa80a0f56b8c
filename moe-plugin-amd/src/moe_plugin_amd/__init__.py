"""moe-plugin-amd: AMD CDNA kernels (Gluon mxfp4, multi-path sorting, CK/aiter fallbacks).

Discovered by moe-core through the ``moe_core.plugins`` entry point ``amd``
(module :mod:`moe_plugin_amd.plugin`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-plugin-amd")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = ["__version__"]
