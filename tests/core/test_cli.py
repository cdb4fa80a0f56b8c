"""The moe CLI: plugins, plan, run, doctor, presets."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from moe_core import hookimpl
from moe_core.cli import main
from moe_core.plugins import plugin_manager
from moe_core.presets import PRESETS

TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))


def test_plugins_json(capsys):
    assert main(["plugins"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ref = next(r for r in rows if r["name"] == "reference")
    assert ref["status"] == "loaded" and "reference.torch.experts" in ref["kernels"]


def test_plan_for_a_simulated_hopper(capsys):
    assert main(["plan", "--model", "deepseek-v3-tp8", "--quant", "fp8_block", "--device", "sm_90"]) == 0
    text = capsys.readouterr().out
    assert "E=257 k=9 H=7168 I=256" in text and "nvidia:sm_90" in text and "chosen:" in text


@pytest.mark.parametrize("model", TINY)
def test_run_every_tiny_preset(model, capsys):
    assert main(["run", "--model", model, "--tokens", "7", "--iters", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["relative_error"] <= result["tolerance"]
    assert result["kernel"] == "reference.torch.experts" and result["tokens"] == 7


@pytest.mark.parametrize("quant", ["fp8", "fp8_block", "mxfp4", "nvfp4"])
def test_run_quantized(quant, capsys):
    assert main(["run", "--model", "tiny-gpt-oss", "--quant", quant, "--tokens", "5", "--iters", "1"]) == 0
    assert "check    PASS" in capsys.readouterr().out


def test_run_default_and_ep(capsys):
    assert main(["run", "--iters", "2", "--ep-size", "2", "--ep-rank", "1", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "tiny-qwen3-moe" in text and "ep(local=8)" in text and "PASS" in text and "candidates" in text


def test_errors_exit_2(capsys):
    assert main(["plan", "--model", "gpt-5"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-mixtral", "--quant", "int3", "--iters", "1"]) == 2


def test_module_entry_and_doctor():
    out = subprocess.run(
        [sys.executable, "-m", "moe_core", "doctor"], capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["versions"]["torch"] and report["plugins"]["reference"] == "loaded"
    assert report["devices"][0]["device"] == "cpu"


def test_presets(capsys):
    assert main(["presets"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    required = {"mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-235b-a22b-tp8", "deepseek-v3"}
    assert required | {"deepseek-v3-tp8", "gpt-oss-20b", "gpt-oss-120b", "llama-4-scout"} <= names


def test_tune_without_a_tuner_says_so(capsys):
    # only the reference is loaded in core tests: nothing to tune, exit 1 with a reason
    assert main(["tune", "--model", "tiny-mixtral"]) == 1
    assert "no plugin had anything to tune" in capsys.readouterr().err


def _commands_plugin(name: str, register) -> types.ModuleType:
    module = types.ModuleType(name)
    module.register_commands = hookimpl(register)
    return module


def test_plugin_commands(capsys, monkeypatch):
    """register_commands adds `moe <command>`; a plugin whose hook raises (or clashes) is reported and skipped."""

    def good(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)

    def broken(subparsers):
        subparsers.add_parser("half-added")
        raise RuntimeError("boom")

    def clashing(subparsers):
        subparsers.add_parser("plan")

    manager = plugin_manager()
    for name, hook in (("good", good), ("broken", broken), ("clashing", clashing)):
        assert manager.load_module(name, _commands_plugin(name, hook)).status == "loaded"
    assert main(["hello", "--name", "moe"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "hello moe\n"
    assert "plugin 'broken' could not add its commands (register_commands raised RuntimeError: boom)" in (
        captured.err
    )
    assert "plugin 'clashing' could not add its commands" in captured.err
    with pytest.raises(SystemExit):  # taken back: argparse rejects the command
        main(["half-added"])
    assert main(["plan", "--model", "tiny-mixtral", "--device", "cpu"]) == 0  # the core's plan
    assert "chosen:" in capsys.readouterr().out
    monkeypatch.setenv("MOE_STRICT_PLUGINS", "1")
    assert main(["presets"]) == 2
    assert "register_commands failed: boom" in capsys.readouterr().err
