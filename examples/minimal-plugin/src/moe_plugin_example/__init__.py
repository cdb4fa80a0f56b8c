"""moe-plugin-example: a minimal moe-core plugin (see docs/writing-a-plugin.md in moe-kernels).

Its one kernel, ``example.torch.loop``, lives in :mod:`moe_plugin_example.plugin`.
"""

from __future__ import annotations

__version__ = "0.1.0"
