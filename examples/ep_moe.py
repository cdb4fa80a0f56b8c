"""Expert parallelism with torch.distributed: each rank runs its slice of the experts.

Every rank holds a contiguous slice of the experts (``MoESpec(ep_size=world, ep_rank=rank)``:
the first ``E % world`` ranks one more), runs ``moe_apply`` on the same tokens and
routing (routes to other ranks' experts contribute nothing), and an all-reduce
sums the partial outputs. Rank 0 checks the sum against the single-process
float64 reference over all experts and prints the relative error; the exit
status is non-zero if it exceeds the dtype's tolerance.

Launch::

    torchrun --nproc-per-node 2 examples/ep_moe.py                 # CPU: gloo
    torchrun --nproc-per-node 8 examples/ep_moe.py --dtype bfloat16  # GPUs: nccl, one per rank
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import moe_core as moe
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance


def local_slice(weights: moe.ExpertWeights, spec: moe.MoESpec) -> moe.ExpertWeights:
    """This rank's experts (a contiguous slice of every tensor's expert dimension)."""
    local = [g for g, loc in enumerate(spec.global_to_local()) if loc >= 0]
    start, stop = local[0], local[-1] + 1
    return moe.ExpertWeights(**{n: t[start:stop].clone() for n, t in weights.tensors().items()})


def run(args: argparse.Namespace) -> bool:
    """One rank's work; False if rank 0 finds the error above the bound."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    full = moe.MoESpec(
        num_experts=args.experts,
        top_k=args.top_k,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        dtype=dtype,
    )
    spec = full.replace(ep_size=world, ep_rank=rank)
    plan = moe.moe_plan(spec, device=device)

    # Every rank builds the same global weights from the same seed (a checkpoint loader
    # would read only its slice), and keeps its own experts.
    weights = random_expert_weights(full, device=device, seed=args.seed)
    prepared = plan.prepare(local_slice(weights, spec))

    # The same tokens and routing on every rank: rank 0's, broadcast.
    routing = moe.RoutingSpec("softmax", top_k=args.top_k, renormalize=True)
    x = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
    topk_weights, topk_ids = random_routing(routing, args.tokens, args.experts, device=device, seed=rank)
    for t in (x, topk_weights, topk_ids):
        dist.broadcast(t, src=0)

    partial = moe.moe_apply(plan, x, prepared, topk_weights, topk_ids)
    out = partial.float()  # sum the partials in float32: one rounding to dtype at the end
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out = out.to(dtype)

    if rank == 0:
        expected = fused_experts_reference(
            full, x, weights, topk_weights, topk_ids, compute_dtype=torch.float64
        )
        error = relative_error(out, expected)
        local = spec.num_local_experts
        print(
            f"ep_size={world} experts={args.experts} (rank 0 holds {local}) tokens={args.tokens} "
            f"dtype={args.dtype} kernel={plan.kernel} backend={dist.get_backend()}: "
            f"relative error vs float64 reference {error:.2e} (bound {tolerance(full):.1e})",
            flush=True,
        )
        return error <= tolerance(full)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.manual_seed(args.seed)  # the same x on every rank before the broadcast, too

    dist.init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
    try:
        ok = run(args)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
