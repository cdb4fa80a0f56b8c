"""``moe run``: plan, prepare and run one model's MoE layer, checked against the reference."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .planner import moe_apply, moe_plan
from .presets import ModelPreset
from .reference import fused_experts_reference
from .spec import QuantScheme
from .testing import random_expert_weights, random_routing, relative_error, tolerance

__all__ = ["RunResult", "run_layer", "time_callable"]


@dataclass
class RunResult:
    """What ``moe run`` measured."""

    model: str
    spec: str
    device: str
    kernel: str
    tokens: int
    relative_error: float
    max_abs_error: float
    tolerance: float
    passed: bool
    median_us: float
    min_us: float
    iterations: int
    prepared_mib: float

    def to_json(self) -> dict:
        return asdict(self)


def time_callable(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 20
) -> list[float]:
    """Per-call times in microseconds (CUDA events on a GPU, ``perf_counter`` on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def run_layer(
    preset: ModelPreset,
    *,
    tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    quant: QuantScheme | str | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    seed: int = 0,
    iters: int = 20,
    ep_size: int = 1,
    ep_rank: int = 0,
) -> tuple[RunResult, str]:
    """Run ``preset``'s layer on ``tokens`` random tokens; returns the result and the plan's explanation."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    spec = preset.moe_spec(dtype, quant, ep_size=ep_size, ep_rank=ep_rank)
    plan = moe_plan(spec, dev, backend=backend)
    weights = random_expert_weights(spec, device=dev, seed=seed)
    prepared = plan.prepare(weights)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + 7)
    x = torch.randn(tokens, spec.hidden_size, generator=gen, device=dev).to(dtype)
    topk_weights, topk_ids = random_routing(
        preset.routing, tokens, preset.num_experts, device=dev, seed=seed + 11
    )
    out = moe_apply(plan, x, prepared, topk_weights, topk_ids)
    expected = fused_experts_reference(spec, x, weights, topk_weights, topk_ids, compute_dtype=torch.float64)
    err = relative_error(out, expected)
    max_abs = (out.double() - expected).abs().max().item() if tokens else 0.0
    times = time_callable(lambda: moe_apply(plan, x, prepared, topk_weights, topk_ids), dev, iters=iters)
    result = RunResult(
        model=preset.name,
        spec=spec.describe(),
        device=str(plan.device),
        kernel=plan.kernel_for(tokens) if tokens else plan.kernel,
        tokens=tokens,
        relative_error=err,
        max_abs_error=max_abs,
        tolerance=tolerance(spec),
        passed=err <= tolerance(spec),
        median_us=statistics.median(times),
        min_us=min(times),
        iterations=len(times),
        prepared_mib=prepared.nbytes / 2**20,
    )
    return result, plan.explain()
