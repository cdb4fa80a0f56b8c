"""Tuning a dispatch table: time every usable experts kernel per bucket of token counts.

:func:`tune_dispatch` (``moe tune``, ``moe_plan(spec, device, tune=True)``) and the
timing it rests on, :func:`measure_plans`; the table, its buckets and its files are
:mod:`moe_core.dispatch`, which re-exports both functions.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import dispatch as _table
from .device import DeviceInfo, device_info
from .dispatch import (
    BUCKETS,
    Bucket,
    DispatchTable,
    Progress,
    bucket_index,
    device_name,
    environment_versions,
    save_table,
    spec_key,
)
from .errors import MoEInputError
from .spec import MoESpec

__all__ = ["measure_plans", "tune_dispatch"]


def _tokens_by_bucket(tokens: Sequence[int]) -> list[list[int]]:
    by = [[] for _ in BUCKETS]
    for t in sorted(set(int(t) for t in tokens)):
        if t < 1:
            raise MoEInputError(f"token counts to tune at must be >= 1, got {t}")
        by[bucket_index(t)].append(t)
    return by


def tune_dispatch(
    spec: MoESpec,
    device: DeviceInfo | torch.device | str | None = None,
    *,
    tokens: Sequence[int] | None = None,
    kernels: Sequence[str] | None = None,
    iters: int | None = None,
    warmup: int = 3,
    seed: int = 0,
    time_budget_us: float = 1.0e6,
    progress: Progress | None = None,
    save: bool = True,
    folder: Path | str | None = None,
) -> DispatchTable | None:
    """Time every usable experts kernel for ``spec`` per bucket; the table (saved unless ``save=False``).

    Args:
        tokens: token counts to time (default :data:`moe_core.dispatch.DEFAULT_TOKENS`, one per bucket);
            several in a bucket are summed; a bucket with none keeps the static choice.
        kernels: only kernels named by these names or dotted prefixes (default: all usable).
        iters: timed calls per measurement (default 30 on a GPU, 10 on the CPU; fewer for
            a slow kernel so that one measurement takes about ``time_budget_us``, at least 5).

    Returns ``None`` when fewer than two kernels are usable (nothing to choose between).
    Raises :class:`MoEInputError` for a simulated device (nothing can be timed there).
    """
    from .bench.suite import GRAPH_MAX_T, _plan_for
    from .bench.suite import select_kernels as bench_select
    from .testing import tolerance

    info = device_info(device)
    if info.simulated:
        raise MoEInputError(f"cannot tune on a simulated device ({info}); tune on the device itself")
    dev = _torch_device(info)
    cuda = dev.type == "cuda"
    by_bucket = _tokens_by_bucket(tokens or _table.DEFAULT_TOKENS)  # read at call time
    usable, _ = bench_select(spec, dev, list(kernels) if kernels else None)
    if len(usable) < 2:
        return None
    iters = iters or (30 if cuda else 10)
    plans: dict[str, Any] = {}
    for name in usable:
        try:
            plans[name] = _plan_for(spec, dev, name)
        except Exception as exc:  # reported per token count by measure_plans
            plans[name] = f"plan raised {type(exc).__name__}: {exc}"[:300]
    all_tokens = [t for ts in by_bucket for t in ts]
    measured, syncs, copies = measure_plans(
        spec,
        plans,
        all_tokens,
        device=dev,
        iters=iters,
        warmup=warmup,
        seed=seed,
        time_budget_us=time_budget_us,
        progress=progress,
    )
    bound = tolerance(spec)
    buckets = [_choose(ts, measured, usable, syncs) for ts in by_bucket]
    table = DispatchTable(
        key=spec_key(spec),
        spec=spec.describe(),
        device=device_name(info),
        versions=environment_versions(),
        buckets=buckets,
        measured=measured,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        method=(
            f"{'CUDA events, graphs for T<=' + str(GRAPH_MAX_T) if cuda else 'perf_counter'}; "
            f"median of <= {iters} calls after {warmup} warm-up; {copies} rotated weight/input copies; "
            f"checked against the float64 reference (bound {bound:.1e})"
        ),
    )
    if save:
        save_table(table, folder)
    return table


def _torch_device(info: DeviceInfo) -> torch.device:
    return info.device if info.vendor != "cpu" else torch.device("cpu")


def measure_plans(
    spec: MoESpec,
    plans: dict[str, Any],
    tokens: Sequence[int],
    *,
    device: torch.device | str,
    iters: int,
    warmup: int = 3,
    seed: int = 0,
    time_budget_us: float = 1.0e6,
    progress: Progress | None = None,
    details: dict[int, dict[str, dict[str, Any]]] | None = None,
) -> tuple[dict[int, dict[str, float | str]], dict[str, str], int]:
    """Check and time each plan of ``plans`` (name -> :class:`MoEPlan`, or a reason it has none).

    Per token count ``T``: ``copies`` random weight sets (prepared by every plan) and
    inputs routed softmax top-k on random logits (uniform expert load); each plan is
    run once into a NaN-poisoned output and checked against the float64 reference,
    then timed as ``moe bench`` does (:func:`moe_core.bench.suite._time_into`).

    Returns ``({T: {name: best microseconds, or why not}}, {name: why it is not
    CUDA-graph safe}, copies)``. ``details[T][name]`` receives the full timing record.
    """
    from .bench.suite import GRAPH_MAX_T, L2_FLUSH_BYTES, _graph_blocker, _time_into, uniform_routing
    from .planner import moe_apply
    from .reference import fused_experts_reference
    from .routing import RoutingSpec
    from .testing import random_expert_weights, relative_error, tolerance

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    bound = tolerance(spec)
    weights = [random_expert_weights(spec, device=dev, seed=seed + 1)]
    copies = 1
    if cuda:
        wbytes = sum(t.numel() * t.element_size() for t in weights[0].tensors().values())
        copies = max(2, math.ceil(L2_FLUSH_BYTES / max(wbytes, 1)))
        weights += [random_expert_weights(spec, device=dev, seed=seed + 1 + i) for i in range(1, copies)]
    prepared: dict[str, list[Any]] = {}
    broken = {name: plan for name, plan in plans.items() if isinstance(plan, str)}
    for name, plan in plans.items():
        if name in broken:
            continue
        try:
            prepared[name] = [plan.prepare(w) for w in weights]
        except Exception as exc:  # a kernel that cannot prepare is left out, the others go on
            broken[name] = f"prepare raised {type(exc).__name__}: {exc}"[:300]
    syncs: dict[str, str] = {}
    routing = RoutingSpec("softmax", spec.top_k, renormalize=True)
    measured: dict[int, dict[str, float | str]] = {}
    steps, step = len(tokens) * len(plans), 0
    for T in tokens:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed + 7 + T)
        inputs = []
        for i in range(copies):
            x = torch.randn(T, spec.hidden_size, generator=gen, device=dev).to(spec.dtype)
            w, ids = uniform_routing(routing, T, spec.num_experts, device=dev, seed=seed + 100 + i + T)
            inputs.append((x, w, ids))
        x0, w0, ids0 = inputs[0]
        want = fused_experts_reference(spec, x0, weights[0], w0, ids0, compute_dtype=torch.float64)
        out = torch.empty(T, spec.hidden_size, dtype=spec.dtype, device=dev)
        row: dict[str, float | str] = {}
        measured[T] = row
        for name in plans:
            step += 1
            if progress is not None:
                progress(f"dispatch {name} T={T}", step, steps)
            if name in broken:
                row[name] = broken[name]
                continue

            def call(i: int, plan=plans[name], prep=prepared[name], inputs=inputs, out=out) -> None:
                x, w, ids = inputs[i]
                moe_apply(plan, x, prep[i], w, ids, out=out)

            try:
                out.fill_(float("nan"))
                call(0)
                err = relative_error(out, want)
                if not err <= bound:
                    row[name] = f"wrong: relative error {err:.3e} > bound {bound:.1e}"
                    continue
                if cuda and name not in syncs:
                    syncs[name] = _graph_blocker(call) or ""
                result: dict[str, Any] = {"relative_error": err}
                n = _iters_for(call, iters, time_budget_us, dev)
                _time_into(result, call, copies, n, dev, cuda and T <= GRAPH_MAX_T, warmup)
                row[name] = float(result["best_us"])
                if details is not None:
                    details.setdefault(T, {})[name] = result
            except Exception as exc:  # a kernel that raises is left out of the bucket
                row[name] = f"raised {type(exc).__name__}: {exc}"[:300]
        want = inputs = out = None  # free before the next T
    prepared = {}
    if cuda:
        torch.cuda.empty_cache()
    return measured, {k: v for k, v in syncs.items() if v}, copies


def _iters_for(call: Callable[[int], None], iters: int, budget_us: float, dev: torch.device) -> int:
    """``iters``, or fewer (>= 5) when one call is so slow that ``iters`` would exceed the budget."""
    import time

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    call(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    one = (time.perf_counter() - t0) * 1e6
    return max(5, min(iters, int(budget_us / max(one, 1.0))))


def _choose(
    tokens: list[int],
    measured: dict[int, dict[str, float | str]],
    usable: Sequence[str],
    syncs: dict[str, str],
) -> Bucket:
    """The bucket's winner: least summed time among kernels that passed at every token count."""
    bucket = Bucket(tokens=list(tokens))
    if not tokens:
        return bucket
    for name in usable:
        results = [measured[t].get(name) for t in tokens]
        bad = next((r for r in results if not isinstance(r, float)), None)
        if bad is not None:
            bucket.excluded[name] = str(bad)
        else:
            bucket.times[name] = float(sum(results))
    if not bucket.times:
        return bucket
    safe = {k: v for k, v in bucket.times.items() if k not in syncs}
    pool = safe or bucket.times
    for name in bucket.times:
        if name not in pool:
            bucket.excluded[name] = f"not CUDA-graph safe ({syncs[name]})"
    order = {name: i for i, name in enumerate(usable)}  # ties: the static priority order
    bucket.kernel = min(pool, key=lambda k: (pool[k], order[k]))
    bucket.us = pool[bucket.kernel]
    return bucket
