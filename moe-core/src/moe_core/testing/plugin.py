"""The conformance kit's pytest plugin, re-exported from :mod:`moe_core_pytest`.

The plugin itself lives in the top-level module ``moe_core_pytest`` (entry point
``pytest11``, name ``moe_core``) so that loading it in every pytest run does not
import ``moe_core``, and with it torch.
"""

from __future__ import annotations

from moe_core_pytest import moe_device, moe_kernels, requested_device, requested_kernels

__all__ = ["moe_device", "moe_kernels", "requested_device", "requested_kernels"]
