"""moe_core.integrations.transformers: ``experts_implementation="moe_core"`` in HF transformers 5.x.

Tiny randomly initialised models built locally (no downloads), float32: logits
match transformers' eager experts and greedy generation is identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5", reason="needs transformers>=5 (pip install 'moe-core[hf]')"
)

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations.moe import ExpertsInterface  # noqa: E402

import moe_core  # noqa: E402
from moe_core.integrations import transformers as moe_hf  # noqa: E402
from moe_core.testing import relative_error  # noqa: E402

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _config(name: str):
    if name == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON
        )
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=16,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            **COMMON,
        )
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            **{**COMMON, "num_key_value_heads": 4},
        )
    if name == "gpt_oss":
        return transformers.GptOssConfig(
            intermediate_size=16,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            swiglu_limit=1.0,  # small, so the probe's clamps are exercised
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **COMMON,
        )
    raise AssertionError(name)


MODELS = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


def _model(name: str, **kwargs) -> torch.nn.Module:
    """A tiny model with O(1) expert outputs (the default init makes the experts' share of the logits tiny)."""
    torch.manual_seed(0)
    kwargs.setdefault("experts_implementation", "eager")
    model = AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".experts." in pname:
                p.normal_(0.0, 0.2 if p.dim() == 3 else 0.1)
            elif ".router." in pname or ".gate.weight" in pname:
                p.normal_(0.0, 0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def _ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _greedy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """16 new tokens, greedy (EOS suppressed so every model makes all 16)."""
    return model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)


@pytest.fixture(autouse=True)
def _registered():
    moe_hf.register()
    moe_hf._warned.clear()  # warnings are once per process; each test sees its own


def test_register_is_idempotent_and_selectable():
    assert moe_hf.register() == "moe_core"
    assert moe_hf.register() == "moe_core"
    assert ExpertsInterface._global_mapping["moe_core"] is moe_hf.experts_forward
    model = _model("mixtral", experts_implementation="moe_core")
    assert model.config._experts_implementation == "moe_core"


def test_register_refuses_a_foreign_function():
    ExpertsInterface.register("moe_core_taken", lambda *a: None)
    try:
        with pytest.raises(moe_core.MoEError, match="already registered"):
            moe_hf.register("moe_core_taken")
    finally:
        del ExpertsInterface._global_mapping["moe_core_taken"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_greedy_generation_match_eager(name: str):
    model = _model(name)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        expected_tokens = _greedy(model, ids[:1])
        model.set_experts_implementation("moe_core")
        assert model.config._experts_implementation == "moe_core"
        logits = model(ids).logits
        tokens = _greedy(model, ids[:1])
    assert relative_error(logits, expected) <= 1e-4
    assert tokens.shape == (1, 8 + 16)
    assert torch.equal(tokens, expected_tokens)
    experts = _experts(model)
    assert len(experts) == 2
    for module in experts:
        plan = moe_hf.cached_plan(module)
        assert plan is not None, "the experts did not run through moe_core"
        assert plan.spec.dtype == torch.float32
        if name == "gpt_oss":
            assert (plan.spec.activation, plan.spec.swiglu_alpha, plan.spec.swiglu_limit) == (
                "swiglu_oai",
                pytest.approx(model.config.swiglu_alpha),
                1.0,
            )
            assert plan.spec.has_bias
        else:
            assert plan.spec.activation == "silu" and not plan.spec.has_bias


def test_from_pretrained_selects_moe_core(tmp_path):
    model = _model("mixtral")
    model.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="moe_core", attn_implementation="eager"
    ).eval()
    assert loaded.config._experts_implementation == "moe_core"
    with torch.no_grad():
        logits = loaded(ids).logits
    assert relative_error(logits, expected) <= 1e-4
    assert all(moe_hf.cached_plan(m) is not None for m in _experts(loaded))


def test_compiled_fullgraph_after_an_eager_forward():
    torch._dynamo.reset()
    model = _model("gpt_oss")
    model.set_experts_implementation("moe_core")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits  # eager: plans and prepares every experts module
        logits = torch.compile(model, fullgraph=True)(ids).logits
    assert relative_error(logits, expected) <= 1e-5


def test_gpt_oss_weights_to_canonical_layout():
    experts = _experts(_model("gpt_oss"))[0]
    assert experts.is_transposed and not experts.is_concatenated
    w = moe_hf.expert_weights(experts)
    inter = experts.intermediate_size
    gate_up = experts.gate_up_proj.detach()  # [E, H, 2I], gate at even and up at odd columns
    assert w.w13.shape == (4, 2 * inter, 32) and w.w2.shape == (4, 32, inter)
    torch.testing.assert_close(w.w13[:, :inter], gate_up[:, :, 0::2].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(w.w13[:, inter:], gate_up[:, :, 1::2].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(w.w2, experts.down_proj.detach().transpose(1, 2), rtol=0, atol=0)
    bias = experts.gate_up_proj_bias.detach()
    torch.testing.assert_close(w.b13, torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1), rtol=0, atol=0)
    assert w.w13.is_contiguous() and w.w2.is_contiguous()


def test_canonical_weights_are_not_copied():
    experts = _experts(_model("mixtral"))[0]
    w = moe_hf.expert_weights(experts)
    assert w.w13.data_ptr() == experts.gate_up_proj.data_ptr()


def _call(module, x, ids, weights, impl):
    module.config._experts_implementation_internal = impl
    with torch.no_grad():
        return module(x, ids, weights)


def _routed(module, tokens: int = 6, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, module.gate_up_proj.shape[-1], generator=gen)
    ids = torch.stack([torch.randperm(module.num_experts, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    return x, ids, weights


def test_prepares_once_and_again_when_weights_or_dtype_change():
    module = _experts(_model("mixtral"))[0]
    x, ids, weights = _routed(module)
    _call(module, x, ids, weights, "moe_core")
    state = module._moe_core_state
    _call(module, x, ids, weights, "moe_core")
    assert module._moe_core_state is state, "prepared again without a change"

    with torch.no_grad():  # in place, as load_state_dict does
        module.down_proj.mul_(-0.5)
    out = _call(module, x, ids, weights, "moe_core")
    assert module._moe_core_state is not state
    torch.testing.assert_close(out, _call(module, x, ids, weights, "eager"))

    state = module._moe_core_state  # reassigned parameter
    module.gate_up_proj = torch.nn.Parameter(torch.randn_like(module.gate_up_proj) * 0.2)
    out = _call(module, x, ids, weights, "moe_core")
    assert module._moe_core_state is not state
    torch.testing.assert_close(out, _call(module, x, ids, weights, "eager"))

    module.to(torch.bfloat16)
    xb, wb = x.bfloat16(), weights.bfloat16()
    out = _call(module, xb, ids, wb, "moe_core")
    assert out.dtype == torch.bfloat16
    assert moe_hf.cached_plan(module).spec.dtype == torch.bfloat16
    assert relative_error(out, _call(module, xb, ids, wb, "eager")) <= 2e-2


def test_expert_parallel_sentinel_ids_contribute_nothing():
    module = _experts(_model("mixtral"))[0]
    x, ids, weights = _routed(module)
    ids[::2, 1] = module.num_experts  # transformers' EP marks off-rank routes so, with weight 0
    weights[::2, 1] = 0.0
    module._is_expert_parallel = True
    out = _call(module, x, ids, weights, "moe_core")
    assert moe_hf.cached_plan(module).spec.is_expert_parallel
    torch.testing.assert_close(out, _call(module, x, ids, weights, "eager"))


def test_unmatched_gate_function_falls_back_to_eager_with_a_warning():
    module = _experts(_model("mixtral"))[0]
    module.act_fn = ACT2FN["gelu_pytorch_tanh"]  # no moe-core activation is tanh-approximated gelu
    x, ids, weights = _routed(module)
    with pytest.warns(RuntimeWarning, match="matches none of"):
        out = _call(module, x, ids, weights, "moe_core")
    assert moe_hf.cached_plan(module) is None
    torch.testing.assert_close(out, _call(module, x, ids, weights, "eager"))


def test_gelu_experts_run_on_moe_core():
    module = _experts(_model("mixtral"))[0]
    module.act_fn = ACT2FN["gelu"]
    x, ids, weights = _routed(module)
    out = _call(module, x, ids, weights, "moe_core")
    assert moe_hf.cached_plan(module).spec.activation == "gelu"
    torch.testing.assert_close(out, _call(module, x, ids, weights, "eager"))


def test_post_expert_norm_is_unsupported():
    module = _experts(_model("mixtral"))[0]
    module.has_post_expert_norm = True
    assert "post-expert norm" in moe_hf.unsupported_reason(module)


def test_training_falls_back_to_eager_and_keeps_gradients():
    model = _model("mixtral")
    model.set_experts_implementation("moe_core")
    with pytest.warns(RuntimeWarning, match="inference only"):
        loss = model(_ids()).logits.square().mean()
    loss.backward()
    assert all(m.gate_up_proj.grad is not None for m in _experts(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", MODELS)
def test_bf16_on_gpu_with_the_installed_plugins(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MOE_LOAD_PLUGINS")  # the GPU kernels come from plugins
    model = _model(name).to("cuda", torch.bfloat16)
    ids = _ids().cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
        expected_tokens = _greedy(model, ids[:1])
        model.set_experts_implementation("moe_core")
        logits = model(ids).logits.float()
        tokens = _greedy(model, ids[:1])
    plans = [moe_hf.cached_plan(m) for m in _experts(model)]
    assert all(p is not None and p.spec.dtype == torch.bfloat16 for p in plans)
    print(
        f"{name}: kernel {plans[0].kernel}, logits rel. error {relative_error(logits, expected):.2e}, "
        f"greedy tokens equal: {torch.equal(tokens, expected_tokens)}"
    )
    assert relative_error(logits, expected) <= 3e-2
