"""moe_plugin_portable.tuning for quantized layers: spaces within the kernels' constraints, a tuned
table entry per scheme that the runtime looks up and that computes the right result, ``moe tune --quant``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core import DeviceInfo, MoESpec, QuantScheme
from moe_core.cli import main
from moe_core.presets import get_preset
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, relative_error, tolerance
from moe_plugin_portable import configs, experts, tuning
from moe_plugin_portable.configs import GemmConfig

from .helpers import DEVICE, needs_triton

#: tiny layers (few decode programs in the interpreter; mxfp4: multiples of 32 along K)
_TINY = {"num_experts": 5, "top_k": 2, "hidden_size": 64, "intermediate_size": 32}
QUANT_SPECS = {
    # GEMM 1's tiles (32, 64 wide) hold no whole 128 group: the intermediate takes the pre-pass
    "fp8_block": MoESpec(**_TINY, quant=QuantScheme("fp8_block")),
    "mxfp4": MoESpec(**_TINY, quant=QuantScheme("mxfp4"), activation="swiglu_oai", has_bias=True),
    "mxfp4_w4a8": MoESpec(**_TINY, quant=QuantScheme("mxfp4", activation="fp8_per_tensor")),
}
H200 = DeviceInfo.parse("sm_90")


def _all_configs(rounds: list[list[GemmConfig]]) -> list[GemmConfig]:
    return [c for round_ in rounds for c in round_ if c.block_n]


@pytest.mark.parametrize("space", ["quick", "full"])
def test_quantized_spaces_launch_as_listed_and_fit(space):
    """Every tile is the launch the kernel makes of it (fp8_block: K steps dividing the block;
    mxfp4: 32 or more), listed once, within shared memory and registers for its element sizes."""
    for scheme in ("fp8", "fp8_block", "mxfp4"):
        spec = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, scheme)
        for block_m in (16, 32, 64, 128):
            for nb in (1, 2):
                tiles = _all_configs(tuning.gemm_space(block_m, nb, space, spec))
                assert tiles and len(set(tiles)) == len(tiles), (scheme, block_m, nb)
                for cfg in tiles:
                    assert experts._block_k(spec, cfg) == cfg.block_k, (scheme, cfg)
                    assert tuning._fits(cfg, block_m, nb, spec.quant), (scheme, block_m, cfg)
                    if scheme == "fp8_block":
                        assert 128 % cfg.block_k == 0
    # a smaller fp8_block block: K steps within it, each tile once
    small = get_preset("deepseek-v3-tp8").moe_spec(
        torch.bfloat16, QuantScheme("fp8_block", block_shape=(32, 32))
    )
    for rounds in (tuning.gemm_space(16, 2, space, small), tuning.gemm_space(16, 2, "small", small)):
        tiles = _all_configs(rounds)
        assert {c.block_k for c in tiles} == {32} and len(set(tiles)) == len(tiles)
    # one byte per element: tiles a bf16 layer cannot hold (and longer K steps)
    fp8 = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8")
    bf16 = fp8.replace(quant=QuantScheme("bf16"))
    big = GemmConfig(128, 128, 8, 3, 8)
    assert big in _all_configs(tuning.gemm_space(64, 2, space, fp8))
    assert big not in _all_configs(tuning.gemm_space(64, 2, space, bf16))
    assert not tuning._fits(big, 64, 2) and tuning._fits(big, 64, 2, fp8.quant)
    assert max(c.block_k for c in _all_configs(tuning.gemm_space(16, 2, "quick", fp8))) == 256
    # accumulators beyond the registers: not proposed for a quantized layer
    block = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8_block")
    assert not tuning._fits(GemmConfig(128, 64, 8, 3, 8), 128, 2, block.quant)
    # decode tiles: fp8_block's K step is its block, so the K steps of the space are one
    base = configs.decode_heuristic(block, 1, 132, False).gemm1
    tiles = tuning.decode_space(base, space, block)[0]
    assert {c.block_k for c in tiles} == {128}
    assert len(tiles) == len({(c.block_n, c.split) for c in tiles})  # each tile and split once
    wider = {(c.block_n, c.split) for c in tiles if c.block_n > base.block_n}
    assert {(n, s) for n, s in wider if s != base.split} == {
        (n, s) for n in {c.block_n for c in tiles} if n > base.block_n for s in (2, 4, 8) if s != base.split
    }


def test_search_times_each_config_once():
    """The pipeline round does not re-time the best tile, nor any config twice."""
    spec = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8_block")
    timed: list[GemmConfig] = []

    def make(cfg: GemmConfig):
        timed.append(cfg)
        return lambda: None

    search = tuning._Search(lambda fn: 1.0)
    rounds = tuning.gemm_space(16, 2, "quick", spec)
    best, _ = search.best(rounds, make, lambda r, b: tuning._candidates(r, b, 16, 2, spec.quant))
    assert best == rounds[0][0] and len(timed) == len(set(timed)) == search.timed
    assert search.failed == 0


def test_default_precompile_is_one_worker_per_core_but_one_on_nvidia_only(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.version, "hip", None)
    for cores, want in ((None, 0), (1, 0), (2, 0), (3, 2), (16, 15), (64, 16)):
        monkeypatch.setattr(tuning.os, "cpu_count", lambda c=cores: c)
        assert tuning.default_precompile(cuda) == want, cores
        assert tuning.default_precompile(torch.device("cpu")) == 0
    monkeypatch.setattr(torch.version, "hip", "7.0")
    assert tuning.default_precompile(cuda) == 0  # not measured on AMD GPUs: compiles at first runs


def test_search_precompiles_each_large_round_before_timing_it():
    """With a warmer, a round of WARM_MIN_CANDIDATES or more gets its candidates' launches compiled
    first (all of them, each once, before the first is timed); a failing warmer or a candidate
    whose launches cannot be built changes nothing about the search's result."""
    spec = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8_block")
    rounds = tuning.gemm_space(16, 2, "quick", spec)
    fill = lambda r, b: tuning._candidates(r, b, 16, 2, spec.quant)
    events: list = []

    def make(cfg: GemmConfig):
        events.append(("time", cfg))
        return lambda: None

    def launches(cfg: GemmConfig):
        if cfg.num_stages == 5:
            raise ValueError("not a launch")
        return [("launch", cfg)]

    def warm(found):
        events.append(("warm", [cfg for _, cfg in found]))
        return {}

    plain = tuning._Search(lambda fn: 1.0)
    want, _ = plain.best(rounds, lambda cfg: lambda: None, fill)
    search = tuning._Search(lambda fn: 1.0, warm=warm)
    best, _ = search.best(rounds, make, fill, launches)
    assert best == want
    warmed = [e[1] for e in events if e[0] == "warm"]
    assert warmed and all(len(w) >= 1 for w in warmed)
    first_round = [e[1] for e in events[1 : 1 + len(warmed[0])]]
    assert events[0][0] == "warm" and first_round == warmed[0]  # warmed, then timed in order
    assert not any(c.num_stages == 5 for w in warmed for c in w)
    assert search.warm_s >= 0.0

    def broken(found):
        list(found)
        raise RuntimeError("no workers")

    again = tuning._Search(lambda fn: 1.0, warm=broken)
    assert again.best(rounds, lambda cfg: lambda: None, fill, launches)[0] == want


@needs_triton
def test_tuning_over_routings_reports_per_routing_times(monkeypatch):
    """Timed over 2 routings, every timed stage runs each routing's launches (twice the launches
    of 1 routing) and its time is per routing: with a timer that counts the launches it runs,
    the entry's times equal those of a 1-routing tuning, stage by stage."""
    spec = QUANT_SPECS["mxfp4_w4a8"]  # with the activations' pre-pass
    weights = random_expert_weights(spec, device=DEVICE, seed=1)
    counting = [False, 0]
    real = tuning.run_launch

    def run_launch(*launch):
        counting[1] += counting[0]
        return real(*launch)

    def timer(fn):
        counting[:] = [True, 0]
        fn()
        counting[0] = False
        return float(counting[1])

    monkeypatch.setattr(tuning, "run_launch", run_launch)
    entries, launched = [], []
    for n in (1, 2):
        total = [0]

        def counted(fn, total=total):
            us = timer(fn)
            total[0] += us
            return us

        monkeypatch.setattr(tuning, "_timer", lambda device, counted=counted: counted)
        entries.append(
            tuning.tune_layer(spec, DEVICE, tokens=(1,), weights=weights, space="small", routings=n)["1"]
        )
        launched.append(total[0])
    one, two = entries
    assert (one["routings"], two["routings"]) == (1, 2)
    assert one["timing"] == two["timing"] and one["decode"]["timing"] == two["decode"]["timing"]
    assert one["timing"]["gemm1_us"] >= 1 and one["decode"]["timing"]["gemm2_us"] >= 1
    assert launched[1] == 2 * launched[0] > 0


@needs_triton
@pytest.mark.parametrize("name", ["fp8_block", "mxfp4", "mxfp4_w4a8"])
def test_tuned_quantized_entry_is_what_apply_runs(name, tmp_path, monkeypatch):
    """Tuning a quantized layer times its own launches (no fallback to bf16: every candidate ran,
    activations quantized by the pre-pass), writes the layer's key, and the runtime's lookup for a
    call returns the tuned configs, which compute the layer within its tolerance."""
    spec = QUANT_SPECS[name]
    weights = random_expert_weights(spec, device=DEVICE, seed=1)
    monkeypatch.setenv("MOE_PORTABLE_TUNE_CHAIN", "1")
    entry = tuning.tune_layer(spec, DEVICE, tokens=(1,), weights=weights, space="small")["1"]
    decode = configs.DecodeConfig.from_json(entry["decode"])
    chained = 2 * len({decode.chained(), configs.decode_heuristic(spec, 1, 8, False).chained()})
    # sorted: 2 + 2 candidates; decode: 1 + 1, the two as one step, the chained tiles with and
    # without prefetch (tuned and heuristic tiles, which may be the same); none failed
    assert entry["searched"] == [4 + 2 + 1 + chained, 0]
    assert {"step_us", "chain_us"} <= set(entry["decode"]["timing"])
    spent = entry["search_s"]  # the first runs (interpreted here) and the timing, both counted
    assert set(spent) == {"first_runs", "timing", "precompile"} and spent["precompile"] == 0  # (CPU: none)
    assert spent["first_runs"] > 0 and spent["timing"] > 0
    assert (entry["timing"]["quant_us"] > 0) == (spec.quant.activation != "none")
    cfg = configs.MoEConfig.from_json(entry)
    assert all(experts._block_k(spec, g) == g.block_k for g in (cfg.gemm1, cfg.gemm2))
    assert cfg != configs.heuristic_config(spec, 1, 8, False)  # (small space: stages 2)
    key = configs.layer_key(spec)
    assert spec.quant.name in key
    tuning.write_table("Fake GPU", {key: {"1": entry}}, tmp_path, "3.x")

    monkeypatch.setenv("MOE_PORTABLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_device_facts", lambda index: ("Fake GPU", 8, False, 9))
    configs._load_table.cache_clear()
    try:  # what fused_moe (moe_apply) looks up for a call of 1 token on that GPU, captured in a graph
        gpu = torch.device("cuda", 0)
        want = (decode, None) if entry["decode"]["use"] else (None, cfg)
        captured = (*experts._env_key(torch.device("cpu"))[:-1], "capturing")
        assert experts._configs(spec, 1, gpu, captured) == want
        assert configs.lookup_config(spec, 1, gpu) == cfg
    finally:
        configs._load_table.cache_clear()
    plan = moe_core.moe_plan(spec, DEVICE)
    assert plan.kernel == "portable.triton.fused_moe", plan.explain()
    tensors = plan.prepare(weights).tensors
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(4, spec.hidden_size, generator=gen, device=DEVICE).to(spec.dtype)
    w = torch.rand(4, spec.top_k, generator=gen, device=DEVICE) + 0.05
    ids = torch.rand(4, spec.num_experts, generator=gen, device=DEVICE).argsort(1)[:, : spec.top_k].int()
    ref = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
    for config in (cfg, decode):
        out = torch.full_like(x, float("nan"))
        experts.fused_moe(spec, x, tensors, w, ids, out, config=config)
        assert relative_error(out, ref) <= tolerance(spec), config


@needs_triton
def test_cli_tune_passes_the_quant_scheme(tmp_path, monkeypatch, capsys):
    """``moe tune --model M --quant Q``: the plugin tunes the quantized layer and writes its key."""
    tuned: list[MoESpec] = []
    real = tuning.tune_layer

    def small(spec, device, tokens, **kwargs):
        tuned.append(spec)
        return real(spec, device, tokens, **{**kwargs, "space": "small"})

    monkeypatch.setattr(tuning, "tune_layer", small)
    monkeypatch.setattr(moe_core, "device_info", lambda device: H200)  # the plugin tunes GPUs only
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    args = ["tune", "--model", "tiny-gpt-oss", "--quant", "mxfp4", "--plugin", "portable", "--no-dispatch"]
    assert main([*args, "--device", DEVICE, "--tokens", "3", "--out", str(tmp_path)]) == 0
    paths = json.loads(capsys.readouterr().out)["portable"]
    spec = get_preset("tiny-gpt-oss").moe_spec(torch.bfloat16, "mxfp4")
    assert tuned == [spec]
    table = json.loads(Path(paths[0]).read_text())
    assert list(table["configs"]) == [configs.layer_key(spec)] and "mxfp4" in configs.layer_key(spec)
    assert table["configs"][configs.layer_key(spec)]["8"]["searched"][1] == 0
    # a scheme the kernel does not run: nothing tuned
    nvfp4 = [*args[:4], "nvfp4", *args[5:], "--device", DEVICE, "--out", str(tmp_path)]
    assert main(nvfp4) == 1
    assert len(tuned) == 1


def test_refusal_names_what_the_kernel_does_not_run():
    spec = get_preset("deepseek-v3-tp8").moe_spec(torch.bfloat16, "fp8_block")
    assert tuning.refusal(spec, H200) is None
    assert "nvfp4" in tuning.refusal(spec.replace(quant=QuantScheme("nvfp4")), H200)
    assert "sm_89" in tuning.refusal(spec, DeviceInfo.parse("sm_80"))
    fp16_w4a16 = get_preset("gpt-oss-120b").moe_spec(torch.float16, "mxfp4")
    assert "bf16 activations" in tuning.refusal(fp16_w4a16, H200)


def test_mxfp4_space_ends_with_the_other_path():
    """An mxfp4 layer's last round is the best tile and pipeline through the other mxfp4 path
    (``experts.MX_DOT_MAX_BLOCK_M`` sets the default); the table keeps the choice
    and the launch follows it (compiled kernels; the interpreter always dequantizes)."""
    spec = get_preset("gpt-oss-120b").moe_spec(torch.bfloat16, "mxfp4")
    best = GemmConfig(64, 128, 4, 3, 8)
    for block_m in (16, 64):
        last = tuning.gemm_space(block_m, 2, "quick", spec)[-1]
        (flip,) = tuning._candidates(last, best, block_m, 2, spec.quant)
        assert flip == GemmConfig(64, 128, 4, 3, 8, mx_dot=block_m > experts.MX_DOT_MAX_BLOCK_M)
        assert experts._mx_dot(spec, False, block_m, flip.mx_dot) != experts._mx_dot(spec, False, block_m)
    assert len(tuning.gemm_space(16, 2, "quick", spec)) == 3
    assert len(tuning.gemm_space(16, 2, "quick", get_preset("gpt-oss-120b").moe_spec())) == 2
    assert all(c.mx_dot is None for r in tuning.gemm_space(16, 2, "quick") for c in r)
    cfg = configs.MoEConfig(16, GemmConfig(64, 128, mx_dot=False), GemmConfig(32, 64))
    data = cfg.to_json()
    assert data["gemm1"]["mx_dot"] is False and "mx_dot" not in data["gemm2"]
    assert configs.MoEConfig.from_json(data) == cfg
    assert experts._mx_dot(spec, True, 16, True) is False  # the interpreter


def test_mx_dot_env_overrides_the_table(monkeypatch):
    spec = get_preset("gpt-oss-120b").moe_spec(torch.bfloat16, "mxfp4")
    monkeypatch.setenv("MOE_PORTABLE_MXFP4", "dequant")
    assert experts._mx_dot(spec, False, 16, True) is False
    monkeypatch.setenv("MOE_PORTABLE_MXFP4", "dot_scaled")
    assert experts._mx_dot(spec, False, 64, False) is True
    monkeypatch.setenv("MOE_PORTABLE_MXFP4", "auto")
    rule = [experts._mx_dot(spec, False, m, None) for m in (16, 64)]
    assert rule == [m <= experts.MX_DOT_MAX_BLOCK_M for m in (16, 64)]
