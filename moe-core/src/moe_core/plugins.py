"""Plugin discovery and loading.

Plugins are found through the entry-point group ``moe_core.plugins`` and loaded
on first use (never at ``import moe_core``), each entry point on its own: one
that fails to import or to register is recorded with its traceback and
skipped. Environment variables (read when plugins load):

``MOE_LOAD_PLUGINS``
    unset: load every discovered plugin; empty: load none; ``a,b``: only those.
``MOE_DISABLE_PLUGINS``
    ``a,b``: skip those.
``MOE_STRICT_PLUGINS``
    ``1``: a plugin failure raises :class:`moe_core.PluginError` instead.

The core's own ``reference`` kernels are always loaded.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import os
import threading
import traceback
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import KernelEntry, Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginManager",
    "PluginRecord",
    "load_plugins",
    "plugin_manager",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "moe_core.plugins"
BUILTIN = "reference"


@dataclass
class PluginRecord:
    """What happened to one plugin: ``loaded``, ``failed`` or ``disabled``."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "pending"
    error: str | None = None
    kernels: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _dist_version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _strict() -> bool:
    return os.environ.get("MOE_STRICT_PLUGINS", "") in ("1", "true", "yes")


class PluginManager:
    """Discovers, loads and records plugins, filling a :class:`Registry`."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.presets: dict[str, Any] = {}
        self.records: dict[str, PluginRecord] = {}
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._lock = threading.RLock()

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Load the built-in reference and every enabled entry point, once."""
        with self._lock:
            if self._loaded:
                return
            from . import reference

            core = PluginRecord(BUILTIN, reference.__name__, "moe-core", _dist_version("moe-core"))
            self.load_module(BUILTIN, reference, record=core)
            only = _env_list("MOE_LOAD_PLUGINS")
            disabled = set(_env_list("MOE_DISABLE_PLUGINS") or [])
            seen: set[str] = {BUILTIN}
            for ep in sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                if ep.name in seen:
                    continue
                seen.add(ep.name)
                dist = getattr(ep, "dist", None)
                record = PluginRecord(
                    ep.name,
                    ep.value,
                    distribution=dist.metadata["Name"] if dist is not None else None,
                    version=dist.version if dist is not None else None,
                )
                if (only is not None and ep.name not in only) or ep.name in disabled:
                    record.status = "disabled"
                    self.records[ep.name] = record
                    continue
                try:
                    module = ep.load()
                except Exception as exc:
                    self._fail(record, exc)
                    continue
                self.load_module(ep.name, module, record=record)
            self._loaded = True

    def load_module(
        self, name: str, module: ModuleType | object, *, record: PluginRecord | None = None
    ) -> PluginRecord:
        """Register ``module``'s hook implementations as plugin ``name`` and collect its kernels.

        Atomic: if registration or a hook fails, nothing of the plugin is kept.
        Also usable directly (tests, engines embedding a private backend).
        """
        record = record or PluginRecord(name, getattr(module, "__name__", repr(module)))
        with self._lock:
            try:
                self._pm.register(module, name=name)
            except Exception as exc:
                return self._fail(record, exc)
            record.hooks = sorted(h.name for h in self._pm.get_hookcallers(module) or [])
            entries: list[KernelEntry] = []
            presets: list[Any] = []
            try:
                self._call(name, "register_kernels", register=lambda e: entries.append(_check_entry(e)))
                self._call(name, "register_presets", register=presets.append)
                for entry in entries:
                    self.registry.add(entry, name)
                for preset in presets:
                    if preset.name in self.presets:
                        raise ValueError(f"preset {preset.name!r} is already registered")
                    self.presets[preset.name] = preset
            except Exception as exc:
                self.registry.remove_plugin(name)
                for preset in presets:
                    if self.presets.get(preset.name) is preset:
                        del self.presets[preset.name]
                self._pm.unregister(name=name)
                return self._fail(record, exc)
            record.kernels = [e.name for e in entries]
            record.presets = [p.name for p in presets]
            record.status = "loaded"
            self.records[name] = record
            return record

    def _call(self, plugin: str, hook: str, **kwargs: Any) -> list[Any]:
        """Call ``hook`` of one plugin only, so another plugin's failure cannot interfere."""
        results = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            if impl.plugin_name == plugin:
                results.append(impl.function(**{k: kwargs[k] for k in impl.argnames}))
        return results

    def environment_reports(self) -> dict[str, Any]:
        """Each loaded plugin's ``environment_report``, errors included as text."""
        reports: dict[str, Any] = {}
        for name, record in self.records.items():
            if record.status != "loaded":
                continue
            try:
                found = [r for r in self._call(name, "environment_report") if r]
            except Exception as exc:
                found = [{"error": f"{type(exc).__name__}: {exc}"}]
            if found:
                reports[name] = found[0]
        return reports

    def tune(self, plugins: list[str] | None = None, **kwargs: Any) -> dict[str, list[str] | None]:
        """Call the ``tune`` hook of each loaded plugin (or of ``plugins``); paths written per plugin."""
        written: dict[str, list[str] | None] = {}
        for name, record in self.records.items():
            if record.status == "loaded" and (plugins is None or name in plugins) and "tune" in record.hooks:
                for result in self._call(name, "tune", **kwargs):
                    written[name] = result
        return written

    def _fail(self, record: PluginRecord, exc: BaseException) -> PluginRecord:
        record.status = "failed"
        record.error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.records[record.name] = record
        if _strict():
            raise PluginError(f"plugin {record.name!r} ({record.module}) failed to load: {exc}") from exc
        return record


def _check_entry(entry: Any) -> KernelEntry:
    if not isinstance(entry, KernelEntry):
        raise TypeError(f"register() takes a moe_core.KernelEntry, got {type(entry).__name__}")
    return entry


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def plugin_manager() -> PluginManager:
    """The process-wide manager, with plugins loaded."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
    _manager.load()
    return _manager


def load_plugins() -> list[PluginRecord]:
    """Load plugins now (normally done on first use) and return their records."""
    return list(plugin_manager().records.values())


def reset_plugins() -> None:
    """Forget loaded plugins; the next use loads them again (reads the env vars again)."""
    global _manager
    with _manager_lock:
        _manager = None
