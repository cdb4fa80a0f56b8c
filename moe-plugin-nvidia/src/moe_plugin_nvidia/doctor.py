"""``moe doctor`` facts of this plugin (cheap: no FlashInfer import, no compile, no download)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from .flashinfer_env import aot_slot, flashinfer_dir, flashinfer_version, prebuilt_module

__all__ = ["report"]

_MODULES = ("fused_moe_90", "fused_moe_100", "fused_moe_103", "fused_moe_120")


def _tables() -> list[str]:
    from .tuning import _dirs

    return sorted(str(p) for d in _dirs() if d.is_dir() for p in d.glob("*.json"))


def report(version: str) -> dict[str, Any]:
    """Version, FlashInfer (version, path), each cutlass module's build state, tune tables, env vars."""
    modules: dict[str, Any] = {}
    for m in _MODULES:
        found = prebuilt_module(m)
        if found is None:
            if m == "fused_moe_90" and flashinfer_dir() is not None:
                modules[m] = f"not built (expected at {aot_slot(m)}; run `moe nvidia build`)"
            continue
        info: dict[str, Any] = {"path": str(found.path), "source": found.source}
        if found.manifest is not None:
            info.update(
                quants=found.manifest.quants,
                arch=found.manifest.arch,
                flashinfer=found.manifest.flashinfer_version,
                built_at=found.manifest.built_at,
            )
        else:
            info["quants"] = "all (FlashInfer's own build)"
        modules[m] = info
    return {
        "version": version,
        "kernels": 3,
        "flashinfer": flashinfer_version(),
        "flashinfer_path": str(flashinfer_dir()) if flashinfer_dir() else None,
        "flashinfer_jit_cache": importlib.util.find_spec("flashinfer_jit_cache") is not None,
        "flashinfer_cubin": importlib.util.find_spec("flashinfer_cubin") is not None,
        "prebuilt_modules": {k: v for k, v in modules.items() if v is not None},
        "tune_tables": _tables(),
        "env": {
            k: os.environ[k]
            for k in (
                "MOE_NVIDIA_ALLOW_JIT",
                "MOE_NVIDIA_TUNE_DIR",
                "MOE_NVIDIA_BUILD_DIR",
                "FLASHINFER_WORKSPACE_BASE",
                "FLASHINFER_CUDA_ARCH_LIST",
            )
            if k in os.environ
        },
    }
