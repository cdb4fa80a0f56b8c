"""The tune cache: FlashInfer's chosen cutlass tactics per (GPU, layer, token bucket), as JSON.

FlashInfer's autotuner lives in process memory and takes 26-88 s per shape;
its untuned default tactic is 4-5x slower at T >= 32. ``moe tune`` times the
tactics once per token bucket (GEMM 1 and GEMM 2, absolute indices of the
runner's tactic list: GEMM 2's follow GEMM 1's; timed by CUDA-graph replay up to
:data:`GRAPH_TOKENS` tokens, by CUDA events above, rotating through
``moe_core.bench.cold_routings`` routings so that the weights come from memory, not
from the L2 cache one routing's experts fit in) and writes the fastest here;
at run time :func:`lookup` hands them to ``cutlass_fused_moe(profile_ids=[g1, g2])``,
which skips the autotuner.

The tactics are timed through the real call (:func:`search_tactics`), not through
FlashInfer's autotuner: with a module built for some schemes only (``moe nvidia
build``), the autotuner's profiling path fails for every tactic (measured on the
H200: all 45 GEMM-1 and 81 GEMM-2 tactics "unsupported") and leaves the slow
default, while every tactic runs when passed as ``profile_ids``.

File: ``<dir>/<GPU name>.json`` (spaces -> ``_``)::

    {"format": 1, "device": "NVIDIA H200", "flashinfer": "0.7.2",
     "layers": {"<layer key>": {"buckets": {"1": [g1, g2], "32": [...]},
                                "tuned_at": "...", "seconds": 41.2}}}

Directories read, first hit wins: ``$MOE_NVIDIA_TUNE_DIR``, the user cache
``~/.cache/moe-kernels/nvidia/tuned``, the tables shipped in this package
(``configs/``). ``moe tune`` writes to ``$MOE_NVIDIA_TUNE_DIR`` or the user
cache unless given a folder. A token count uses the largest tuned bucket not
above it (the smallest bucket below all of them).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_core import MoESpec

__all__ = [
    "DEFAULT_TOKENS",
    "cache_path",
    "clear_cache",
    "layer_key",
    "lookup",
    "merge_table",
    "pick",
    "picker",
    "read_table",
    "resolve",
    "search_tactics",
    "table_name",
    "tune_layer",
]

FORMAT = 1
#: Up to this many tokens the tactics are timed by CUDA-graph replay: an eager call there is bound
#: by FlashInfer's host time, which hides the tactic's GPU time (measured on the H200: eager-tuned
#: T=1 tactics 1.2-1.6x slower in a graph than the default one).
GRAPH_TOKENS = 128

#: Token buckets ``moe tune`` tunes by default (decode to prefill).
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_PACKAGE_DIR = Path(__file__).parent / "configs"


def table_name(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"NVIDIA_H200.json"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name.strip()) + ".json"


def _dirs() -> list[Path]:
    out = []
    env = os.environ.get("MOE_NVIDIA_TUNE_DIR")
    if env:
        out.append(Path(env))
    out.append(Path.home() / ".cache" / "moe-kernels" / "nvidia" / "tuned")
    out.append(_PACKAGE_DIR)
    return out


def default_write_dir() -> Path:
    env = os.environ.get("MOE_NVIDIA_TUNE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moe-kernels" / "nvidia" / "tuned"


def cache_path(device_name: str = "") -> str:
    """Where tables are looked up (for messages)."""
    name = table_name(device_name) if device_name else "<GPU>.json"
    return " or ".join(str(d / name) for d in _dirs())


def layer_key(spec: MoESpec) -> str:
    """Everything FlashInfer's tactic choice depends on: local experts, sizes, dtypes, activation, bias."""
    return (
        f"E={spec.num_local_experts},k={spec.top_k},H={spec.hidden_size},I={spec.intermediate_size},"
        f"act={spec.activation},dtype={str(spec.dtype).removeprefix('torch.')},quant={spec.quant},"
        f"bias={int(spec.has_bias)}"
    )


def read_table(path: Path) -> dict[str, Any] | None:
    """A table file, or ``None`` when absent, unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        return None
    return data


_TABLES: dict[str, list[dict[str, Any]]] = {}
_RESOLVED: dict[tuple[str, str], Any] = {}


def clear_cache() -> None:
    """Forget loaded tables (after ``moe tune`` wrote one, or in tests)."""
    _TABLES.clear()
    _RESOLVED.clear()


def _tables(device_name: str) -> list[dict[str, Any]]:
    if device_name not in _TABLES:
        found = [read_table(d / table_name(device_name)) for d in _dirs()] if device_name else []
        _TABLES[device_name] = [t for t in found if t is not None]
    return _TABLES[device_name]


Resolved = tuple[list[int], list[list[int]]]


def resolve(spec: MoESpec, device_name: str) -> Resolved | None:
    """The tuned buckets of ``spec`` on ``device_name``: ``(sorted token counts, [gemm1, gemm2] each)``."""
    key = (device_name, layer_key(spec))
    if key not in _RESOLVED:
        resolved = None
        for table in _tables(device_name):
            entry = table["layers"].get(key[1])
            if entry and entry.get("buckets"):
                pairs = sorted((int(t), [int(v) for v in ids]) for t, ids in entry["buckets"].items())
                resolved = ([t for t, _ in pairs], [ids for _, ids in pairs])
                break
        _RESOLVED[key] = resolved
    return _RESOLVED[key]


def pick(resolved: Resolved, tokens: int) -> list[int]:
    """The tactics of the largest tuned bucket not above ``tokens`` (the smallest bucket below all)."""
    buckets, ids = resolved
    return ids[max(bisect.bisect_right(buckets, tokens) - 1, 0)]


def picker(resolved: Resolved) -> Callable[[int], list[int]]:
    """:func:`pick` for ``resolved`` as a list lookup (per-call host time: one index)."""
    buckets, ids = resolved
    table = [pick(resolved, t) for t in range(buckets[-1] + 1)]
    last = ids[-1]
    return lambda tokens: table[tokens] if tokens < len(table) else last


def lookup(spec: MoESpec, device_name: str, tokens: int) -> list[int] | None:
    """``[gemm1, gemm2]`` tactics for ``tokens`` rows of ``spec`` on ``device_name``, or ``None`` (untuned)."""
    resolved = resolve(spec, device_name)
    return None if resolved is None else pick(resolved, tokens)


def merge_table(path: Path, device_name: str, flashinfer: str, layers: dict[str, dict[str, Any]]) -> Path:
    """Merge ``layers`` into the table at ``path`` (created if missing); returns ``path``."""
    path = Path(path)
    data = read_table(path) or {
        "format": FORMAT,
        "device": device_name,
        "flashinfer": flashinfer,
        "layers": {},
    }
    if data.get("flashinfer") != flashinfer:  # tactic indices belong to one FlashInfer version
        data = {"format": FORMAT, "device": device_name, "flashinfer": flashinfer, "layers": {}}
    data["layers"].update(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    clear_cache()
    return path


def _invalid(exc: Exception, gemm: int) -> bool:
    """True when ``exc`` is FlashInfer saying the index is past GEMM ``gemm``'s tactic list."""
    return f"Invalid gemm{gemm} profile id" in str(exc)


def search_tactics(
    time_call: Callable[[list[int]], float], limit: int = 1024
) -> tuple[list[int], dict[str, Any]]:
    """The fastest ``[gemm1, gemm2]`` tactics by coordinate search over the real call.

    ``time_call(profile_ids)`` times one call with those tactics (microseconds) or raises.
    GEMM 1's tactics are 0, 1, ... until FlashInfer calls an index invalid, each with GEMM 2
    on its default (-1); GEMM 2's follow (from GEMM 1's count), each with the best GEMM 1.
    A tactic that raises otherwise is skipped. Returns the tactics and a record
    (``{"gemm1": {"count", "failed", "best_us"}, "gemm2": {...}, "default_us"}``).
    """
    record: dict[str, Any] = {"default_us": time_call([-1, -1])}
    best = [-1, -1]
    start = 0
    baseline = record["default_us"]  # the call with this GEMM on its default tactic
    for gemm in (1, 2):
        times: dict[int, float] = {-1: baseline}
        failed, index = 0, start
        while index < start + limit:
            ids = [index, -1] if gemm == 1 else [best[0], index]
            try:
                times[index] = time_call(ids)
            except Exception as exc:  # FlashInfer raises RuntimeError or ValueError
                if _invalid(exc, gemm):
                    break
                failed += 1
            index += 1
        count = index - start
        winner = min(times, key=times.__getitem__)
        best[gemm - 1] = winner
        record[f"gemm{gemm}"] = {"count": count, "failed": failed, "best_us": round(times[winner], 2)}
        baseline = times[winner]  # GEMM 2's: the best GEMM 1 with GEMM 2's default
        start = count  # GEMM 2's indices follow GEMM 1's
    return best, record


def tune_layer(
    spec: MoESpec, device: Any, tokens: Sequence[int], progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Time FlashInfer's cutlass MoE tactics for ``spec`` at each token count; the table entry (GPU only)."""
    import torch

    from moe_core import moe_plan
    from moe_core.bench.floors import cold_routings
    from moe_core.bench.timing import events_median, graph_times, rotating
    from moe_core.testing import random_expert_weights

    from .cutlass import KERNEL, _flashinfer, flashinfer_kwargs, kernel_input

    dev = torch.device(device) if not hasattr(device, "device") else device.device
    plan = moe_plan(spec, dev, backend=KERNEL)
    weights = random_expert_weights(spec, device=dev)
    prepared = plan.prepare(weights)
    fn, act = _flashinfer()
    buckets: dict[str, list[int]] = {}
    searched: dict[str, Any] = {}
    t0 = time.monotonic()
    for i, t in enumerate(tokens):
        if progress:
            progress(f"{layer_key(spec)} T={t}", i, len(tokens))
        kws = []
        for _ in range(cold_routings(spec, t)):  # each its own routing: the weights come from memory
            x = torch.randn(t, spec.hidden_size, device=dev, dtype=spec.dtype)
            logits = torch.randn(t, spec.num_experts, device=dev)
            w, ids = torch.topk(torch.softmax(logits, -1), spec.top_k, dim=-1)
            xin = kernel_input(spec, x, prepared)  # mxfp4: padded to 128 columns, and so is the output
            out = torch.empty(xin.shape, dtype=spec.dtype, device=dev)
            kws.append(
                flashinfer_kwargs(
                    spec, xin, prepared, w, ids.int(), out, act(prepared.meta["activation"]), None
                )
            )

        def time_call(profile_ids: list[int], kws=kws, t=t) -> float:
            calls = [dict(kw, profile_ids=profile_ids) for kw in kws]
            fn(**calls[0])  # warm-up; raises for an invalid or failing tactic
            runs = [lambda call=call: fn(**call) for call in calls]
            if t <= GRAPH_TOKENS:  # eager decode is bound by the host: time the GPU in a graph
                return graph_times(runs, 10)[0]  # (one graph per routing, replayed in turn)
            return events_median(rotating(lambda k, runs=runs: runs[k](), len(runs)), 5)[0]

        buckets[str(t)], searched[str(t)] = search_tactics(time_call)
        searched[str(t)]["routings"] = len(kws)
        torch.cuda.synchronize(dev)
    if progress:
        progress(layer_key(spec), len(tokens), len(tokens))
    return {
        "buckets": buckets,
        "searched": searched,
        "tuned_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
    }
