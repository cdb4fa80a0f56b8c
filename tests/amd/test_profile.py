"""``moe amd profile``: the AMD plugin's Triton and Gluon kernels compiled offline for gfx950, held to no spills.

The launches of ``amd.triton.moe_sorting`` at the benchmark shapes (E=257,
k=9, unit 32, T = 1 .. 16384, with and without an expert mask) cover all three
paths; they are compiled for gfx950 through ``moe_plugin_portable.profile``'s
workers (no GPU; results cached under ``$MOE_PROFILE_CACHE``) and every one
must use no scratch memory and spill no register. The Gluon kernels of ``amd.gluon.mxfp4`` at the
gpt-oss shapes (H = I = 2880, E = 32/128, k = 4; one T per block-table bucket; W4A16 and W4A8)
are held to the same gate plus their CDNA4 microscaling instructions.
"""

from __future__ import annotations

import dataclasses

import pytest

from moe_core.cli import main

profile = pytest.importorskip(
    "moe_plugin_portable.profile", reason="moe amd profile needs moe-plugin-portable"
)

from moe_plugin_amd import profile as amd_profile  # noqa: E402

#: the cache as this session was started with (conftest clears MOE_* for each test)
CACHE = str(profile.cache_dir())
KERNELS = {
    "sort_oneshot",
    "sort_expert_count",
    "sort_expert_scatter",
    "sort_tile_count",
    "sort_tile_prefix",
    "sort_tile_scatter",
}


def _amd_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "amd" in backends


needs_amd_backend = pytest.mark.skipif(not _amd_backend(), reason="needs triton with its AMD backend")


@pytest.fixture(autouse=True)
def _profile_cache(_clean_moe_state, monkeypatch):
    monkeypatch.setenv("MOE_PROFILE_CACHE", CACHE)


@pytest.fixture(scope="module")
def configs() -> list:
    return amd_profile.launch_configs()


def test_launch_set_covers_every_path(configs):
    assert {c.kernel for c in configs} == KERNELS
    assert all(c.module == "moe_plugin_amd._details._sorting" for c in configs)
    users = {u for c in configs for u in c.users}
    for T in amd_profile.BENCH_TOKENS:
        assert f"moe_sorting E=257 k=9 unit=32/T={T}" in users
        assert f"moe_sorting E=257 k=9 unit=32/T={T}/mask" in users
    keys = [c.key for c in configs]
    assert len(keys) == len(set(keys)), "launches that compile to the same kernel must be merged"


@needs_amd_backend
def test_gfx950_no_spills_no_scratch(configs):
    profiles = profile.compile_profile("gfx950", configs)
    assert len(profiles) == len(configs)
    bad = [p for p in profiles if not p.ok]
    assert not bad, "AMD sorting kernels that spill or use scratch on gfx950:\n" + profile.format_table(bad)
    for p in profiles:
        assert p.vgpr_spills == p.sgpr_spills == p.scratch_bytes == 0 and p.vgpr > 0 and p.occupancy >= 1


@needs_amd_backend
def test_cli(monkeypatch, capsys):
    """``moe amd profile`` prints the table and exits 0; a kernel that fails the gate makes it exit 1."""
    assert main(["amd", "profile", "--no-portable", "--tokens", "1,256"]) == 0
    out = capsys.readouterr().out
    assert "sort_oneshot" in out and "sort_expert_scatter" in out and "0 failing" in out
    oversized = _oversized()
    monkeypatch.setattr(amd_profile, "launch_configs", lambda *a, **k: [oversized])
    assert main(["amd", "profile", "--no-portable"]) == 1
    assert "FAIL sort_oneshot" in capsys.readouterr().out


def _oversized():
    """The T=16 oneshot launch with a 64-entry placement chunk (CHUNK=64): it spills SGPRs on gfx950."""
    base = next(c for c in amd_profile.launch_configs([16], masks=[False]) if c.kernel == "sort_oneshot")
    constexprs = tuple((k, 64 if k == "C" else v) for k, v in base.constexprs)
    return dataclasses.replace(base, label=base.label + " (C=64)", constexprs=constexprs)


@needs_amd_backend
def test_gate_catches_spills():
    (p,) = profile.compile_profile("gfx950", [_oversized()])
    assert p.error is None, p.error
    assert p.sgpr_spills > 0 and not p.ok


# ----------------------------------------------------------------------------- amd.gluon.mxfp4

GLUON_KERNELS = {"moe_gemm1", "moe_gemm2", "moe_slot_sum"}


@pytest.fixture(scope="module")
def gluon_configs() -> list:
    return profile.merge_launches(amd_profile.gluon_launch_groups())


def test_gluon_launch_set(gluon_configs):
    """Both GEMMs of both schemes for every block-table bucket, at gpt-oss-20b and -120b (which merge:
    E is a runtime argument)."""
    from moe_plugin_amd.gluon_configs import BUCKETS

    assert {c.kernel for c in gluon_configs} == GLUON_KERNELS
    assert all(c.module == "moe_plugin_amd._details._gluon_moe" for c in gluon_configs)
    gemms = [c for c in gluon_configs if c.kernel != "moe_slot_sum"]
    block_ms = {dict(c.constexprs)["BLOCK_M"] for c in gemms}
    assert block_ms == {cfg.block_m for _, cfg in BUCKETS}
    for c in gemms:
        cx = dict(c.constexprs)
        assert cx["N_PAD"] == cx["K_PAD"] == 2944 and cx["BLOCK_K"] == 128
        assert any(u.startswith("gpt-oss-20b") for u in c.users) and any(
            u.startswith("gpt-oss-120b") for u in c.users
        )
    assert {dict(c.constexprs)["A_FP8"] for c in gemms} == {False, True}


@needs_amd_backend
def test_gluon_gfx950_no_spills_and_scaled_instructions(gluon_configs):
    """Every amd.gluon.mxfp4 compile: no spills, no scratch; W4A8 GEMMs hold scaled MFMAs (v_mfma_scale_f32_*),
    W4A16 GEMMs scaled fp4 upcasts (v_cvt_scalef32_pk_bf16_fp4) and bf16 MFMAs."""
    profiles = profile.compile_profile("gfx950", gluon_configs)
    bad = [p for p in profiles if not p.ok or amd_profile.gluon_problems(p)]
    assert not bad, "amd.gluon.mxfp4 kernels failing the gate on gfx950:\n" + profile.format_table(bad)
    for p in profiles:
        assert p.vgpr_spills == p.sgpr_spills == p.scratch_bytes == 0 and p.occupancy >= 1
        if p.kernel == "moe_slot_sum":
            continue
        fp8 = dict(p.launch.constexprs)["A_FP8"]
        assert (p.mfma_scaled > 0) == fp8, p.config
        if not fp8:
            assert p.cvt_scaled > 0 and p.mfma > 0, p.config


@needs_amd_backend
def test_gluon_gate_catches_missing_scaled_mfma(gluon_configs):
    (p,) = profile.compile_profile(
        "gfx950", [next(c for c in gluon_configs if dict(c.constexprs).get("A_FP8"))]
    )
    assert p.mfma_scaled > 0 and not amd_profile.gluon_problems(p)
    assert amd_profile.gluon_problems(dataclasses.replace(p, mfma_scaled=0))
    w4a16 = next(c for c in gluon_configs if dict(c.constexprs).get("A_FP8") is False)
    (q,) = profile.compile_profile("gfx950", [w4a16])
    assert not amd_profile.gluon_problems(q) and amd_profile.gluon_problems(
        dataclasses.replace(q, cvt_scaled=0)
    )


@needs_amd_backend
def test_cli_includes_gluon(capsys):
    assert main(["amd", "profile", "--no-portable", "--tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "moe_gemm1" in out and "moe_gemm2" in out and "(scaled " in out and "0 failing" in out
