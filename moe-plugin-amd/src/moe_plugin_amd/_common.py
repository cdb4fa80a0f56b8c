"""What every kernel of this plugin shares: priorities, and where Triton can run."""

from __future__ import annotations

import importlib.util
import os

from moe_core import DeviceInfo

#: ``amd.triton.moe_sorting`` on any device: below the portable sorter (50), so that NVIDIA GPUs and
#: the CPU interpreter keep the portable kernel unless this one is forced (``MOE_BACKEND``).
PRIORITY_SORTING = 40
#: ``amd.triton.moe_sorting.hip``: the same kernel registered for AMD GPUs only, above the portable one.
PRIORITY_SORTING_HIP = 60
#: aiter/CK fallbacks: above the reference (0), below this plugin's own kernels and the portable ones.
PRIORITY_AITER = 30


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") in ("1", "true", "True")


def triton_refusal(device: DeviceInfo) -> str | None:
    """Why this plugin's Triton kernels cannot run on ``device``, or ``None``."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.vendor == "cpu" and not interpreting():
        return "Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1, for tests)"
    return None
