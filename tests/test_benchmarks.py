"""The benchmark scripts import on any machine, and the committed results summarise."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name in ("timing", "run_portable", "routing_sorting", "amd_sorting", "stages", "summarize"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["run_portable", "routing_sorting", "summarize"])
def test_scripts_import(bench_path, name):
    module = importlib.import_module(name)
    entry = next(getattr(module, n) for n in ("main", "summarize") if hasattr(module, n))
    assert callable(entry)


def test_run_portable_writes_its_flat_format(bench_path, tmp_path, monkeypatch, capsys):
    """The wrapper over moe_core.bench keeps the old keys, so summarize.py reads new files as old ones."""
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "")  # the reference kernel stands in for the portable one here
    run_portable = importlib.import_module("run_portable")
    summarize = importlib.import_module("summarize")
    out = tmp_path / "r.json"
    argv = ["--out", str(out), "--models", "tiny-qwen3-moe", "--tokens", "1,4", "--dtypes", "bf16"]
    run_portable.main([*argv, "--iters", "2", "--kernel", "reference.torch.experts"])
    report = json.loads(out.read_text())
    for key in ("date", "device", "capability", "driver", "versions", "git_commit", "peers", "ceilings"):
        assert key in report
    assert report["peers"]["vllm"]["status"] == "skipped"
    for case in report["cases"]:
        assert case["kernel"] == "reference.torch.experts" and case["passed"]
        for key in ("us", "best_us", "floor_us", "time_over_floor", "relative_error", "active_experts"):
            assert isinstance(case[key], (int, float))
        assert len(case["samples_us"]) == 2 and case["grouped_mm_best_us"] > 0
        assert case["speedup_vs_grouped_mm"] == pytest.approx(case["grouped_mm_best_us"] / case["best_us"])
    assert "correctness: 2/2" in summarize.summarize(report)
    # without the kernel (not loaded here) every case is an error, reported, not a crash
    run_portable.main([*argv, "--iters", "1"])
    assert all("does not run this case" in c["error"] for c in json.loads(out.read_text())["cases"])


def test_committed_results_summarise(bench_path):
    summarize = importlib.import_module("summarize")
    results = sorted((BENCH / "results").glob("h100-portable-*.json"))
    assert results, "no committed H100 results"
    report = json.loads(results[-1].read_text())
    text = summarize.summarize(report)
    assert report["device"] in text and "geomean speedup vs vLLM" in text
    # every case the table lists was checked against the float64 reference and passed
    cases = [c for c in report["cases"] if "error" not in c]
    assert cases and all(c["passed"] for c in cases)
    assert f"correctness: {len(cases)}/{len(cases)}" in text


TOOLS = BENCH.parent / "tools"


@pytest.fixture
def tools_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    yield
    for name in ("fused_decode", "decode_stages", "quant_paths"):
        sys.modules.pop(name, None)


def test_fused_decode_probe_matches_the_reference(tools_path, monkeypatch):
    """tools/fused_decode.py (interpreted): bf16 and mxfp4 W4A16, silu and swiglu_oai with biases,
    T = 1 and 3, within the spec's tolerance of the float64 reference (its own check raises)."""
    if not _interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    fused_decode = importlib.import_module("fused_decode")
    results = fused_decode.check("cpu")
    assert len(results) == 16 and all(err < 1e-2 for _, err in results)


def test_decode_stages_smoke_run_writes_its_table(tools_path, tmp_path, monkeypatch):
    """tools/decode_stages.py on a tiny preset (one pass per stage on the CPU): every column,
    the fused probe's among them, and the step within tolerance."""
    if not _interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    decode_stages = importlib.import_module("decode_stages")
    argv = [
        "decode_stages",
        "--models",
        "tiny-qwen3-moe",
        "--quant",
        "bf16",
        "--tokens",
        "1",
        "--copies",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    decode_stages.main()
    (row,) = json.loads((tmp_path / "decode_stages.json").read_text())["rows"]
    assert row["ok"] and row["fused_rel_err"] < 1e-2
    assert all(row[k] > 0 for k in ("step", "gemm1", "gemm2", "read13", "read2", "read2x", "read1", "fused"))
    assert "| fused |" in (tmp_path / "decode_stages.md").read_text()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
