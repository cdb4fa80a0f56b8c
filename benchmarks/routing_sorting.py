"""Time the portable routing and sorting kernels on the GPU (issue targets: routing <= 8 us, align <= 10 us).

    python benchmarks/routing_sorting.py [--out results.json]

For each case: ``host`` (us of host time per call, calls queued without a
sync: the launch cost an eager engine pays), ``eager`` (median device time of
back-to-back calls with one event pair each, so the larger of launch and
kernel time shows) and ``graph`` (median of CUDA-graph replays: kernel time
alone). Routing goes through the public ``moe_core.select_experts`` (input
checks and dispatch included), sorting through ``moe_core.sorting``.
"""

from __future__ import annotations

import argparse
import json

import torch

import moe_core
from moe_core.bench.timing import launch_costs
from moe_core.sorting import align_block_size, moe_sorting

ROUTING = {
    "biased_grouped E=256 k=8 (deepseek-v3)": (
        moe_core.RoutingSpec(
            "biased_grouped", 8, renormalize=True, num_expert_group=8, topk_group=4, routed_scaling_factor=2.5
        ),
        256,
    ),
    "softmax E=128 k=8 (qwen3)": (moe_core.RoutingSpec("softmax", 8, renormalize=True), 128),
    "softmax_after_topk E=128 k=4 (gpt-oss)": (moe_core.RoutingSpec("softmax_after_topk", 4), 128),
}
ROUTING_TOKENS = (1, 16, 64, 256, 1024, 4096)
ALIGN = {
    "E=128 k=8 block 16": (128, 8, 16),
    "E=256 k=8 block 64": (256, 8, 64),
    "E=8 k=2 block 64": (8, 2, 64),
}
ALIGN_TOKENS = (1, 16, 256, 2048, 8192)
SORTING = {"moe_sorting E=257 k=9 unit 32": (257, 9, 32)}
SORTING_TOKENS = (1, 16, 256, 2048, 16384)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (routing, E) in ROUTING.items():
        bias = (
            torch.randn(E, device="cuda", generator=gen) * 0.1 if routing.method == "biased_grouped" else None
        )
        for T in ROUTING_TOKENS:
            logits = torch.randn(T, E, device="cuda", generator=gen).to(torch.bfloat16)
            r = launch_costs(
                lambda logits=logits, routing=routing, bias=bias: moe_core.select_experts(
                    logits, routing, correction_bias=bias
                )
            )
            rows.append({"op": "select_experts", "case": name, "T": T, **r})
    for name, (E, k, block) in ALIGN.items():
        for T in ALIGN_TOKENS:
            ids = torch.rand(T, E, device="cuda", generator=gen).argsort(1)[:, :k].int()
            r = launch_costs(
                lambda ids=ids, E=E, block=block: align_block_size(ids, num_experts=E, block_size=block)
            )
            rows.append({"op": "align_block_size", "case": name, "T": T, **r})
    for name, (E, k, unit) in SORTING.items():
        for T in SORTING_TOKENS:
            ids = torch.rand(T, E, device="cuda", generator=gen).argsort(1)[:, :k].int()
            w = torch.rand(T, k, device="cuda", generator=gen)
            r = launch_costs(
                lambda ids=ids, w=w, E=E, unit=unit: moe_sorting(ids, w, num_experts=E, unit_size=unit)
            )
            rows.append({"op": "moe_sorting", "case": name, "T": T, **r})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'op':17s} {'case':40s} {'T':>6s} {'host':>7s} {'eager':>7s} {'graph':>7s}  (us)")
    for r in rows:
        print(
            f"{r['op']:17s} {r['case']:40s} {r['T']:6d} {r['host_us']:7.1f} {r['eager_us']:7.1f} {r['graph_us']:7.1f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
