"""moe-plugin-nvidia: FlashInfer-backed kernels for NVIDIA GPUs (flashinfer imported lazily).

Discovered by moe-core through the ``moe_core.plugins`` entry point ``nvidia``
(module :mod:`moe_plugin_nvidia.plugin`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-plugin-nvidia")
except PackageNotFoundError:
    __version__ = "0.0.0"

__all__ = ["__version__"]
