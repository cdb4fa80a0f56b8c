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


@pytest.mark.parametrize("name", ["run_portable", "routing_sorting", "summarize", "timing"])
def test_scripts_import(bench_path, name):
    module = importlib.import_module(name)
    entry = next(getattr(module, n) for n in ("main", "summarize", "events_median") if hasattr(module, n))
    assert callable(entry)


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
