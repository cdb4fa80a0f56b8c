"""moe bench: every kernel and peer per case on the CPU, the floor formula, broken kernels reported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch

from moe_core import KernelEntry, hookimpl
from moe_core.bench import (
    H100_CEILINGS,
    L2_FLUSH_BYTES,
    MAX_COLD_ROUTINGS,
    BenchConfig,
    cold_routings,
    expected_active_experts,
    expert_bytes,
    floor_us,
    preset_floor_us,
    quick_models,
    run_bench,
)
from moe_core.bench.report import failures, markdown
from moe_core.bench.suite import SHAPES
from moe_core.cli import main
from moe_core.plugins import plugin_manager
from moe_core.presets import get_preset

HAS_EXAMPLE = importlib.util.find_spec("moe_plugin_example") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_bench_cli_on_the_cpu(tmp_path, monkeypatch, capsys):
    if HAS_EXAMPLE:
        monkeypatch.setenv("MOE_LOAD_PLUGINS", "example")
    out = tmp_path / "bench"
    argv = ["bench", "--models", "tiny-qwen3-moe", "--tokens", "1,5", "--iters", "3", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads((out / "bench.json").read_text())
    for key in (
        "date",
        "device",
        "driver",
        "versions",
        "git_commit",
        "ceilings",
        "peers",
        "kernels",
        "cases",
    ):
        assert key in report
    assert report["device_type"] == "cpu" and report["driver"] is None  # no nvidia-smi on this machine
    assert {"torch", "triton", "flashinfer", "moe-core", "python"} <= set(report["versions"])
    assert report["versions"]["torch"] == torch.__version__
    assert report["ceilings"]["copy_bytes_per_s"] > 0 and report["ceilings"]["bf16_flops_per_s"] > 0
    assert report["peers"]["vllm"]["status"] == "skipped"
    expected = {"reference.torch.experts"} | ({"example.torch.loop"} if HAS_EXAMPLE else set())
    assert [c["T"] for c in report["cases"]] == [1, 5]
    for case in report["cases"]:
        assert case["model"] == "tiny-qwen3-moe" and case["dtype"] == "bfloat16" and case["quant"] == "bf16"
        assert case["floor_us"] > 0 and case["active_experts"] >= 1
        assert set(case["kernels"]) == expected
        for result in case["kernels"].values():
            assert result["passed"] and result["relative_error"] <= case["tolerance"]
            assert len(result["samples_us"]) == 3 and result["best_us"] == result["us"] > 0
            assert result["time_over_floor"] == pytest.approx(result["best_us"] / case["floor_us"])
            assert result["speedup_vs_grouped_mm"] > 0
        peer = case["peers"]["grouped_mm"]  # torch._grouped_mm runs bf16 on the CPU too
        assert peer["passed"] and peer["best_us"] > 0
        assert case["fastest"] in expected
    text = (out / "bench.md").read_text()
    assert report["device"] in text and "reference.torch.experts" in text
    assert "Correctness: " + f"{2 * len(expected)}/{2 * len(expected)}" in text
    if HAS_MATPLOTLIB:
        assert (out / "tiny-qwen3-moe.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in captured.err


@pytest.mark.parametrize(
    ("model", "tokens", "quant", "want_us"),
    [  # ../shared/BENCHMARKS.md rows, with its H100 ceilings
        ("qwen3-30b-a3b", 1, None, 25.0),
        ("qwen3-30b-a3b", 1, "fp8", 12.5),
        ("qwen3-30b-a3b", 1, "mxfp4", 6.6),
        ("qwen3-30b-a3b", 2048, "mxfp4", 215.9),
        ("qwen3-30b-a3b", 8192, "fp8", 492.4),
        ("mixtral-8x7b", 512, None, 936.1),
        ("mixtral-8x7b", 8, "fp8", 420.0),
        ("gpt-oss-120b", 1, None, 65.9),
        ("gpt-oss-20b", 32, "mxfp4", 138.2),
    ],
)
def test_floor_formula_matches_benchmarks_md(model, tokens, quant, want_us):
    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, quant)
    got = floor_us(spec, tokens, H100_CEILINGS, num_routed=preset.num_experts)
    assert got == pytest.approx(want_us, rel=0.03)


def test_preset_floor_counts_the_shared_expert_as_always_active():
    preset = get_preset("deepseek-v3-tp8")  # 256 routed + 1 fused shared expert, 9 slots
    spec = preset.moe_spec(torch.bfloat16, "fp8_block")
    for tokens in (1, 8, 2048):
        got = preset_floor_us(preset, spec, tokens, H100_CEILINGS)
        assert got == floor_us(spec, tokens, H100_CEILINGS, num_routed=256, num_shared=1)
    # T = 1: 8 routed experts + the shared one, not 9 of 257 routed
    one = expert_bytes(spec) / H100_CEILINGS["copy_bytes_per_s"] * 1e6
    assert preset_floor_us(preset, spec, 1, H100_CEILINGS) == pytest.approx(9 * one, rel=0.01)


@pytest.mark.parametrize("model", ["deepseek-v3-tp8", "gpt-oss-120b", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_cold_routings_hold_more_than_the_cache(model):
    """The fewest routings whose expected experts hold more than L2_FLUSH_BYTES (at most
    MAX_COLD_ROUTINGS): several at decode sizes, one where a single call already reads that much."""
    preset = get_preset(model)
    for scheme in ("bf16", "fp8", "mxfp4"):
        spec = preset.moe_spec(torch.bfloat16, scheme)
        for T in (1, 8, 32, 2048):
            n = cold_routings(spec, T)
            active = expected_active_experts(spec.num_experts, spec.top_k, T) * expert_bytes(spec)
            assert 1 <= n <= MAX_COLD_ROUTINGS, (scheme, T, n)
            assert n == MAX_COLD_ROUTINGS or n * active >= L2_FLUSH_BYTES, (scheme, T, n)
            assert n == 1 or (n - 1) * active < L2_FLUSH_BYTES, (scheme, T, n)
    deepseek = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8")
    assert (cold_routings(deepseek, 1), cold_routings(deepseek, 32)) == (6, 1)  # 9 experts: 49.5 MB


def test_quick_takes_the_three_smallest_shapes():
    assert quick_models(SHAPES) == ["qwen3-30b-a3b", "qwen3-235b-a22b-tp8", "gpt-oss-20b"]


def _write_ones(spec, hidden_states, prepared, topk_weights, topk_ids, out):
    out.fill_(1.0)


def _raise(spec, hidden_states, prepared, topk_weights, topk_ids, out):
    raise RuntimeError("kernel exploded")


def _broken_plugin() -> types.ModuleType:
    module = types.ModuleType("broken")

    def register_kernels(register):
        for name, apply in (("broken.torch.wrong", _write_ones), ("broken.torch.raises", _raise)):
            register(KernelEntry(name=name, family="experts", apply=apply, priority=5))

    module.register_kernels = hookimpl(register_kernels)
    return module


def test_broken_kernels_are_reported_not_fatal(tmp_path, capsys):
    assert plugin_manager().load_module("broken", _broken_plugin()).status == "loaded"
    config = BenchConfig(
        models=["tiny-mixtral"], tokens=[3], iters=2, warmup=1, peers=False, ceilings=dict(H100_CEILINGS)
    )
    report = run_bench(config)
    (case,) = report["cases"]
    assert set(case["kernels"]) == {"broken.torch.wrong", "broken.torch.raises", "reference.torch.experts"}
    wrong = case["kernels"]["broken.torch.wrong"]
    assert not wrong["passed"] and wrong["relative_error"] > case["tolerance"] and wrong["best_us"] > 0
    raised = case["kernels"]["broken.torch.raises"]
    assert not raised["passed"] and "kernel exploded" in raised["error"] and "best_us" not in raised
    assert case["kernels"]["reference.torch.experts"]["passed"]
    assert case["fastest"] == "reference.torch.experts"
    bad = failures(report)
    assert len(bad) == 2 and any("broken.torch.wrong: relative error" in b for b in bad)
    assert "FAIL" in markdown(report) and "kernel exploded" in markdown(report)
    # the CLI finishes the run, writes its files and exits 1; --kernels narrows by dotted prefix
    out = tmp_path / "b"
    assert (
        main(
            [
                "bench",
                "--models",
                "tiny-mixtral",
                "--tokens",
                "2",
                "--iters",
                "1",
                "--kernels",
                "broken",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    report = json.loads((out / "bench.json").read_text())
    assert set(report["cases"][0]["kernels"]) == {"broken.torch.wrong", "broken.torch.raises"}
    assert "reference.torch.experts" not in report["cases"][0]["refused"]  # filtered out, not refused
    assert "FAIL" in capsys.readouterr().err


def test_bench_rejects_unknown_names(tmp_path, capsys):
    assert main(["bench", "--models", "gpt-5", "--out", str(tmp_path)]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny-mixtral", "--quant", "int3", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--models", "tiny-mixtral", "--quant", "fp8/x:int3", "--out", str(tmp_path)]) == 2
    assert "bad field 'x:int3'" in capsys.readouterr().err


def test_bench_takes_a_full_quant_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "")
    scheme = "fp8/w:per_tensor/a:fp8_per_tensor"
    argv = [
        "bench",
        "--models",
        "tiny-qwen3-moe",
        "--tokens",
        "3",
        "--iters",
        "2",
        "--quant",
        f"fp8,{scheme}",
    ]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    cases = json.loads((tmp_path / "bench.json").read_text())["cases"]
    assert [c["quant"] for c in cases] == ["fp8", scheme]
    assert "per_tensor" not in cases[0]["spec"] and "per_tensor" in cases[1]["spec"]
    assert all(r["passed"] for c in cases for r in c["kernels"].values())
    assert scheme in (tmp_path / "bench.md").read_text()


def test_bench_imports_no_vendor_library():
    code = (
        "import sys, moe_core.bench, moe_core.bench.report, moe_core.bench.peers, moe_core.cli; "
        "bad = [m for m in ('triton', 'flashinfer', 'aiter', 'matplotlib', 'rich') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
