"""moe_plugin_nvidia.tuning: the JSON tune cache, its lookup by token bucket, tactic recording."""

from __future__ import annotations

import json

import pytest
import torch

from moe_core import MoESpec
from moe_plugin_nvidia import tuning

SPEC = MoESpec(8, 2, 64, 48, dtype=torch.bfloat16)
GPU = "NVIDIA H200"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NVIDIA_TUNE_DIR", str(tmp_path / "tuned"))
    monkeypatch.setattr(tuning, "_PACKAGE_DIR", tmp_path / "package")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tuning.clear_cache()
    yield
    tuning.clear_cache()


def _entry(buckets):
    return {"buckets": {str(t): ids for t, ids in buckets.items()}, "tuned_at": "now", "seconds": 1.0}


def test_layer_key_separates_what_tactics_depend_on():
    keys = {
        tuning.layer_key(s)
        for s in (
            SPEC,
            SPEC.replace(dtype=torch.float16),
            SPEC.replace(intermediate_size=64),
            SPEC.replace(activation="gelu"),
            SPEC.replace(has_bias=True),
            SPEC.replace(ep_size=2),
            SPEC.replace(top_k=3),
        )
    }
    assert len(keys) == 7


def test_written_table_is_what_lookup_reads(tmp_path):
    assert tuning.lookup(SPEC, GPU, 8) is None
    path = tuning.merge_table(
        tmp_path / "tuned" / tuning.table_name(GPU),
        GPU,
        "0.7.2",
        {tuning.layer_key(SPEC): _entry({1: [3, 40], 32: [5, 44], 512: [9, 50]})},
    )
    assert path.name == "NVIDIA_H200.json"
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["flashinfer"] == "0.7.2"
    assert tuning.lookup(SPEC, GPU, 1) == [3, 40]
    assert tuning.lookup(SPEC, GPU, 31) == [3, 40]  # largest tuned bucket not above T
    assert tuning.lookup(SPEC, GPU, 32) == [5, 44]
    assert tuning.lookup(SPEC, GPU, 100000) == [9, 50]
    assert tuning.lookup(SPEC.replace(top_k=3), GPU, 32) is None
    assert tuning.lookup(SPEC, "NVIDIA H100 80GB HBM3", 32) is None


def test_merge_keeps_other_layers_and_drops_other_flashinfer_versions(tmp_path):
    path = tmp_path / "tuned" / tuning.table_name(GPU)
    other = SPEC.replace(hidden_size=128)
    tuning.merge_table(path, GPU, "0.7.2", {tuning.layer_key(other): _entry({1: [1, 2]})})
    tuning.merge_table(path, GPU, "0.7.2", {tuning.layer_key(SPEC): _entry({1: [3, 4]})})
    assert tuning.lookup(other, GPU, 1) == [1, 2] and tuning.lookup(SPEC, GPU, 1) == [3, 4]
    tuning.merge_table(path, GPU, "0.8.0", {tuning.layer_key(SPEC): _entry({1: [5, 6]})})
    assert tuning.lookup(other, GPU, 1) is None and tuning.lookup(SPEC, GPU, 1) == [5, 6]


def test_env_dir_wins_over_package_tables(tmp_path):
    tuning.merge_table(
        tmp_path / "package" / tuning.table_name(GPU),
        GPU,
        "0.7.2",
        {tuning.layer_key(SPEC): _entry({1: [7, 7]})},
    )
    assert tuning.lookup(SPEC, GPU, 4) == [7, 7]
    tuning.merge_table(
        tmp_path / "tuned" / tuning.table_name(GPU),
        GPU,
        "0.7.2",
        {tuning.layer_key(SPEC): _entry({1: [8, 8]})},
    )
    assert tuning.lookup(SPEC, GPU, 4) == [8, 8]


def test_unreadable_or_foreign_tables_are_ignored(tmp_path):
    p = tmp_path / "tuned" / tuning.table_name(GPU)
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    assert tuning.lookup(SPEC, GPU, 1) is None
    p.write_text(json.dumps({"format": 99, "layers": {}}))
    tuning.clear_cache()
    assert tuning.lookup(SPEC, GPU, 1) is None


def test_search_tactics_times_gemm1_then_gemm2_through_the_call():
    """Coordinate search as FlashInfer numbers tactics: GEMM 2's indices follow GEMM 1's (3 + 4 here)."""
    calls = []
    g1_cost = {-1: 50.0, 0: 30.0, 1: 20.0, 2: 25.0}
    g2_cost = {-1: 40.0, 3: 35.0, 4: 10.0, 6: 12.0}

    def time_call(ids):
        calls.append(list(ids))
        g1, g2 = ids
        if g1 >= 3:
            raise RuntimeError(f"Check failed: Invalid gemm1 profile id: {g1}")
        if g2 != -1 and not 3 <= g2 < 7:
            raise RuntimeError(f"Check failed: Invalid gemm2 profile id: {g2}")
        if g2 == 5:
            raise RuntimeError("tactic 5 failed to launch")
        return g1_cost[g1] + g2_cost[g2]

    best, record = tuning.search_tactics(time_call)
    assert best == [1, 4]
    assert record["gemm1"] == {"count": 3, "failed": 0, "best_us": 60.0}
    assert record["gemm2"] == {"count": 4, "failed": 1, "best_us": 30.0}
    assert record["default_us"] == 90.0
    assert calls[:5] == [[-1, -1], [0, -1], [1, -1], [2, -1], [3, -1]]
    assert calls[5:] == [[1, 3], [1, 4], [1, 5], [1, 6], [1, 7]]


def test_search_tactics_keeps_the_default_when_nothing_beats_it():
    def time_call(ids):
        if ids[0] >= 0 or ids[1] >= 0:
            raise RuntimeError(f"Invalid gemm{1 if ids[0] >= 0 else 2} profile id")
        return 5.0

    assert tuning.search_tactics(time_call)[0] == [-1, -1]


def test_picker_agrees_with_pick_at_every_token_count():
    resolved = ([1, 8, 32, 512], [[1, 2], [3, 4], [5, 6], [7, 8]])
    fast = tuning.picker(resolved)
    for t in (*range(0, 600), 4096, 10**6):
        assert fast(t) == tuning.pick(resolved, t), t
