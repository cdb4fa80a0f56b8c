"""Where FlashInfer is and which prebuilt modules it has, without importing it.

Importing ``flashinfer`` pulls in torch, CUDA bindings and more; the planner
and ``moe doctor`` only need to know whether it is installed, its version, and
whether the module a kernel needs is already built (FlashInfer's AOT slot
``<package>/data/aot/<module>/<module>.so``, a ``flashinfer-jit-cache``
package, or FlashInfer's JIT cache under ``FLASHINFER_WORKSPACE_BASE``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .aot.manifest import Manifest, read_manifest

__all__ = [
    "MIN_FLASHINFER",
    "PrebuiltModule",
    "aot_slot",
    "flashinfer_dir",
    "flashinfer_version",
    "prebuilt_module",
    "version_tuple",
]

#: Oldest FlashInfer whose ``cutlass_fused_moe`` signature this plugin was written against.
MIN_FLASHINFER = (0, 7, 2)


@functools.cache
def flashinfer_dir() -> Path | None:
    """The ``flashinfer`` package folder, or ``None`` when not installed (not imported)."""
    try:
        spec = importlib.util.find_spec("flashinfer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def flashinfer_version() -> str | None:
    """Installed ``flashinfer-python`` version, or ``None``."""
    if flashinfer_dir() is None:
        return None
    try:
        return importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        path = flashinfer_dir() / "_build_meta.py"  # type: ignore[operator]
        try:
            for line in path.read_text().splitlines():
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
        except OSError:
            pass
        return "0.0.0+unknown"


def version_tuple(version: str | None) -> tuple[int, ...]:
    """``"0.7.2.post1"`` -> ``(0, 7, 2)``; ``()`` for ``None`` or unparsable."""
    if not version:
        return ()
    out: list[int] = []
    for part in version.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


def aot_slot(module: str) -> Path | None:
    """FlashInfer's AOT path for ``module`` (``data/aot/<m>/<m>.so``), or ``None`` without FlashInfer."""
    base = flashinfer_dir()
    return None if base is None else base / "data" / "aot" / module / f"{module}.so"


def _jit_cache_paths(module: str) -> list[Path]:
    base = Path(os.environ.get("FLASHINFER_WORKSPACE_BASE", str(Path.home())))
    root = base / ".cache" / "flashinfer"
    version = flashinfer_version() or ""
    if not (root / version).is_dir():
        return []
    return sorted((root / version).glob(f"*/cached_ops/{module}/{module}.so"))


@dataclass(frozen=True)
class PrebuiltModule:
    """A built FlashInfer module found on disk: path, where it came from, and our manifest if any."""

    module: str
    path: Path
    source: str  # "aot" (FlashInfer's AOT slot), "jit-cache" (flashinfer-jit-cache), "jit" (JIT cache dir)
    manifest: Manifest | None

    def has_quant(self, quant: str) -> bool:
        """True when the module contains ``quant``'s kernels (no manifest: FlashInfer's full build)."""
        return self.manifest is None or quant in self.manifest.quants


def prebuilt_module(module: str) -> PrebuiltModule | None:
    """The built ``module`` FlashInfer would load without compiling, or ``None``.

    Order as FlashInfer's loader: its AOT slot, then ``flashinfer-jit-cache``;
    a JIT-cache build from an earlier run also counts (FlashInfer re-runs ninja
    on it, which needs nvcc but compiles nothing when it is up to date).
    """
    slot = aot_slot(module)
    if slot is not None and slot.exists():
        return PrebuiltModule(module, slot, "aot", read_manifest(slot.parent))
    if importlib.util.find_spec("flashinfer_jit_cache") is not None:
        return PrebuiltModule(module, Path("flashinfer_jit_cache"), "jit-cache", None)
    for path in _jit_cache_paths(module):
        return PrebuiltModule(module, path, "jit", read_manifest(path.parent))
    return None
