"""What every portable kernel shares: where Triton can run, and the priorities."""

from __future__ import annotations

from moe_core.device import triton_interpreting as interpreting
from moe_core.device import triton_refusal

__all__ = ["PRIORITY", "interpreting", "triton_refusal"]

#: Above the reference (0), below vendor-library kernels that beat Triton on their GPU.
PRIORITY = 50
