"""moe-plugin-portable is discovered through its entry point and loads cleanly."""

from __future__ import annotations

from importlib import metadata

import pytest

from moe_core.plugins import plugin_manager

pytest.importorskip("moe_plugin_portable")


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="moe_core.plugins")}
    assert eps.get("portable") == "moe_plugin_portable.plugin"


def test_loads_and_reports():
    manager = plugin_manager()
    record = manager.records["portable"]
    assert record.status == "loaded", record.error
    assert record.distribution == "moe-plugin-portable"
    assert record.version == metadata.version("moe-plugin-portable")
    assert "register_kernels" in record.hooks
    assert manager.environment_reports()["portable"]["version"] == record.version
    assert all(manager.registry.get(k).plugin == "portable" for k in record.kernels)


def test_doctor_lists_shipped_tuned_tables(tmp_path, monkeypatch):
    report = plugin_manager().environment_reports()["portable"]["tuned_config_tables"]
    folder, layers = report["tables"]["NVIDIA_H100_80GB_HBM3.json"]
    assert layers >= 6 and folder.endswith("configs")
    (tmp_path / "Fake_GPU.json").write_text('{"device": "Fake GPU", "configs": {}}')
    monkeypatch.setenv("MOE_PORTABLE_CONFIG_DIR", str(tmp_path))
    from moe_plugin_portable.configs import tuned_tables

    assert tuned_tables()["tables"]["Fake_GPU.json"] == [str(tmp_path), 0]
