"""Plugin discovery through real entry points (throwaway dist-info on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import moe_core
from moe_core import MoESpec, PluginError
from moe_core.plugins import plugin_manager

GOOD = """
from moe_core import KernelEntry, hookimpl
from moe_core.reference import _apply, _prepare

@hookimpl
def register_kernels(register):
    register(KernelEntry("good.torch.experts", "experts", _apply, prepare=_prepare,
                         quant={"bf16"}, activations={"silu"}, capability="cpu", priority=5,
                         needs_contiguous=False, description="reference under another name"))

@hookimpl
def environment_report():
    return {"good": True}
"""

BROKEN_IMPORT = """
raise ImportError("libfoo.so: cannot open shared object file")
"""

BROKEN_REGISTER = """
from moe_core import KernelEntry, hookimpl
from moe_core.reference import _apply

@hookimpl
def register_kernels(register):
    register(KernelEntry("badreg.torch.first", "experts", _apply))
    raise RuntimeError("registration exploded")
"""

BAD_ENTRY = """
from moe_core import hookimpl

@hookimpl
def register_kernels(register):
    register({"name": "not-an-entry"})
"""


def _make_dist(root: Path, dist: str, plugins: dict[str, tuple[str, str]]) -> None:
    """A minimal installed distribution: modules + dist-info with entry points."""
    info = root / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = ["[moe_core.plugins]"]
    for ep_name, (module, source) in plugins.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{ep_name} = {module}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_LOAD_PLUGINS")
    _make_dist(
        tmp_path,
        "moe_test_plugins",
        {
            "good": ("moe_test_good", GOOD),
            "broken": ("moe_test_broken", BROKEN_IMPORT),
            "badreg": ("moe_test_badreg", BROKEN_REGISTER),
            "badentry": ("moe_test_badentry", BAD_ENTRY),
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("moe_test_good", "moe_test_broken", "moe_test_badreg", "moe_test_badentry"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return tmp_path


def test_discovery_records_good_and_broken(fake_plugins):
    records = plugin_manager().records
    good = records["good"]
    assert good.status == "loaded" and good.kernels == ["good.torch.experts"]
    assert (good.distribution, good.version) == ("moe_test_plugins", "1.2.3")
    assert "register_kernels" in good.hooks and "environment_report" in good.hooks
    broken = records["broken"]
    assert broken.status == "failed" and "libfoo.so" in broken.error and "Traceback" in broken.error
    badreg = records["badreg"]
    assert badreg.status == "failed" and "registration exploded" in badreg.error
    assert records["badentry"].status == "failed" and "KernelEntry" in records["badentry"].error
    names = [e.name for e in plugin_manager().registry.entries()]
    assert "good.torch.experts" in names and "badreg.torch.first" not in names  # atomic: nothing kept
    assert records["reference"].status == "loaded"
    assert plugin_manager().environment_reports()["good"] == {"good": True}


def test_discovered_kernel_is_planned(fake_plugins, monkeypatch):
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "good")  # the workspace plugins may outrank it
    plan = moe_core.moe_plan(MoESpec(8, 2, 32, 16), "cpu")
    assert plan.kernel == "good.torch.experts"
    assert "reference.torch.experts" in plan.explain()


def test_strict_mode_raises(fake_plugins, monkeypatch):
    monkeypatch.setenv("MOE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"broken|badreg|badentry"):
        plugin_manager()


def test_disable_and_load_lists(fake_plugins, monkeypatch):
    monkeypatch.setenv("MOE_DISABLE_PLUGINS", "broken, badreg,badentry")
    records = plugin_manager().records
    assert records["broken"].status == "disabled" and records["good"].status == "loaded"
    moe_core.reset_plugins()
    monkeypatch.delenv("MOE_DISABLE_PLUGINS")
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "")
    records = plugin_manager().records
    assert records["good"].status == "disabled" and records["reference"].status == "loaded"
    assert moe_core.moe_plan(MoESpec(8, 2, 32, 16), "cpu").kernel == "reference.torch.experts"
    moe_core.reset_plugins()
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "good")
    records = plugin_manager().records
    assert records["good"].status == "loaded" and records["broken"].status == "disabled"


def test_cli_plugins_lists_failures(fake_plugins, capsys):
    from moe_core.cli import main

    assert main(["plugins", "--all"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["broken"]["status"] == "failed" and "libfoo.so" in rows["broken"]["error"]
    assert rows["good"]["kernels"][0]["capability"] == "cpu"
    assert {"name", "version", "hooks", "kernels", "status", "error"} <= set(rows["good"])


def test_duplicate_kernel_name_fails_second_plugin():
    class Dup:
        @moe_core.hookimpl
        def register_kernels(self, register):
            register(moe_core.KernelEntry("reference.torch.experts", "experts", lambda *a: None))

    record = plugin_manager().load_module("dup", Dup())
    assert record.status == "failed" and "already registered" in record.error
    assert plugin_manager().registry.get("reference.torch.experts").plugin == "reference"


def test_import_does_not_load_plugins():
    code = "import moe_core, moe_core.plugins as p; assert p._manager is None; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("vendor", ["portable", "nvidia", "amd"])
def test_workspace_plugins_are_discovered(vendor, monkeypatch):
    if not _installed(f"moe-plugin-{vendor}"):
        pytest.skip(f"moe-plugin-{vendor} not installed in this session")
    monkeypatch.delenv("MOE_LOAD_PLUGINS")
    record = plugin_manager().records[vendor]
    assert record.status == "loaded", record.error
    assert record.distribution == f"moe-plugin-{vendor}" and record.version
