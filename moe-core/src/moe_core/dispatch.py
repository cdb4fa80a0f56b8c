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
import functools
import hashlib
import json
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


# the tuning half (imports the names above)
from .dispatch_tuning import measure_plans, tune_dispatch  # noqa: E402
