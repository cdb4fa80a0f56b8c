"""Model presets: one MoE layer's shape and routing for well-known models.

``get_preset(name).moe_spec(dtype=..., quant=...)`` gives the layer's
:class:`MoESpec`; ``.routing`` its :class:`RoutingSpec`. The ``tiny-*`` presets
keep each model's structure at sizes a laptop CPU runs in milliseconds.
Plugins may add presets through the ``register_presets`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MoEInputError
from .routing import RoutingSpec
from .spec import MoESpec, QuantScheme

__all__ = ["PRESETS", "ModelPreset", "all_presets", "get_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """One MoE layer of a model (after any tensor-parallel sharding named in ``name``).

    ``num_experts`` counts routed experts; ``routing.num_fused_shared_experts``
    shared experts are appended to them in the spec. ``release_quant`` is the
    scheme the model's checkpoint ships in (informational).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    routing: RoutingSpec
    activation: str = "silu"
    has_bias: bool = False
    apply_router_weight_on_input: bool = False
    release_quant: str | None = None
    description: str = ""

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def moe_spec(
        self,
        dtype: torch.dtype = torch.bfloat16,
        quant: QuantScheme | str | None = None,
        *,
        ep_size: int = 1,
        ep_rank: int = 0,
    ) -> MoESpec:
        """The layer's spec; shared experts count as experts, their slots as top-k slots."""
        return MoESpec(
            num_experts=self.num_experts + self.routing.num_fused_shared_experts,
            top_k=self.routing.num_slots,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            activation=self.activation,
            has_bias=self.has_bias,
            quant=quant,
            dtype=dtype,
            ep_size=ep_size,
            ep_rank=ep_rank,
            apply_router_weight_on_input=self.apply_router_weight_on_input,
        )


def _softmax(k: int) -> RoutingSpec:
    return RoutingSpec("softmax", top_k=k, renormalize=True)


def _deepseek(k: int, groups: int, keep: int) -> RoutingSpec:
    return RoutingSpec(
        "biased_grouped",
        top_k=k,
        renormalize=True,
        num_expert_group=groups,
        topk_group=keep,
        routed_scaling_factor=2.5,
        num_fused_shared_experts=1,
    )


_GPT_OSS = {"activation": "swiglu_oai", "has_bias": True, "release_quant": "mxfp4"}
_LLAMA4 = {"apply_router_weight_on_input": True}

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("mixtral-8x7b", 4096, 14336, 8, _softmax(2), description="Mixtral 8x7B"),
        ModelPreset("qwen3-30b-a3b", 2048, 768, 128, _softmax(8), description="Qwen3-30B-A3B"),
        ModelPreset("qwen3-235b-a22b", 4096, 1536, 128, _softmax(8), description="Qwen3-235B-A22B"),
        ModelPreset("qwen3-235b-a22b-tp8", 4096, 192, 128, _softmax(8), description="Qwen3-235B-A22B, I/8"),
        ModelPreset(
            "deepseek-v3",
            7168,
            2048,
            256,
            _deepseek(8, 8, 4),
            release_quant="fp8_block",
            description="DeepSeek-V3/R1",
        ),
        ModelPreset(
            "deepseek-v3-tp8",
            7168,
            256,
            256,
            _deepseek(8, 8, 4),
            release_quant="fp8_block",
            description="DeepSeek-V3/R1, I/8",
        ),
        ModelPreset(
            "gpt-oss-20b",
            2880,
            2880,
            32,
            RoutingSpec("softmax_after_topk", 4),
            **_GPT_OSS,
            description="gpt-oss-20b",
        ),
        ModelPreset(
            "gpt-oss-120b",
            2880,
            2880,
            128,
            RoutingSpec("softmax_after_topk", 4),
            **_GPT_OSS,
            description="gpt-oss-120b",
        ),
        ModelPreset(
            "llama-4-scout",
            5120,
            8192,
            16,
            RoutingSpec("sigmoid", 1),
            **_LLAMA4,
            description="Llama 4 Scout (routed experts)",
        ),
        ModelPreset("tiny-mixtral", 128, 224, 8, _softmax(2), description="Mixtral structure, tiny"),
        ModelPreset("tiny-qwen3-moe", 128, 96, 16, _softmax(4), description="Qwen3-MoE structure, tiny"),
        ModelPreset(
            "tiny-deepseek-v3", 128, 64, 32, _deepseek(4, 8, 4), description="DeepSeek-V3 structure, tiny"
        ),
        ModelPreset(
            "tiny-gpt-oss",
            128,
            96,
            8,
            RoutingSpec("softmax_after_topk", 2),
            **_GPT_OSS,
            description="gpt-oss structure, tiny",
        ),
        ModelPreset(
            "tiny-llama-4",
            128,
            160,
            4,
            RoutingSpec("sigmoid", 1),
            **_LLAMA4,
            description="Llama 4 structure, tiny",
        ),
    )
}


def all_presets() -> dict[str, ModelPreset]:
    """The core presets plus those registered by plugins."""
    from .plugins import plugin_manager

    return {**PRESETS, **plugin_manager().presets}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; :class:`MoEInputError` listing the known names otherwise."""
    presets = all_presets()
    if name not in presets:
        raise MoEInputError(f"unknown model preset {name!r}; known: {', '.join(sorted(presets))}")
    return presets[name]
