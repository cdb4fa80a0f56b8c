"""Time each stage of the portable fused MoE on the GPU (sort, GEMM 1, GEMM 2, combine).

    python benchmarks/stages.py [--models qwen3-30b-a3b,...] [--tokens 1,32,512] [--dtype bf16]

Each stage is timed alone with ``triton.testing.do_bench_cudagraph`` (median of
graph replays, device time only) on the config the runtime would pick, and set
against the stage's own floor (its bytes over the copy bandwidth measured in
the same run, its FLOPs over the dense GEMM rate): the table shows where the
layer's time goes and which stage is furthest from its limit.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from moe_core.presets import get_preset
from moe_core.testing import random_expert_weights, random_routing
from moe_plugin_portable.configs import lookup_config
from moe_plugin_portable.experts import (
    _prepare,
    launch_combine,
    launch_gemm1,
    launch_gemm2,
    sort_tokens,
)


def _bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def ceilings() -> tuple[float, float]:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_us = _bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_us = _bench(lambda: a @ a)
    return 2 * src.numel() / (copy_us * 1e-6), 2 * 8192**3 / (gemm_us * 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v3-tp8,gpt-oss-120b")
    parser.add_argument("--tokens", default="1,8,32,128,512,2048,8192")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bw, rate = ceilings()
    print(f"copy {bw / 1e12:.2f} TB/s, GEMM {rate / 1e12:.0f} TFLOP/s")
    print(
        f"{'model':22s} {'T':>5s} {'cfg':34s} {'sort':>7s} {'gemm1':>8s} {'x':>5s} {'gemm2':>8s} {'x':>5s} {'comb':>7s}"
    )
    for model in args.models.split(","):
        preset = get_preset(model)
        spec = preset.moe_spec(dtype)
        tensors = _prepare(spec, random_expert_weights(spec, device="cuda"), None)
        for T in (int(t) for t in args.tokens.split(",")):
            print(_case(preset, spec, tensors, T, bw, rate), flush=True)
        del tensors
        torch.cuda.empty_cache()


def _case(preset, spec, tensors, T: int, bw: float, rate: float) -> str:
    """One table row: each stage's time and (for the GEMMs) its time over its own floor."""
    dtype, H, inter = spec.dtype, spec.hidden_size, spec.intermediate_size
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    w, ids = random_routing(preset.routing, T, preset.num_experts, device="cuda")
    cfg = lookup_config(spec, T, x.device)
    blocks = sort_tokens(spec, ids, tensors, cfg.block_m)
    inter_buf = torch.empty(blocks.sorted_ids.numel(), inter, dtype=dtype, device="cuda")
    y = torch.empty(T * spec.top_k, H, dtype=dtype, device="cuda")
    out = torch.empty(T, H, dtype=dtype, device="cuda")
    t_sort = _bench(lambda: sort_tokens(spec, ids, tensors, cfg.block_m))
    t1 = _bench(lambda: launch_gemm1(spec, x, tensors, blocks, w, cfg.gemm1, inter_buf))
    t2 = _bench(lambda: launch_gemm2(spec, inter_buf, tensors, blocks, w, cfg.gemm2, y, False))
    tc = _bench(lambda: launch_combine(spec, y, ids, tensors, out))
    active = len(torch.unique(ids))
    esize = dtype.itemsize
    f1 = max(active * 2 * inter * H * esize / bw, 2 * T * spec.top_k * 2 * inter * H / rate) * 1e6
    f2 = max(active * inter * H * esize / bw, 2 * T * spec.top_k * inter * H / rate) * 1e6
    g1, g2 = cfg.gemm1, cfg.gemm2
    label = (
        f"m{cfg.block_m} n{g1.block_n}k{g1.block_k}w{g1.num_warps}s{g1.num_stages}"
        f"/n{g2.block_n}k{g2.block_k}w{g2.num_warps}s{g2.num_stages}"
    )
    return (
        f"{preset.name:22s} {T:5d} {label:34s} {t_sort:7.1f} {t1:8.1f} {t1 / f1:5.2f} "
        f"{t2:8.1f} {t2 / f2:5.2f} {tc:7.1f}"
    )


if __name__ == "__main__":
    main()
