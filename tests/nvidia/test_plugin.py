"""moe-plugin-nvidia is discovered through its entry point and loads cleanly."""

from __future__ import annotations

from importlib import metadata

import pytest

from moe_core.plugins import plugin_manager

pytest.importorskip("moe_plugin_nvidia")


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="moe_core.plugins")}
    assert eps.get("nvidia") == "moe_plugin_nvidia.plugin"


def test_loads_and_reports():
    manager = plugin_manager()
    record = manager.records["nvidia"]
    assert record.status == "loaded", record.error
    assert record.distribution == "moe-plugin-nvidia"
    assert record.version == metadata.version("moe-plugin-nvidia")
    assert "register_kernels" in record.hooks
    assert manager.environment_reports()["nvidia"]["version"] == record.version
    assert all(manager.registry.get(k).plugin == "nvidia" for k in record.kernels)


def test_registers_three_kernels_without_importing_flashinfer():
    import subprocess
    import sys

    names = set(plugin_manager().records["nvidia"].kernels)
    assert names == {"nvidia.flashinfer.cutlass", "nvidia.flashinfer.trtllm", "nvidia.flashinfer.cute_dsl"}
    code = (
        "import sys, torch, moe_core; from moe_core.plugins import plugin_manager; plugin_manager().environment_reports();"
        "moe_core.moe_plan(moe_core.MoESpec(8, 2, 64, 64), 'sm_90'); assert 'flashinfer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moe_nvidia_build_command(monkeypatch, capsys):
    from moe_core.cli import build_parser

    args = build_parser().parse_args(
        ["nvidia", "build", "--quant", "bf16,fp8", "--jobs", "3", "--no-install"]
    )
    assert (args.arch, args.quant, args.jobs, args.no_install) == ("9.0a", "bf16,fp8", 3, True)
    seen = {}

    def fake_build(arch, quants, **kw):
        seen.update(kw, arch=arch, quants=quants)
        raise SystemExit(0)

    import moe_plugin_nvidia.aot.build as b

    monkeypatch.setattr(b, "build_module", fake_build)
    with pytest.raises(SystemExit):
        args.func(args)
    assert seen["quants"] == "bf16,fp8" and seen["jobs"] == 3 and seen["install"] is False


def test_doctor_reports_flashinfer_state():
    report = plugin_manager().environment_reports()["nvidia"]
    assert {"flashinfer", "prebuilt_modules", "tune_tables", "flashinfer_jit_cache"} <= set(report)


def test_tune_hook_declines_without_an_nvidia_gpu():
    from moe_core import MoESpec
    from moe_plugin_nvidia import plugin

    spec = MoESpec(8, 2, 64, 64)
    assert plugin.tune(spec=spec, device="cpu", tokens=[1], output_dir=None, progress=lambda *a: None) is None
    assert (
        plugin.tune(spec=spec, device="sm_90", tokens=[1], output_dir=None, progress=lambda *a: None) is None
    )
