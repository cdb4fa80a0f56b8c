"""Helpers for testing kernels against the reference, and the conformance kit's pytest plugin.

Used by this repository's tests, by ``moe run``, and by third-party plugin
authors checking their kernels (``from moe_core.testing import ...``):

- :mod:`.data`: random layers (:func:`random_expert_weights`, quantized with
  :mod:`moe_core.quant`'s reference quantizers), router logits and routing;
- :mod:`.accuracy`: :func:`relative_error` and the bound :func:`tolerance`
  a kernel must meet against the float64 reference;
- :mod:`.invariants`: checkers of the routing and sorting contracts;
- :mod:`.plugin`: the pytest plugin (entry point ``pytest11``) behind
  ``pytest --pyargs moe_core.conformance --moe-kernel NAME``; see
  :mod:`moe_core.conformance`.
"""

from __future__ import annotations

from .accuracy import TOLERANCES, relative_error, tolerance
from .data import random_expert_weights, random_logits, random_routing
from .invariants import check_aligned_blocks, check_ragged_metadata, check_routing, check_sorted_tokens

__all__ = [
    "TOLERANCES",
    "check_aligned_blocks",
    "check_ragged_metadata",
    "check_routing",
    "check_sorted_tokens",
    "random_expert_weights",
    "random_logits",
    "random_routing",
    "relative_error",
    "tolerance",
]
