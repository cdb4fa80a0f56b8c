"""Per-token-count dispatch: the fastest experts kernel for each bucket of token counts.

``moe tune --model M`` (or ``moe_plan(spec, device, tune=True)``) times every experts
kernel that supports the spec on this device at one token count per bucket
(:data:`BUCKETS`: 1, 2-8, 9-32, 33-128, 129-512, 513-2048, > 2048), after checking
each against the float64 reference, and writes a :class:`DispatchTable`:

- file ``<dispatch dir>/<device name>.json`` (:func:`dispatch_dir`: ``$MOE_DISPATCH_DIR``,
  else ``$XDG_CACHE_HOME/moe_core/dispatch``, else ``~/.cache/moe_core/dispatch``),
  one entry per spec (:func:`spec_key`), each recording the device name and the
  versions it was tuned with (:func:`environment_versions`: torch, triton, moe-core,
  every loaded plugin);
- ``moe_plan`` loads the entry for its spec and device (unless ``dispatch=False`` or
  ``MOE_DISPATCH=0``); an entry tuned on another device or with other versions is
  ignored with a :class:`StaleDispatchWarning`, as is one naming a kernel that is
  not usable now. Without a table, the static priorities choose, as before.

Timing follows ``moe bench`` (:mod:`moe_core.bench.suite`): inputs and weights
rotated through enough copies to exceed the L2 cache, CUDA events, and for
T <= 128 also CUDA-graph replay (the faster of the two counts); ``perf_counter``
on the CPU. On a GPU, a kernel that synchronises with the host (the reference)
enters the table only for a bucket where no kernel that does not passed, so a
tuned plan stays capturable in CUDA graphs whenever a capturable kernel exists.
A kernel that raises or misses the reference bound is left out of its bucket.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .device import DeviceInfo, device_info
from .errors import MoEInputError
from .spec import MoESpec

__all__ = [
    "BUCKETS",
    "DEFAULT_TOKENS",
    "FORMAT",
    "Bucket",
    "DispatchTable",
    "StaleDispatchWarning",
    "bucket_index",
    "device_name",
    "dispatch_dir",
    "environment_versions",
    "find_table",
    "load_table",
    "measure_plans",
    "save_table",
    "spec_key",
    "table_path",
    "tune_dispatch",
]

#: ``(lowest T, highest T or None)`` of each bucket
BUCKETS: tuple[tuple[int, int | None], ...] = (
    (1, 1),
    (2, 8),
    (9, 32),
    (33, 128),
    (129, 512),
    (513, 2048),
    (2049, None),
)
_UPPER = tuple(hi for _, hi in BUCKETS[:-1])  # 1, 8, 32, 128, 512, 2048
#: the token count timed per bucket by default (the bucket's top; > 2048: 8192), as ``moe bench``'s
DEFAULT_TOKENS: tuple[int, ...] = (1, 8, 32, 128, 512, 2048, 8192)
FORMAT = 1


def bucket_index(num_tokens: int) -> int:
    """Index into :data:`BUCKETS` of a token count ``>= 1`` (host integers only, no device sync)."""
    return bisect.bisect_left(_UPPER, num_tokens)


def bucket_label(index: int) -> str:
    lo, hi = BUCKETS[index]
    return f">{lo - 1}" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


class StaleDispatchWarning(UserWarning):
    """A dispatch table was found but not used (other device or versions, or an unusable kernel)."""


@dataclass
class Bucket:
    """One bucket of a :class:`DispatchTable`.

    Attributes:
        kernel: the fastest kernel that passed, or ``None`` (not measured: static choice).
        us: its time (summed over ``tokens``), microseconds.
        tokens: the token counts timed.
        times: every kernel that passed: summed time, microseconds.
        excluded: kernels left out of this bucket, and why (wrong, raised, synchronises).
    """

    kernel: str | None = None
    us: float | None = None
    tokens: list[int] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


@dataclass
class DispatchTable:
    """Which experts kernel runs each bucket of token counts, for one spec on one device.

    Attributes:
        key: :func:`spec_key` of the spec.
        spec: the spec's ``describe()``.
        device: :func:`device_name` of the device it was tuned on.
        versions: :func:`environment_versions` when tuned.
        buckets: one :class:`Bucket` per entry of :data:`BUCKETS`.
        measured: every measurement, ``{T: {kernel: us or reason}}``.
        created: ISO time of tuning.
        method: how it was timed (one line).
        path: the file it was read from or written to (not stored).
    """

    key: str
    spec: str
    device: str
    versions: dict[str, str | None]
    buckets: list[Bucket]
    measured: dict[int, dict[str, float | str]] = field(default_factory=dict)
    created: str = ""
    method: str = ""
    path: str | None = field(default=None, compare=False)

    @property
    def kernels(self) -> list[str | None]:
        """The kernel of each bucket (``None``: not measured)."""
        return [b.kernel for b in self.buckets]

    def distinct(self) -> list[str]:
        """The distinct kernels the table names, in bucket order."""
        return list(dict.fromkeys(k for k in self.kernels if k is not None))

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "device": self.device,
            "versions": self.versions,
            "created": self.created,
            "method": self.method,
            "buckets": [
                {
                    "bucket": bucket_label(i),
                    "lo": BUCKETS[i][0],
                    "hi": BUCKETS[i][1],
                    "kernel": b.kernel,
                    "us": b.us,
                    "tokens": b.tokens,
                    "times": b.times,
                    "excluded": b.excluded,
                }
                for i, b in enumerate(self.buckets)
            ],
            "measured": {str(t): m for t, m in self.measured.items()},
        }

    @classmethod
    def from_json(cls, key: str, data: dict[str, Any], path: str | None = None) -> DispatchTable:
        rows = data["buckets"]
        if [(r["lo"], r["hi"]) for r in rows] != list(BUCKETS):
            raise ValueError("buckets differ from this moe-core's")
        buckets = [
            Bucket(
                r.get("kernel"),
                r.get("us"),
                list(r.get("tokens", [])),
                dict(r.get("times", {})),
                dict(r.get("excluded", {})),
            )
            for r in rows
        ]
        return cls(
            key=key,
            spec=data.get("spec", ""),
            device=data["device"],
            versions=dict(data["versions"]),
            buckets=buckets,
            measured={int(t): m for t, m in data.get("measured", {}).items()},
            created=data.get("created", ""),
            method=data.get("method", ""),
            path=path,
        )

    def describe(self) -> list[str]:
        """Lines for ``plan.explain()``: bucket -> kernel, time, and the runners-up."""
        lines = []
        for i, b in enumerate(self.buckets):
            label = f"T {bucket_label(i)}".ljust(12)
            if b.kernel is None:
                lines.append(f"  {label} not tuned (static choice)")
                continue
            others = sorted((us, k) for k, us in b.times.items() if k != b.kernel)
            rest = ", ".join(f"{k} {us:.1f}" for us, k in others)
            at = ",".join(map(str, b.tokens))
            lines.append(
                f"  {label} {b.kernel}  {b.us:.1f} us at T={at}" + (f"  (vs {rest})" if rest else "")
            )
        return lines


# -- where tables live ------------------------------------------------------------------------


def dispatch_dir() -> Path:
    """``$MOE_DISPATCH_DIR``, else ``$XDG_CACHE_HOME/moe_core/dispatch``, else ``~/.cache/moe_core/dispatch``."""
    explicit = os.environ.get("MOE_DISPATCH_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "moe_core" / "dispatch"


def device_name(info: DeviceInfo) -> str:
    """The name tables are keyed by: the GPU's name (``NVIDIA H200``), ``cpu-<machine>`` on the CPU."""
    if info.vendor == "cpu":
        return f"cpu-{platform.machine() or 'unknown'}"
    return info.name or info.arch


def table_path(name: str, folder: Path | str | None = None) -> Path:
    """The file holding ``name``'s tables."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"
    return Path(folder if folder is not None else dispatch_dir()) / f"{safe}.json"


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_versions() -> dict[str, str | None]:
    """torch, triton, moe-core and every loaded plugin's version (``plugin:<name>``)."""
    from .plugins import plugin_manager

    versions: dict[str, str | None] = {
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "moe-core": _dist_version("moe-core"),
    }
    for name, record in sorted(plugin_manager().records.items()):
        if record.status == "loaded":
            versions[f"plugin:{name}"] = record.version
    return versions


def spec_key(spec: MoESpec) -> str:
    """A stable key for ``spec``: its description and a hash of every field."""
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:12]
    return f"{spec.describe()} #{digest}"


def enabled() -> bool:
    """False when ``MOE_DISPATCH`` is ``0``/``off``/``false``/``no`` (tables are then not loaded)."""
    return os.environ.get("MOE_DISPATCH", "").strip().lower() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=32)
def _read(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _read_file(path: Path) -> dict[str, Any] | None:
    """The file's JSON, ``None`` when there is no file; raises ``OSError``/``ValueError`` if unreadable."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _read(str(path), st.st_mtime_ns, st.st_size)


def find_table(
    spec: MoESpec, device: DeviceInfo | torch.device | str | None = None, folder: Path | str | None = None
) -> tuple[DispatchTable | None, str | None]:
    """``(table, None)``, ``(None, None)`` when there is none, or ``(None, why it is ignored)``."""
    info = device_info(device)
    name = device_name(info)
    path = table_path(name, folder)
    try:
        data = _read_file(path)
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if data is None:
        return None, None
    key = spec_key(spec)
    entry = data.get("entries", {}).get(key)
    if entry is None:
        return None, None
    try:
        table = DispatchTable.from_json(key, entry, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"{path} [{key}] is malformed ({exc})"
    if table.device != name:
        return None, f"{path} [{key}] was tuned on {table.device!r}, this device is {name!r}"
    now = environment_versions()
    if table.versions != now:
        diff = ", ".join(
            f"{k} {table.versions.get(k)} -> {now.get(k)}"
            for k in sorted(set(now) | set(table.versions))
            if table.versions.get(k) != now.get(k)
        )
        return None, f"{path} [{key}] was tuned with other versions ({diff})"
    return table, None


def load_table(
    spec: MoESpec, device: DeviceInfo | torch.device | str | None = None, folder: Path | str | None = None
) -> DispatchTable | None:
    """The table for ``spec`` on ``device``, or ``None`` (none, or stale: a :class:`StaleDispatchWarning`)."""
    table, why = find_table(spec, device, folder)
    if why is not None:
        warnings.warn(f"dispatch table {why}; ignored (run `moe tune` again)", StaleDispatchWarning, 2)
    return table


def save_table(table: DispatchTable, folder: Path | str | None = None) -> Path:
    """Merge ``table`` into its device's file (atomically) and return the path; sets ``table.path``."""
    path = table_path(table.device, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = _read_file(path) or {}
    except (OSError, ValueError):  # unreadable: replaced
        data = {}
    if data.get("format") != FORMAT:
        data = {}
    data = {"format": FORMAT, "device": table.device, "entries": dict(data.get("entries", {}))}
    data["entries"][table.key] = table.to_json()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    table.path = str(path)
    return path


def unusable_reason(table: DispatchTable, spec: MoESpec, usable: Sequence[str]) -> str | None:
    """Why ``table`` cannot be used for ``spec`` with these usable kernels, or ``None``."""
    if table.key != spec_key(spec):
        return f"it is for {table.spec!r}, the plan's spec is {spec.describe()!r}"
    missing = [k for k in table.distinct() if k not in usable]
    if missing:
        return f"kernel(s) {', '.join(missing)} are not usable now (not loaded or refused)"
    return None


# -- tuning ---------------------------------------------------------------------------------------

Progress = Callable[[str, int, int], None]


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
        tokens: token counts to time (default :data:`DEFAULT_TOKENS`, one per bucket);
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
    by_bucket = _tokens_by_bucket(tokens or DEFAULT_TOKENS)
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
