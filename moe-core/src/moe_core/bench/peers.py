"""Peers timed beside the registered kernels: what a user has without this project.

- ``grouped_mm``: ``torch._grouped_mm`` with a torch sort, gather and scatter around it
  (PyTorch's native grouped GEMM; bf16, silu, no bias). Eager only: its group sizes
  are read on the host, so it cannot be captured in a CUDA graph.
- ``scaled_grouped_mm``: the same around ``torch._scaled_grouped_mm`` (fp8 rowwise: e4m3
  weights with per-channel or per-tensor scales, activations quantized per row by
  ``moe_core.quant`` before each GEMM; bf16 output; NVIDIA sm_90 and newer). Eager only.
- ``vllm``: vLLM's Triton ``fused_moe``, loaded from a folder given with
  ``--vllm-peer PATH`` or ``MOE_BENCH_VLLM`` (git-ignored, never committed). The folder
  is a package providing ``fused_moe(x, w1, w2, topk_weights, topk_ids)`` (canonical
  ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``) and ``describe() -> dict``; optionally
  ``fused_moe_fp8(x, w1, w2, w1_scale, w2_scale, topk_weights, topk_ids, block_shape)``
  for vLLM's fp8 path (e4m3 weights in the canonical layout, ``moe_core.quant``'s scales:
  per-channel ``[E, N]`` with ``block_shape=None`` and per-token dynamic activations, or
  128x128 blocks ``[E, N/128, K/128]`` with ``block_shape=(128, 128)`` and 1x128 groups).

Each :class:`Peer` says whether it runs a spec (a reason when not) and binds
a set of canonical weights to a callable ``fn(x, topk_weights, topk_ids) -> out``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..quant import quantize_fp8_per_token
from ..spec import ExpertWeights, MoESpec

__all__ = [
    "Peer",
    "grouped_mm_peer",
    "load_vllm_peer",
    "make_peers",
    "scaled_grouped_mm",
    "scaled_grouped_mm_peer",
    "vllm_peer",
]

PeerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Peer:
    """One peer: ``name`` (the JSON key prefix), ``label``, and how to run it."""

    name: str
    label: str
    supports: Callable[[MoESpec, torch.device], str | None]
    bind: Callable[[MoESpec, ExpertWeights], PeerFn]
    graphs: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    describe: Callable[[], dict[str, Any]] | None = None


def _plain_silu(spec: MoESpec, quantized: bool = False) -> str | None:
    """Why a peer without epilogue options cannot run ``spec`` (``quantized``: its weights may be)."""
    if spec.quant.is_quantized and not quantized:
        return f"quant {spec.quant.name} not supported"
    if spec.activation != "silu":
        return f"activation {spec.activation} not supported"
    if spec.has_bias:
        return "biases not supported"
    if spec.is_expert_parallel:
        return "expert parallelism not supported"
    if spec.apply_router_weight_on_input:
        return "router weight on input not supported"
    return None


def grouped_mm(spec: MoESpec, x, w13_t, w2_t, topk_w, topk_ids) -> torch.Tensor:
    """``torch._grouped_mm`` with a torch sort/gather/scatter around it (``w*_t``: ``[E, K, N]`` views)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // k
    a = x[tokens]
    h = torch._grouped_mm(a, w13_t, offs=offs)
    inter = spec.intermediate_size
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(act, w2_t, offs=offs)
    y = y * topk_w.reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, y)
    return out


def grouped_mm_peer() -> Peer:
    """The ``torch._grouped_mm`` peer (bf16 only)."""

    def supports(spec: MoESpec, device: torch.device) -> str | None:
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no _grouped_mm"
        if spec.dtype != torch.bfloat16:
            return f"dtype {spec.dtype} not supported (bf16 only)"
        return _plain_silu(spec)

    def bind(spec: MoESpec, weights: ExpertWeights) -> PeerFn:
        w13_t, w2_t = weights.w13.transpose(1, 2), weights.w2.transpose(1, 2)
        return lambda x, w, ids: grouped_mm(spec, x, w13_t, w2_t, w, ids)

    return Peer("grouped_mm", "torch._grouped_mm", supports, bind, graphs=False)


def _rowwise_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of ``v [M, K]`` and their float32 scales ``[M]`` (``moe_core.quant``'s per-token)."""
    q, scale = quantize_fp8_per_token(v)
    return q, scale.reshape(-1)


def scaled_grouped_mm(spec: MoESpec, x, w13_t, s13, w2_t, s2, topk_w, topk_ids) -> torch.Tensor:
    """The fp8 rowwise MoE on ``torch._scaled_grouped_mm`` (``w*_t``: e4m3 ``[E, K, N]`` column-major
    views, ``s*``: float32 ``[E, N]``), with a torch sort/gather/scatter around it."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // k
    a, a_scale = _rowwise_fp8(x[tokens])
    h = torch._scaled_grouped_mm(a, w13_t, a_scale, s13, offs=offs, out_dtype=torch.bfloat16)
    inter = spec.intermediate_size
    act = torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()
    b, b_scale = _rowwise_fp8(act)
    y = torch._scaled_grouped_mm(b, w2_t, b_scale, s2, offs=offs, out_dtype=torch.bfloat16)
    y = y.float() * topk_w.reshape(-1)[order, None].float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def scaled_grouped_mm_peer() -> Peer:
    """The ``torch._scaled_grouped_mm`` peer (fp8 rowwise, bf16, NVIDIA sm_90+)."""

    def supports(spec: MoESpec, device: torch.device) -> str | None:
        if not hasattr(torch, "_scaled_grouped_mm"):
            return f"torch {torch.__version__} has no _scaled_grouped_mm"
        scheme = spec.quant
        if scheme.name != "fp8" or scheme.activation != "fp8_per_token":
            return f"quant {scheme.name} ({scheme.activation}) not supported (fp8 with per-token activations)"
        if spec.dtype != torch.bfloat16:
            return f"dtype {spec.dtype} not supported (bf16 only)"
        if spec.hidden_size % 16 or spec.intermediate_size % 16:
            return "hidden and intermediate sizes must be multiples of 16"
        if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device) < (9, 0):
            return "needs an NVIDIA GPU of sm_90 or newer"
        return _plain_silu(spec, quantized=True)

    def bind(spec: MoESpec, weights: ExpertWeights) -> PeerFn:
        def scales(s: torch.Tensor, rows: int) -> torch.Tensor:  # per-tensor [E] -> [E, N]
            s = s.float()
            return (s[:, None] if s.dim() == 1 else s).expand(s.shape[0], rows).contiguous()

        w13_t, w2_t = weights.w13.transpose(1, 2), weights.w2.transpose(1, 2)
        s13 = scales(weights.w13_scale, weights.w13.shape[1])
        s2 = scales(weights.w2_scale, weights.w2.shape[1])
        return lambda x, w, ids: scaled_grouped_mm(spec, x, w13_t, s13, w2_t, s2, w, ids)

    return Peer("scaled_grouped_mm", "torch._scaled_grouped_mm", supports, bind, graphs=False)


def load_vllm_peer(path: str | os.PathLike) -> Any:
    """Import the vLLM peer package from ``path`` (a folder with ``__init__.py``)."""
    folder = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(
        "moe_bench_vllm_peer", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None or not (folder / "__init__.py").is_file():
        raise ImportError(f"no vLLM peer package at {folder} (expected {folder / '__init__.py'})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def vllm_peer(path: str | os.PathLike) -> Peer:
    """The vLLM ``fused_moe`` peer loaded from ``path`` (bf16/fp16, silu, no bias; fp8 rowwise and
    fp8_block where the package has ``fused_moe_fp8``)."""
    module = load_vllm_peer(path)

    fp8 = getattr(module, "fused_moe_fp8", None)

    def supports(spec: MoESpec, device: torch.device) -> str | None:
        if spec.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {spec.dtype} not supported"
        if device.type != "cuda":
            return "needs a GPU"
        if spec.quant.is_quantized:
            scheme = spec.quant
            if fp8 is None:
                return f"quant {scheme.name}: the peer package has no fused_moe_fp8"
            rowwise = scheme.name == "fp8" and (scheme.weight_scale, scheme.activation) == (
                "per_channel",
                "fp8_per_token",
            )
            if not (rowwise or scheme.name == "fp8_block"):
                return f"quant {scheme.name} ({scheme.weight_scale}, {scheme.activation}) not supported"
        return _plain_silu(spec, quantized=True)

    def bind(spec: MoESpec, weights: ExpertWeights) -> PeerFn:
        if not spec.quant.is_quantized:
            return lambda x, w, ids: module.fused_moe(x, weights.w13, weights.w2, w, ids)
        block = tuple(spec.quant.block_shape) if spec.quant.name == "fp8_block" else None
        w13, w2, s13, s2 = weights.w13, weights.w2, weights.w13_scale, weights.w2_scale
        return lambda x, w, ids: fp8(x, w13, w2, s13, s2, w, ids, block)

    info = {"status": "loaded", "path": str(Path(path).resolve()), **module.describe()}
    return Peer("vllm", "vllm.fused_moe", supports, bind, graphs=True, info=info, describe=module.describe)


def make_peers(vllm_path: str | os.PathLike | None) -> tuple[list[Peer], dict[str, dict[str, Any]]]:
    """The peers to time and the report's ``peers`` section (status of each, vLLM's description)."""
    peers = [grouped_mm_peer(), scaled_grouped_mm_peer()]
    status: dict[str, dict[str, Any]] = {
        name: {"status": "available" if hasattr(torch, f"_{name}") else "skipped"}
        for name in ("grouped_mm", "scaled_grouped_mm")
    }
    if vllm_path:
        peer = vllm_peer(vllm_path)
        peers.append(peer)
        status["vllm"] = peer.info
    else:
        status["vllm"] = {"status": "skipped", "reason": "no --vllm-peer PATH or MOE_BENCH_VLLM"}
    return peers, status
