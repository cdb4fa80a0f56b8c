"""examples/engine_moe_layer.py: plan at load time, prepare once, route + apply per forward.

Eager and ``torch.compile(fullgraph=True)`` agree on the CPU (select_experts and
moe_apply are custom ops with fake implementations); on a GPU the layer is
captured in a CUDA graph and replayed on new inputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import moe_core as moe
from moe_core.testing import relative_error

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "engine_moe_layer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("engine_moe_layer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def test_layer_plans_at_build_and_prepares_once():
    layer = example.build_layer()
    assert isinstance(layer.plan, moe.MoEPlan) and layer.prepared.kernel == layer.plan.kernel
    x = torch.randn(16, layer.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)
    assert out.shape == x.shape and out.dtype == layer.spec.dtype
    assert example.check(layer, x, out) <= 1e-5


def test_compiled_fullgraph_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    layer = example.build_layer()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: a graph break raises
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tokens in (32, 17, 5, 1, 0):  # static, then dynamic token counts, and the empty batch
            x = torch.randn(tokens, layer.spec.hidden_size, generator=gen)
            assert torch.equal(compiled(x), layer(x)), tokens
    explained = torch._dynamo.explain(layer)(torch.randn(8, layer.spec.hidden_size))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"moe_core.select_experts", "moe_core.moe_apply"} <= {op.removesuffix(".default") for op in ops}, (
        ops
    )


def test_main_runs_on_cpu(capsys):
    example.main(["--tokens", "8"])
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "compiled rel. error vs eager: 0.00e+00" in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MOE_LOAD_PLUGINS")  # the GPU kernels come from plugins
    layer = example.build_layer(hidden_size=256, intermediate_size=128, dtype=torch.bfloat16, device="cuda")
    if layer.plan.kernel.startswith("reference."):
        pytest.skip(f"no capturable GPU kernel installed (planned {layer.plan.kernel}, which syncs)")
    static_x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x)  # warm up outside the capture (JIT compilation, caches)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        for _ in range(2):  # replay on new inputs copied into the static buffer
            x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
            static_x.copy_(x)
            static_out.fill_(float("nan"))
            graph.replay()
            eager = layer(x)
            assert torch.equal(static_out, eager)
            assert relative_error(eager, static_out) == 0.0
            assert example.check(layer, x, eager) <= 2e-2
