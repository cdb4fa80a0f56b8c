"""``moe bench``: every experts kernel and peer on every case, against the floor and the reference.

- :mod:`.suite`: the cases (:class:`BenchConfig`, :func:`run_bench`);
- :mod:`.timing`: CUDA events and graphs on a GPU, ``perf_counter`` on the CPU;
- :mod:`.floors`: measured ceilings and ../shared/BENCHMARKS.md's floor formula;
- :mod:`.peers`: ``torch._grouped_mm`` and the vLLM peer loaded from a folder;
- :mod:`.report`: JSON, markdown, rich table, plots (matplotlib optional).

Imports torch and ``moe_core`` only: no triton or vendor library at import time.
"""

from __future__ import annotations

from .floors import (
    H100_CEILINGS,
    L2_FLUSH_BYTES,
    MAX_COLD_ROUTINGS,
    cold_routings,
    expected_active_experts,
    expert_bytes,
    floor_us,
    measure_ceilings,
    preset_floor_us,
)
from .suite import BenchConfig, default_models, quick_models, run_bench, uniform_routing

__all__ = [
    "H100_CEILINGS",
    "L2_FLUSH_BYTES",
    "MAX_COLD_ROUTINGS",
    "BenchConfig",
    "cold_routings",
    "default_models",
    "expected_active_experts",
    "expert_bytes",
    "floor_us",
    "measure_ceilings",
    "preset_floor_us",
    "quick_models",
    "run_bench",
    "uniform_routing",
]
