"""What every kernel of this plugin shares: priorities, and where Triton can run."""

from __future__ import annotations

from moe_core.device import triton_interpreting as interpreting
from moe_core.device import triton_refusal

__all__ = [
    "PRIORITY_AITER",
    "PRIORITY_GLUON",
    "PRIORITY_SORTING",
    "PRIORITY_SORTING_HIP",
    "interpreting",
    "triton_refusal",
]

#: ``amd.triton.moe_sorting`` on any device: below the portable sorter (50), so that NVIDIA GPUs and
#: the CPU interpreter keep the portable kernel unless this one is forced (``MOE_BACKEND``).
PRIORITY_SORTING = 40
#: ``amd.triton.moe_sorting.hip``: the same kernel registered for AMD GPUs only, above the portable one.
PRIORITY_SORTING_HIP = 60
#: aiter/CK fallbacks: above the reference (0), below this plugin's own kernels and the portable ones.
PRIORITY_AITER = 30
#: ``amd.gluon.mxfp4``: above the portable fused MoE (50) on gfx950, the kernel written for it.
PRIORITY_GLUON = 70
