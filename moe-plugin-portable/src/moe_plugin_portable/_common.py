"""What every portable kernel shares: where Triton can run, and the priorities."""

from __future__ import annotations

import importlib.util
import os

from moe_core import DeviceInfo

#: Above the reference (0), below vendor-library kernels that beat Triton on their GPU.
PRIORITY = 50


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") in ("1", "true", "True")


def triton_refusal(device: DeviceInfo) -> str | None:
    """Why Triton kernels cannot run on ``device``, or ``None``.

    GPUs (NVIDIA, AMD) run compiled kernels; the CPU runs them only in the
    interpreter, which is slow and meant for tests.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.vendor == "cpu" and not interpreting():
        return "Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1, for tests)"
    return None
