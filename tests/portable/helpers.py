"""Shared by the portable-plugin tests: where kernels run (a GPU, or the CPU in Triton's interpreter)."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from moe_core import moe_apply
from moe_core.testing import random_routing
from moe_plugin_portable.configs import lookup_decode

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: device the non-GPU tests run on: the GPU if present, else the CPU under the interpreter
DEVICE = "cuda" if HAS_GPU else "cpu"

needs_triton = pytest.mark.skipif(
    not (HAS_GPU or INTERPRET), reason="needs a GPU, or TRITON_INTERPRET=1 set before Triton is imported"
)
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA/ROCm GPU")


def assert_graph_replay_matches_eager(plan, prepared, preset, x, topk_w, topk_ids, seed: int) -> None:
    """Capture ``moe_apply`` once, replay it on new inputs copied into the static buffers
    (``x``, ``topk_w``, ``topk_ids`` are overwritten), and compare with an eager call on the path
    the capture took (an eager call may take the decode path where a capture takes the sorted
    one, :func:`moe_plugin_portable.configs.lookup_decode`): equal."""
    T = x.shape[0]
    captured = lookup_decode(plan.spec, T, x.device, capturing=True)
    graph = torch.cuda.CUDAGraph()
    static_out = torch.empty_like(x)
    with torch.cuda.graph(graph):
        moe_apply(plan, x, prepared, topk_w, topk_ids, out=static_out)
    x.copy_(torch.randn_like(x))
    new_w, new_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=seed)
    topk_w.copy_(new_w)
    topk_ids.copy_(new_ids)
    static_out.fill_(float("nan"))
    graph.replay()
    with mock.patch.dict(os.environ, {"MOE_PORTABLE_DECODE": "0" if captured is None else "1"}):
        eager = moe_apply(plan, x, prepared, topk_w, topk_ids)
    assert torch.equal(static_out, eager)
