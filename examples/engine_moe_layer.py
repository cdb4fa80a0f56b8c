"""A MoE layer as an inference engine writes it on top of moe-core.

The layer plans its kernel when the model is built (``moe_plan``: early, so an
unsupported layer fails at load time and ``plan.explain()`` can be logged),
prepares the expert weights once when they are loaded (``plan.prepare``), and in
``forward`` only routes (``select_experts``) and runs the experts (``moe_apply``).
Both are ``torch.library`` custom ops with fake implementations, so the layer
traces whole under ``torch.compile(fullgraph=True)`` and, on a GPU, is captured by
CUDA graphs.

Run it::

    python examples/engine_moe_layer.py                  # CPU, eager and compiled
    python examples/engine_moe_layer.py --device cuda --dtype bfloat16 --cuda-graph
"""

from __future__ import annotations

import argparse

import torch

import moe_core as moe
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, relative_error


class MoELayer(torch.nn.Module):
    """Router linear + routed experts (DeepSeek-V3 style routing by default).

    Args:
        hidden_size, intermediate_size, num_experts, top_k: the layer's shape.
        routing: how router logits become (weights, ids); default biased grouped top-k.
        activation: the experts' activation (``silu``, ``gelu``, ``swiglu_oai``, ``relu2``).
        dtype, device: activations/weights dtype and the device to plan for.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        routing: moe.RoutingSpec | None = None,
        activation: str = "silu",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.router = torch.nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        self.routing = routing or moe.RoutingSpec(
            method="biased_grouped",
            top_k=top_k,
            renormalize=True,
            num_expert_group=max(1, num_experts // 4),
            topk_group=max(1, num_experts // 8),
            routed_scaling_factor=2.5,
        )
        self.routing.check_num_experts(num_experts)
        grouped = self.routing.method == "biased_grouped"
        self.register_buffer(
            "correction_bias", torch.zeros(num_experts, device=device) if grouped else None, persistent=True
        )
        self.spec = moe.MoESpec(
            num_experts=num_experts,
            top_k=self.routing.num_slots,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            activation=activation,
            dtype=dtype,
        )
        # Load time: choose the kernel now, not on the first forward.
        self.plan = moe.moe_plan(self.spec, device=device)
        self.prepared: moe.PreparedWeights | None = None
        self.weights: moe.ExpertWeights | None = None

    def load_experts(self, weights: moe.ExpertWeights) -> None:
        """Take canonical expert weights and re-lay them out for the planned kernel, once."""
        self.weights = weights  # kept only so the example can check against the reference
        self.prepared = self.plan.prepare(weights)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights float32 [T, k], ids int32 [T, k])`` for ``hidden_states [T, H]``."""
        logits = self.router(hidden_states)
        return moe.select_experts(logits, self.routing, correction_bias=self.correction_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, H] -> [T, H]``: route, then run the experts."""
        topk_weights, topk_ids = self.route(hidden_states)
        return moe.moe_apply(self.plan, hidden_states, self.prepared, topk_weights, topk_ids)


def build_layer(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 32,
    num_experts: int = 16,
    top_k: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MoELayer:
    """A layer with random router, correction bias and expert weights (as a checkpoint would give)."""
    layer = MoELayer(hidden_size, intermediate_size, num_experts, top_k, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen, device=device))
        layer.correction_bias.copy_(torch.randn(num_experts, generator=gen, device=device) * 0.1)
    layer.load_experts(random_expert_weights(layer.spec, device=device, seed=seed))
    return layer.eval()


def check(layer: MoELayer, x: torch.Tensor, out: torch.Tensor) -> float:
    """Relative error of ``out`` against the float64 reference on the same routing."""
    topk_weights, topk_ids = layer.route(x)
    expected = fused_experts_reference(
        layer.spec, x, layer.weights, topk_weights, topk_ids, compute_dtype=torch.float64
    )
    return relative_error(out, expected)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(fullgraph=True)")
    parser.add_argument("--cuda-graph", action="store_true", help="also capture and replay a CUDA graph")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layer = build_layer(dtype=dtype, device=device)
    print(layer.plan.explain())
    x = torch.randn(args.tokens, layer.spec.hidden_size, device=device, dtype=dtype)
    with torch.no_grad():
        eager = layer(x)
        print(f"eager    rel. error vs float64 reference: {check(layer, x, eager):.2e}")
        if not args.no_compile:
            compiled = torch.compile(layer, fullgraph=True)(x)
            print(f"compiled rel. error vs eager: {relative_error(compiled, eager):.2e}")
        if args.cuda_graph:
            static_x = x.clone()
            layer(static_x)  # warm up (kernel compilation, caches) outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = layer(static_x)
            static_x.copy_(x)
            graph.replay()
            print(f"graph    rel. error vs eager: {relative_error(static_out, eager):.2e}")


if __name__ == "__main__":
    main()
