"""moe-plugin-amd is discovered through its entry point and loads cleanly."""

from __future__ import annotations

from importlib import metadata

import pytest

from moe_core.plugins import plugin_manager

pytest.importorskip("moe_plugin_amd")


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="moe_core.plugins")}
    assert eps.get("amd") == "moe_plugin_amd.plugin"


def test_loads_and_reports():
    manager = plugin_manager()
    record = manager.records["amd"]
    assert record.status == "loaded", record.error
    assert record.distribution == "moe-plugin-amd"
    assert record.version == metadata.version("moe-plugin-amd")
    assert "register_kernels" in record.hooks
    assert manager.environment_reports()["amd"]["version"] == record.version
    assert all(manager.registry.get(k).plugin == "amd" for k in record.kernels)


def test_kernels_and_hooks():
    manager = plugin_manager()
    record = manager.records["amd"]
    assert set(record.kernels) == {
        "amd.triton.moe_sorting",
        "amd.triton.moe_sorting.hip",
        "amd.gluon.mxfp4",
        "amd.aiter.fused_moe",
        "amd.aiter.moe_sorting",
    }
    assert {"register_kernels", "register_commands", "environment_report"} <= set(record.hooks)
    report = manager.environment_reports()["amd"]
    assert report["kernels"] == len(record.kernels) and "aiter" in report
