"""Offline compilation of every Triton kernel config of the portable plugin for AMD gfx950.

``moe_plugin_portable.profile`` compiles, with ``triton.compile`` and a
``GPUTarget`` (no GPU needed), each kernel the plugin launches for the model
presets, bf16/fp16 and T in 1..8192; these tests hold every one of them to no
register spills and no scratch memory, the GEMMs to using MFMA, and check that
the gate can fail (a deliberately oversized tile spills). Compiles run in worker
processes without ``TRITON_INTERPRET`` (this session may set it); results are
cached on disk (``$MOE_PROFILE_CACHE``, default ``~/.cache/moe-kernels/profile``),
so only a cold cache pays the compile time (about two minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from moe_core.presets import get_preset
from moe_plugin_portable import profile
from moe_plugin_portable.configs import heuristic_config


def _amd_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "amd" in backends


needs_amd_backend = pytest.mark.skipif(not _amd_backend(), reason="needs triton with its AMD backend")

#: the cache as this session was started with (conftest clears MOE_* for each test)
CACHE = str(profile.cache_dir())

GEMMS = ("moe_gemm1", "moe_gemm2")
DECODE = ("moe_decode_gemm1", "moe_decode_gemm2")
KERNELS = {*GEMMS, "moe_combine", "select_experts_kernel", "sort_count", "sort_place", *DECODE}


@pytest.fixture(autouse=True)
def _profile_cache(_clean_moe_state, monkeypatch):
    monkeypatch.setenv("MOE_PROFILE_CACHE", CACHE)


@pytest.fixture(scope="module")
def configs() -> list[profile.LaunchConfig]:
    return profile.launch_configs("gfx950")


@pytest.fixture(scope="module")
def gfx950(configs) -> list[profile.Profile]:
    """The whole default set compiled for gfx950 (module scope: MOE_PROFILE_CACHE is still set here)."""
    return profile.compile_profile("gfx950", configs)


# ----------------------------------------------------------------------------- the launch set (fast)


def test_launch_set_covers_every_kernel_once(configs):
    assert {c.kernel for c in configs} == KERNELS
    keys = [c.key for c in configs]
    assert len(keys) == len(set(keys)), "launches that compile to the same kernel must be merged"
    users = {u for c in configs for u in c.users}
    for model in profile.DEFAULT_MODELS:
        for T in profile.DEFAULT_TOKENS:
            assert f"{model}/bf16/T={T}" in users and f"{model}/fp16/T={T}" in users


def test_launch_set_uses_the_launch_code(configs):
    """The GEMM constexprs are what the heuristic gives on gfx950 (256 CUs), compiled, never interpreted."""
    spec = get_preset("deepseek-v3-tp8").moe_spec()
    for T in (1, 512):
        cfg = heuristic_config(spec, T, 256, True)
        gemm1 = [c for c in configs if c.kernel == "moe_gemm1" and f"deepseek-v3-tp8/bf16/T={T}" in c.users]
        assert len(gemm1) == 1
        cx = dict(gemm1[0].constexprs)
        assert (cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"]) == (
            cfg.block_m,
            cfg.gemm1.block_n,
            cfg.gemm1.block_k,
        )
        assert dict(gemm1[0].options) == {
            "num_warps": cfg.gemm1.num_warps,
            "num_stages": cfg.gemm1.num_stages,
        }
        assert cx["UPCAST"] is False and cx["TOP_K"] == spec.top_k and cx["GATED"] is True


def test_specialization_follows_triton():
    """T == 1 specialises to a constant, sizes past 2 GB lose the AMD buffer range, do_not_specialize holds."""
    configs = profile.launch_configs("gfx950", ["llama-4-scout"], ["bf16"], [1, 8, 32], sorting_ops=())
    gemm1 = {c.users[0]: c for c in configs if c.kernel == "moe_gemm1"}
    assert "num_entries=1" in gemm1["llama-4-scout/bf16/T=1"].label
    assert "num_entries%16" in gemm1["llama-4-scout/bf16/T=8"].label
    assert "w_ptr>2G" in gemm1["llama-4-scout/bf16/T=1"].label  # w13: 16 x 16384 x 5120 bf16
    place = [
        c
        for c in profile.launch_configs("gfx950", ["mixtral-8x7b"], ["bf16"], [1])
        if c.kernel == "sort_place"
    ]
    assert place and all(" N%16" not in c.label and "T=1" not in c.label for c in place)


# ----------------------------------------------------------------------------- compiled for gfx950


@needs_amd_backend
@pytest.mark.slow
def test_gfx950_no_spills_no_scratch(gfx950, configs):
    assert len(gfx950) == len(configs)
    bad = [p for p in gfx950 if not p.ok]
    assert not bad, "kernels that spill, use scratch or overflow LDS on gfx950:\n" + profile.format_table(bad)
    for p in gfx950:
        assert p.spills == 0 and p.scratch_bytes == 0 and p.vgpr > 0 and 1 <= p.occupancy <= 8


@needs_amd_backend
@pytest.mark.slow
def test_gfx950_gemms_use_mfma(gfx950):
    gemms = [p for p in gfx950 if p.kernel in GEMMS]
    assert gemms
    assert all(p.mfma > 0 for p in gemms), profile.format_table([p for p in gemms if not p.mfma])
    assert all(p.mfma == 0 for p in gfx950 if p.kernel not in GEMMS)


@needs_amd_backend
@pytest.mark.slow
def test_gfx950_cached_and_environment_untouched(gfx950, configs):
    before = os.environ.get("TRITON_INTERPRET")
    again = profile.compile_profile("gfx950", configs[:20])
    assert all(p.cached for p in again)

    def facts(p: profile.Profile) -> tuple:
        return p.kernel, p.config, p.vgpr, p.agpr, p.sgpr, p.spills, p.scratch_bytes, p.lds_bytes, p.mfma

    assert [facts(p) for p in again] == [facts(p) for p in gfx950[:20]]
    assert os.environ.get("TRITON_INTERPRET") == before


QUANT_MODELS = ["deepseek-v3-tp8", "gpt-oss-20b", "qwen3-30b-a3b"]


def test_quantized_launch_set():
    """``quants`` adds each variant's pre-passes and GEMM variants, planned as the runtime plans them."""
    configs = profile.launch_configs(
        "gfx950", QUANT_MODELS, ["bf16"], [1, 512], quants=profile.DEFAULT_QUANTS
    )
    users = {u for c in configs for u in c.users}
    for model in QUANT_MODELS:
        for quant in profile.DEFAULT_QUANTS:
            assert f"{model}/bf16/{quant}/T=1" in users
    labels = {c.label for c in configs if c.kernel in GEMMS}
    for tag in ("w:fp8_channel", "w:fp8_tensor", "w:fp8_block", "w:mxfp4", "a:per_token", "out:fp8_tensor"):
        assert any(tag in label for label in labels), tag
    quant = [c for c in configs if c.kernel == "moe_quant_fp8"]
    assert {dict(c.constexprs)["MODE"] for c in quant} == {1, 2, 3}
    assert any(dict(c.constexprs)["SORTED"] for c in quant)  # the intermediate's pre-pass
    gemm1 = [
        c for c in configs if c.kernel == "moe_gemm1" and "deepseek-v3-tp8/bf16/fp8_block/T=512" in c.users
    ]
    assert dict(gemm1[0].constexprs)["BLOCK_K"] == 128 and dict(gemm1[0].constexprs)["GROUP_K"] == 128


@needs_amd_backend
@pytest.mark.slow
def test_gfx950_quantized_no_spills_and_mfma():
    """fp8 / fp8_block / mxfp4 kernels of the benchmark shapes compile for gfx950 without spills."""
    configs = profile.launch_configs(
        "gfx950", QUANT_MODELS, ["bf16"], [1, 512], sorting_ops=(), quants=profile.DEFAULT_QUANTS
    )
    profiles = profile.compile_profile("gfx950", configs)
    bad = [p for p in profiles if not p.ok]
    assert not bad, profile.format_table(bad)
    assert all(p.mfma > 0 for p in profiles if p.kernel in GEMMS)


def _oversized() -> profile.LaunchConfig:
    """A real gemm1 launch with a 64 x 128 x 64 gated tile on one warp: far too many registers."""
    base = next(
        c
        for c in profile.launch_configs("gfx950", ["qwen3-30b-a3b"], ["bf16"], [2048])
        if c.kernel == "moe_gemm1"
    )
    cx = {**dict(base.constexprs), "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    return dataclasses.replace(
        base,
        label=base.label + " (oversized)",
        constexprs=tuple(cx.items()),
        options=(("num_stages", 2), ("num_warps", 1)),
    )


@needs_amd_backend
def test_oversized_config_is_caught():
    (p,) = profile.compile_profile("gfx950", [_oversized()])
    assert p.error is None, p.error
    assert p.vgpr_spills > 0 and p.scratch_bytes > 0
    assert not p.ok and any("spill" in problem for problem in p.problems())
    assert "VGPR spills" in profile.format_table([p])


@needs_amd_backend
def test_cli_exit_status(monkeypatch, capsys):
    assert profile.main(["--models", "mixtral-8x7b", "--dtypes", "bf16", "--tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "moe_gemm1" in out and "0 failing" in out
    oversized = _oversized()
    monkeypatch.setattr(profile, "launch_configs", lambda *a, **k: [oversized])
    assert profile.main(["--models", "qwen3-30b-a3b"]) == 1
    assert "FAIL moe_gemm1" in capsys.readouterr().out


def test_decode_launch_set():
    """The decode path's two kernels are in the set where the rule takes it, with the variants' constexprs."""
    configs = profile.launch_configs(
        "gfx950", QUANT_MODELS, ["bf16"], [1, 8], sorting_ops=(), quants=profile.DEFAULT_QUANTS
    )
    decode = [c for c in configs if c.kernel in DECODE]
    users = {u for c in decode for u in c.users}
    for model in QUANT_MODELS:
        assert f"{model}/bf16/T=1" in users and f"{model}/bf16/fp8_block/T=1" in users
    assert "qwen3-30b-a3b/bf16/T=8" not in users  # 64 entries on 128 experts: the sorted path
    assert "deepseek-v3-tp8/bf16/T=8" not in users
    b_quants = {dict(c.constexprs)["B_QUANT"] for c in decode}
    assert b_quants == {0, 1, 2, 3, 4}
    assert {dict(c.constexprs)["A_QUANT"] for c in decode} == {0, 1, 2, 3}


@needs_amd_backend
@pytest.mark.parametrize("target", ["gfx950", "sm90"])
def test_decode_kernels_compile_without_spills(target):
    """Every decode variant of the benchmark shapes at T=1 (bf16 and the quantized schemes)."""
    configs = profile.launch_configs(
        target, [*QUANT_MODELS, "mixtral-8x7b"], ["bf16"], [1], sorting_ops=(), quants=profile.DEFAULT_QUANTS
    )
    decode = [c for c in configs if c.kernel in DECODE]
    assert len(decode) >= 10
    profiles = profile.compile_profile(target, decode)
    bad = [p for p in profiles if not p.ok]
    assert not bad, profile.format_table(bad)
    assert all(p.mfma == 0 for p in profiles)  # GEMVs: no matrix instructions


# ----------------------------------------------------------------------------- loop instructions


SASS = """Function:k
--:-:-:-:8\tLDC R1, c[0x0][0x28];
--:-:-:-:5\t@!P1 BRA LBB0;
LBB1:
--:-:-:-:1\tFFMA R2, R3, R4, R2;
--:-:-:-:1\tHADD2.F32 R5, -RZ, R6.H0_H0;
01:-:-:Y:4\tLDG.E R7, desc[UR4][R8.64];
--:-:-:-:6\t@!P0 BRA LBB1;
LBB0:
--:-:-:-:1\tEXIT;
"""

AMDGCN = """k:
\ts_load_dwordx2 s[0:1], s[4:5], 0x0
.LBB0_1:                                ; =>This Inner Loop Header
\tv_fma_f32 v1, v2, v3, v1
\tv_add_u32 v4, 1, v4  ; a comment
\ts_cbranch_scc1 .LBB0_1
; %bb.2:
\ts_endpgm
\t.section\t.AMDGPU.csdata
"""


def test_loop_instructions_count_the_largest_loop_body():
    assert profile.loop_instructions_sass(SASS) == 4  # FFMA, HADD2, LDG and the branch back
    assert profile.loop_instructions_amdgcn(AMDGCN) == 3
    assert profile.loop_instructions_sass(SASS.replace("@!P0 BRA LBB1;", "NOP;")) == 0  # no loop


@needs_amd_backend
@pytest.mark.parametrize("target", ["gfx950", "sm90"])
def test_decode_kernels_report_their_k_loop(target):
    """The decode GEMVs' K loop is found in the compiled code of both vendors."""
    configs = profile.launch_configs(
        target, ["gpt-oss-120b"], ["bf16"], [1], sorting_ops=(), quants=("mxfp4",)
    )
    decode = [c for c in configs if c.kernel in DECODE]
    profiles = profile.compile_profile(target, decode)
    assert profiles and all(p.ok for p in profiles), profile.format_table(profiles)
    assert all(p.loop_instructions > 20 for p in profiles), profile.format_table(profiles)


@needs_amd_backend  # (the set of Triton backends this tree's CI has: also NVIDIA's)
def test_mma_decode_kernels_compile_for_sm90():
    """The Gluon tensor-core decode kernels (their logic runs on the CPU in
    test_experts_decode.py's interpreted test; this checks what the compiler makes of them) compile for sm_90 without spills, with MMAs in their K loop, for every scheme they take: bf16
    (EVEN_K and not), fp8 per-channel / per-tensor / 128-blocks with pre-quantized activations,
    mxfp4 W4A16 and W4A8, swiglu_oai with biases, expert maps, split K and slot groups."""
    import torch

    from moe_plugin_portable import configs, experts

    groups = []
    for model, quant, dtype in [
        ("deepseek-v3-tp8", None, torch.bfloat16),
        ("deepseek-v3-tp8", "fp8_block", torch.bfloat16),
        ("qwen3-30b-a3b", "fp8", torch.bfloat16),
        ("qwen3-30b-a3b", "fp8_tensor", torch.bfloat16),
        ("gpt-oss-120b", None, torch.bfloat16),  # H = I = 2880: not a multiple of 128
        ("mixtral-8x7b", None, torch.float16),
        ("gpt-oss-120b", "mxfp4", torch.bfloat16),
        ("deepseek-v3-tp8", "mxfp4_w4a8", torch.bfloat16),
    ]:
        spec = get_preset(model).moe_spec(dtype, experts.QUANT_VARIANTS.get(quant), ep_size=2, ep_rank=0)
        pre = spec.quant.activation != "none"
        g1 = configs.GemmConfig(64, 128, 4, 2, 1, split=4, prequant=pre, mma=True)
        g2 = configs.GemmConfig(32, 256, 2, 2, 1, split=3, prequant=pre, mma=True)
        cfg = heuristic_config(spec, 1, 132, False)
        launches = profile._expert_launches(spec, 1, cfg, (), configs.DecodeConfig(g1, g2), nvidia=True)
        groups.append((f"{model}/{quant}", [x for x in launches if "decode" in x[0].__name__]))
    launch_set = profile.merge_launches(groups)
    names = {c.kernel for c in launch_set}
    assert names == {"moe_decode_mma_gemm1", "moe_decode_mma_gemm2"}, names
    even = {dict(c.constexprs).get("EVEN_K") for c in launch_set}
    assert even == {True, False}
    profiles = profile.compile_profile("sm90", launch_set)
    bad = [p for p in profiles if not p.ok]
    assert not bad, profile.format_table(bad)
    assert all(p.mfma > 0 and p.loop_instructions > 20 for p in profiles), profile.format_table(profiles)


@needs_amd_backend  # (the set of Triton backends this tree's CI has: also NVIDIA's)
def test_chained_decode_compiles_for_sm90_without_spills():
    """The chained decode launch (both GEMMs, tickets, release/acquire counters, L2 prefetch) of
    the GEMV heuristic's T = 1 tiles compiles for sm_90 without spills for every scheme, on the
    benchmark shapes (its logic runs in test_experts_decode.py's interpreted tests)."""
    import torch

    from moe_plugin_portable import configs, experts

    groups = []
    for model in ("deepseek-v3-tp8", "gpt-oss-120b", "qwen3-30b-a3b"):
        for quant in (None, "fp8", "fp8_block", "mxfp4", "mxfp4_w4a8"):
            spec = get_preset(model).moe_spec(torch.bfloat16, experts.QUANT_VARIANTS.get(quant))
            cfg = configs.decode_heuristic(spec, 1, 132, False).chained()
            launches = profile._expert_launches(
                spec, 1, heuristic_config(spec, 1, 132, False), (), cfg, nvidia=True
            )
            groups.append((f"{model}/{quant}", [x for x in launches if "decode" in x[0].__name__]))
    launch_set = profile.merge_launches(groups)
    assert {c.kernel for c in launch_set} == {"moe_decode_chain"}
    assert all(dict(c.constexprs)["PREFETCH"] for c in launch_set)
    profiles = profile.compile_profile("sm90", launch_set)
    bad = [p for p in profiles if not p.ok]
    assert not bad, profile.format_table(bad)


@needs_amd_backend  # (the set of Triton backends this tree's CI has: also NVIDIA's)
def test_sm90_heuristic_mma_tiles_compile_without_spills():
    """The tiles the decode heuristic gives the tensor-core kernels on sm_90 (no tuned entry:
    bf16/fp16 at T = 1, fp8_block and mxfp4 at T <= 8) compile for sm_90 without spills, on the
    benchmark shapes."""
    import torch

    from moe_plugin_portable import configs, experts

    groups = []
    for model in (*QUANT_MODELS, "mixtral-8x7b"):
        preset = get_preset(model)
        for quant, tokens in (
            (None, 1),
            ("fp8_block", 1),
            ("fp8_block", 8),
            ("mxfp4", 1),
            ("mxfp4_w4a8", 1),
            ("mxfp4_w4a8", 8),
        ):
            spec = preset.moe_spec(torch.bfloat16, experts.QUANT_VARIANTS.get(quant))
            cfg = configs.decode_heuristic(spec, tokens, 132, False, sm90=True)
            assert cfg.gemm1.mma and cfg.gemm2.mma, (model, quant, tokens)
            sorted_cfg = heuristic_config(spec, tokens, 132, False)
            launches = profile._expert_launches(spec, tokens, sorted_cfg, (), cfg, nvidia=True)
            groups.append((f"{model}/{quant}/T={tokens}", [x for x in launches if "decode" in x[0].__name__]))
    launch_set = profile.merge_launches(groups)
    assert {c.kernel for c in launch_set} == {"moe_decode_mma_gemm1", "moe_decode_mma_gemm2"}
    profiles = profile.compile_profile("sm90", launch_set)
    bad = [p for p in profiles if not p.ok]
    assert not bad, profile.format_table(bad)


@needs_amd_backend  # (the set of Triton backends this tree's CI has: also NVIDIA's)
def test_warm_cache_compiles_each_kernel_once_into_tritons_cache(tmp_path, monkeypatch):
    """The tuner's precompile: a decode step's launches (two candidates sharing GEMM 2's kernel)
    compiled for sm_90 in a worker pool land in Triton's on-disk cache, one entry per distinct
    kernel; a launch that cannot compile is counted, not raised; a worker that dies is replaced."""
    import torch

    from moe_core import MoESpec
    from moe_core.testing import random_expert_weights
    from moe_plugin_portable import configs, experts

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    spec = MoESpec(num_experts=8, top_k=2, hidden_size=64, intermediate_size=48)
    prepared = experts._prepare(spec, random_expert_weights(spec, seed=0), None)
    x = torch.randn(1, spec.hidden_size).to(spec.dtype)
    w, ids = torch.rand(1, 2), torch.tensor([[1, 5]], dtype=torch.int32)
    base = configs.decode_heuristic(spec, 1, 8, False)
    launches = []
    for bn in (base.gemm1.block_n, base.gemm1.block_n * 2):
        cfg = configs.DecodeConfig(dataclasses.replace(base.gemm1, block_n=bn), base.gemm2)
        launches += experts.decode_launches(spec, x, prepared, w, ids, torch.empty_like(x), cfg)
    assert len(launches) == 4
    (tmp_path / "crash_on_import.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    crash = {
        "gpu": ["cuda", 90, 32],
        "module": "crash_on_import",
        "kernel": "k",
        "constexprs": [],
        "options": [],
        "args": [],
    }
    with profile.CompilePool(2) as pool:
        (died,) = pool.run([crash])  # a worker that dies is reported, reaped and replaced
        assert "worker died (3)" in died["error"]
        report = profile.warm_cache(iter(launches), ("cuda", 90, 32), pool)
        assert report["kernels"] == 3 and report["failed"] == 0
        cubins = list((tmp_path / "triton").rglob("*.cubin"))
        assert len(cubins) == 3
        kernel, grid, args, kw = launches[0]
        bad = (kernel, grid, args, {**kw, "num_warps": 3})  # not a power of two: does not compile
        assert profile.warm_cache([bad], ("cuda", 90, 32), pool)["failed"] == 1
