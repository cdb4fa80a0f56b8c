"""Shared by the nvidia-plugin tests: fake FlashInfer install states, the real FlashInfer when present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moe_plugin_nvidia import _common
from moe_plugin_nvidia.aot.manifest import Manifest
from moe_plugin_nvidia.flashinfer_env import PrebuiltModule

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

#: FlashInfer importable here (CI installs only this repository: the signature tests skip there).
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(
    not HAS_FLASHINFER,
    reason="flashinfer-python not installed (translation checked against its real signature)",
)


def fake_install(
    monkeypatch: pytest.MonkeyPatch, *, version: str | None = "0.7.2", quants=None, built=True
) -> None:
    """Pretend FlashInfer ``version`` is installed (``None``: not installed) with a prebuilt
    ``fused_moe_90`` containing ``quants`` (``None``: FlashInfer's full build; ``built=False``: none)."""
    monkeypatch.setattr(_common, "flashinfer_dir", lambda: None if version is None else "/fake/flashinfer")
    monkeypatch.setattr(_common, "flashinfer_version", lambda: version)

    def prebuilt(module: str):
        if not built:
            return None
        manifest = None if quants is None else Manifest(module, "9.0a", list(quants), version or "")
        return PrebuiltModule(module, f"/fake/{module}.so", "aot", manifest)

    monkeypatch.setattr(_common, "prebuilt_module", prebuilt)
