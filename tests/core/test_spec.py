"""MoESpec / QuantScheme validation and the expert-parallel map."""

from __future__ import annotations

import pytest
import torch

from moe_core import MoEInputError, MoESpec, QuantScheme


def test_quant_scheme_defaults():
    assert QuantScheme("fp8").weight_scale == "per_channel"
    assert QuantScheme("fp8").activation == "fp8_per_token"
    assert QuantScheme("fp8_block").block_shape == (128, 128)
    assert QuantScheme("fp8_block").activation == "fp8_group"
    assert QuantScheme("mxfp4").activation == "none"
    assert QuantScheme("nvfp4").activation == "nvfp4"
    assert QuantScheme("bf16").weight_dtype == torch.bfloat16
    assert QuantScheme("mxfp4").weight_dtype == torch.uint8
    assert QuantScheme("fp8").weight_dtype == torch.float8_e4m3fn
    assert not QuantScheme("fp16").is_quantized and QuantScheme("nvfp4").is_quantized


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "int3"},
        {"name": "fp8", "activation": "nvfp4"},
        {"name": "bf16", "weight_scale": "per_channel"},
        {"name": "fp8", "weight_scale": "per_block"},
        {"name": "fp8", "block_shape": (128, 128)},
        {"name": "fp8_block", "block_shape": (0, 128)},
    ],
)
def test_quant_scheme_rejects(kwargs):
    with pytest.raises(MoEInputError):
        QuantScheme(**kwargs)


def test_spec_defaults_and_coercion():
    spec = MoESpec(8, 2, 64, 32, quant="fp8_block", dtype=torch.float16)
    assert spec.quant == QuantScheme("fp8_block")
    assert MoESpec(8, 2, 64, 32, dtype=torch.float16).quant.name == "fp16"
    oai = MoESpec(8, 2, 64, 32, activation="swiglu_oai")
    assert (oai.swiglu_alpha, oai.swiglu_limit) == (1.702, 7.0)
    assert MoESpec(8, 2, 64, 32, activation="relu2").w13_rows == 32
    assert MoESpec(8, 2, 64, 32).w13_rows == 64
    assert hash(spec) == hash(MoESpec(8, 2, 64, 32, quant="fp8_block", dtype=torch.float16))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_experts": 0},
        {"top_k": 9},
        {"hidden_size": -1},
        {"activation": "tanh"},
        {"dtype": torch.int8},
        {"swiglu_alpha": 1.0},
        {"ep_size": 3, "ep_rank": 3},
        {"ep_size": 9},
        {"expert_map": [0, 1, 2]},
        {"expert_map": [0, 0, -1, -1, -1, -1, -1, -1]},
        {"expert_map": [-1] * 8},
        {"expert_map": [0, 1, -2, -1, -1, -1, -1, -1]},
        {"apply_router_weight_on_input": True},
        {"quant": "mxfp4", "hidden_size": 48},
        {"quant": "nvfp4", "intermediate_size": 40},
        {"top_k": True},
    ],
)
def test_spec_rejects(kwargs):
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 32}
    base.update(kwargs)
    with pytest.raises(MoEInputError):
        MoESpec(**base)


def test_ep_ranks_partition_the_experts_like_vllm():
    # 10 experts over 4 ranks: 3, 3, 2, 2, contiguous
    maps = [MoESpec(10, 2, 64, 32, ep_size=4, ep_rank=r).global_to_local() for r in range(4)]
    assert [sum(v >= 0 for v in m) for m in maps] == [3, 3, 2, 2]
    owners = [[r for r in range(4) if maps[r][e] >= 0] for e in range(10)]
    assert owners == [[0], [0], [0], [1], [1], [1], [2], [2], [3], [3]]
    assert maps[1][3:6] == (0, 1, 2)


def test_explicit_expert_map():
    spec = MoESpec(6, 2, 64, 32, expert_map=torch.tensor([-1, 1, -1, 0, -1, -1]))
    assert spec.expert_map == (-1, 1, -1, 0, -1, -1)
    assert spec.num_local_experts == 2 and spec.is_expert_parallel
    assert spec.expert_map_tensor().dtype == torch.int32
    assert MoESpec(6, 2, 64, 32).expert_map_tensor() is None
    assert spec.replace(top_k=1).top_k == 1


def test_replace_dtype_moves_an_unquantized_scheme_with_it():
    spec = MoESpec(8, 2, 48, 40, dtype=torch.float32)
    assert str(spec.quant) == "fp32"
    bf16 = spec.replace(dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and str(bf16.quant) == "bf16"
    fp8 = MoESpec(8, 2, 128, 128, dtype=torch.bfloat16, quant="fp8")
    assert fp8.replace(dtype=torch.float16).quant == fp8.quant  # a quantized scheme is kept
    assert str(spec.replace(dtype=torch.float16, quant="fp16").quant) == "fp16"


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme("fp8"),
        QuantScheme("fp8", activation="fp8_per_tensor", weight_scale="per_tensor"),
        QuantScheme("fp8_block", block_shape=(64, 128)),
        QuantScheme("mxfp4", activation="fp8_per_tensor"),
        QuantScheme("nvfp4"),
        QuantScheme("bf16"),
    ],
)
def test_quant_scheme_parses_its_own_str(scheme):
    text = str(scheme) + ("/b:{}x{}".format(*scheme.block_shape) if scheme.block_shape else "")
    assert QuantScheme.parse(text) == scheme
    assert MoESpec(8, 2, 128, 128, quant=text).quant == scheme


@pytest.mark.parametrize(
    "text", ["fp8/x:1", "fp8/w:per_tensor/w:per_channel", "fp8_block/b:128", "fp8/a:nvfp4", "int3"]
)
def test_quant_scheme_parse_refuses(text):
    with pytest.raises(MoEInputError):
        QuantScheme.parse(text)
