"""moe-plugin-portable: Triton kernels for NVIDIA and AMD GPUs (and the CPU under TRITON_INTERPRET=1).

Discovered by moe-core through the ``moe_core.plugins`` entry point ``portable``
(module :mod:`moe_plugin_portable.plugin`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-plugin-portable")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = ["__version__"]
