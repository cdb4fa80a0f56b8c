"""Timing shared by ``moe bench`` and the benchmark scripts; every function returns microseconds.

On CUDA (the current device):

- :func:`events_median`: calls queued back to back with one event pair each and one
  sync at the end (as ``triton.testing.do_bench``): a call whose launch costs less
  than its device time is timed by the device.
- :func:`graph_median` (:func:`graph_times` with the samples): one CUDA graph per callable,
  replayed in turn (rotated inputs).
- :func:`launch_costs`: host time per call, eager device time and graph replay time.

On the CPU: :func:`cpu_median`, the median of ``time.perf_counter`` around each call.
:func:`median_us` picks the one for a device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "cpu_median",
    "events_median",
    "graph_median",
    "graph_times",
    "launch_costs",
    "median_us",
    "rotating",
]


def events_median(fn: Callable[[], object], iters: int) -> tuple[float, list[float]]:
    """Median device time of ``fn`` and every sample: iterations queued, one event pair each."""
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e3 for start, end in events]
    return statistics.median(times), times


def cpu_median(fn: Callable[[], object], iters: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` on the host (``perf_counter`` around each call) and every sample."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), times


def median_us(fn: Callable[[], object], iters: int, device: torch.device | str) -> tuple[float, list[float]]:
    """:func:`events_median` on a CUDA (or ROCm) device, :func:`cpu_median` elsewhere."""
    if torch.device(device).type == "cuda":
        return events_median(fn, iters)
    return cpu_median(fn, iters)


def graph_median(fns: Sequence[Callable[[], object]], iters: int) -> float:
    """Median time of replaying one CUDA graph per callable of ``fns`` in turn."""
    return graph_times(fns, iters)[0]


def graph_times(fns: Sequence[Callable[[], object]], iters: int) -> tuple[float, list[float]]:
    """:func:`graph_median` and every sample."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (allocator, JIT)
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    replay = rotating(lambda i: graphs[i].replay(), len(graphs))
    for _ in range(5):
        replay()
    return events_median(replay, iters)


def rotating(fn: Callable[[int], object], copies: int) -> Callable[[], None]:
    """``fn(i)`` for i = 1, 2, ... modulo ``copies``, as a no-argument callable."""
    state = {"i": 0}

    def call() -> None:
        state["i"] = (state["i"] + 1) % copies
        fn(state["i"])

    return call


def launch_costs(fn: Callable[[], object], iters: int = 200) -> dict[str, float]:
    """``host_us`` (host time per call, queued without a sync), ``eager_us``, ``graph_us``."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    eager, _ = events_median(fn, iters)
    return {"host_us": host, "eager_us": eager, "graph_us": graph_median([fn], iters)}
