"""Ceilings of the device (copy bandwidth, GEMM rates) and the physical floor of a MoE layer.

The floor is ../shared/BENCHMARKS.md's formula::

    floor = max(bytes / bandwidth, FLOPs / rate)
    bytes = expected distinct active experts x (3 H I x bytes per weight + scales + biases)
            + activations in and out (2 T H x activation bytes)
    FLOPs = 2 T k 3 H I

with bytes per weight 2 for bf16/fp16 (4 for fp32), 1 for fp8 (per-channel or block
scales on top), 0.5 for mxfp4/nvfp4 (plus one e8m0 byte per 32 or one e4m3 byte per
16 weights along K). The rate is the dense bf16 GEMM rate, or the fp8 rate when
the activations are quantized to fp8 (fp8, fp8_block, mxfp4 W4A8) or fp4 (nvfp4;
the fp4 rate when one was measured). With ``T`` tokens routed uniformly to ``k``
of ``E`` experts, ``E (1 - (1 - k/E)^T)`` distinct experts are expected active;
fused shared experts are always active.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..spec import MoESpec, QuantScheme
from .timing import median_us

if TYPE_CHECKING:
    from ..presets import ModelPreset

__all__ = [
    "H100_CEILINGS",
    "L2_FLUSH_BYTES",
    "MAX_COLD_ROUTINGS",
    "cold_routings",
    "expected_active_experts",
    "expert_bytes",
    "floor_us",
    "layer_flops",
    "measure_ceilings",
    "preset_floor_us",
]

#: Ceilings measured on the lent H100 80GB HBM3 (../shared/BENCHMARKS.md), for reference and tests.
H100_CEILINGS: dict[str, float] = {
    "copy_bytes_per_s": 3.02e12,
    "bf16_flops_per_s": 716e12,
    "fp8_flops_per_s": 1256e12,
}

_FP8_ACTIVATIONS = ("fp8_per_token", "fp8_per_tensor", "fp8_group")
#: inputs and weights are rotated through enough copies to exceed this (the L2 cache and then some)
L2_FLUSH_BYTES = 256 * 2**20
#: most routings :func:`cold_routings` returns
MAX_COLD_ROUTINGS = 16


def expected_active_experts(num_routed: int, routed_k: int, tokens: int, num_shared: int = 0) -> float:
    """Distinct experts expected to be hit by ``tokens`` tokens routed uniformly to ``routed_k`` of ``num_routed``."""
    if tokens <= 0:
        return float(num_shared)
    return num_routed * (1 - (1 - routed_k / num_routed) ** tokens) + num_shared


def expert_bytes(spec: MoESpec) -> float:
    """Bytes of one expert's weights as stored in ``spec.quant``: weights, scales, biases."""
    H, inter = spec.hidden_size, spec.intermediate_size
    scheme: QuantScheme = spec.quant
    n1 = spec.w13_rows  # 2I for gated activations, I otherwise
    elements = n1 * H + H * inter
    name = scheme.name
    if not scheme.is_quantized:
        total = elements * scheme.weight_dtype.itemsize
    elif name == "fp8":
        scales = 2 if scheme.weight_scale == "per_tensor" else n1 + H
        total = elements + 4 * scales
    elif name == "fp8_block":
        bn, bk = scheme.block_shape
        scales = math.ceil(n1 / bn) * math.ceil(H / bk) + math.ceil(H / bn) * math.ceil(inter / bk)
        total = elements + 4 * scales
    elif name == "mxfp4":
        total = elements * 0.5 + elements / 32  # e2m1 + one e8m0 per 32 along K
    elif name == "nvfp4":
        total = elements * 0.5 + elements / 16 + 4 * 2  # e2m1 + one e4m3 per 16 + fp32 global scales
    else:  # a scheme added later: count its storage dtype
        total = elements * scheme.weight_dtype.itemsize
    if spec.has_bias:
        total += (n1 + H) * spec.dtype.itemsize
    return float(total)


def layer_flops(spec: MoESpec, tokens: int) -> float:
    """``2 T k 3 H I`` (gated; ``2 T k 2 H I`` for a non-gated activation)."""
    H, inter = spec.hidden_size, spec.intermediate_size
    return 2.0 * tokens * spec.top_k * (spec.w13_rows * H + H * inter)


def _rate(spec: MoESpec, ceilings: dict[str, float]) -> float:
    bf16 = ceilings["bf16_flops_per_s"]
    fp8 = ceilings.get("fp8_flops_per_s") or 2 * bf16
    mode = spec.quant.activation
    if mode in _FP8_ACTIVATIONS:
        return fp8
    if mode == "nvfp4":
        return ceilings.get("fp4_flops_per_s") or fp8
    return bf16


def floor_us(
    spec: MoESpec,
    tokens: int,
    ceilings: dict[str, float],
    *,
    num_routed: int | None = None,
    num_shared: int = 0,
) -> float:
    """The layer's floor in microseconds at ``tokens`` tokens (module docstring).

    ``num_routed`` (default: ``spec.num_experts - num_shared``) routed experts take
    ``spec.top_k - num_shared`` slots each token; ``num_shared`` shared experts are
    always active.
    """
    routed = spec.num_experts - num_shared if num_routed is None else num_routed
    active = expected_active_experts(routed, spec.top_k - num_shared, tokens, num_shared)
    act_bytes = 2 * tokens * spec.hidden_size * spec.dtype.itemsize
    nbytes = active * expert_bytes(spec) + act_bytes
    seconds = max(nbytes / ceilings["copy_bytes_per_s"], layer_flops(spec, tokens) / _rate(spec, ceilings))
    return seconds * 1e6


def preset_floor_us(preset: ModelPreset, spec: MoESpec, tokens: int, ceilings: dict[str, float]) -> float:
    """:func:`floor_us` of ``spec`` (one of ``preset``'s layers) with the preset's routed and
    always-active shared experts."""
    return floor_us(
        spec,
        tokens,
        ceilings,
        num_routed=preset.num_experts,
        num_shared=preset.routing.num_fused_shared_experts,
    )


def measure_ceilings(device: torch.device | str) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and GEMM rates, measured on ``device``.

    CUDA: a 1 GiB device-to-device copy, a dense bf16 GEMM 8192^3 and, where the
    device has fp8 (``torch._scaled_mm``), an fp8 GEMM 8192^3. CPU: a 64 MiB copy
    and a bf16 GEMM 1024^3 (the floors there are only indicative).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = (1 << 30) if cuda else (64 << 20)
    m = 8192 if cuda else 1024
    iters = 20 if cuda else 5
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t, _ = median_us(lambda: dst.copy_(src), iters, device)
    ceilings = {"copy_bytes_per_s": 2 * n / (t * 1e-6)}
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, _ = median_us(lambda: a @ b, iters, device)
    ceilings["bf16_flops_per_s"] = 2 * m**3 / (t * 1e-6)
    if cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9):
        try:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as cuBLASLt wants
            one = torch.ones((), device=device)

            def fp8_mm():
                return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

            for _ in range(3):
                fp8_mm()
            t, _ = median_us(fp8_mm, iters, device)
            ceilings["fp8_flops_per_s"] = 2 * m**3 / (t * 1e-6)
        except Exception:  # no fp8 GEMM here: floors fall back to twice the bf16 rate
            pass
    return ceilings


def cold_routings(spec: MoESpec, tokens: int) -> int:
    """The fewest routings of ``tokens`` tokens (uniform, ``spec.top_k`` of ``spec.num_experts``)
    whose expected distinct experts hold more than :data:`L2_FLUSH_BYTES` of weights, at least 1 and
    at most :data:`MAX_COLD_ROUTINGS`. A kernel timed over that many routings in turn reads its
    weights from memory, as in a model's forward where every layer has experts of its own; replayed
    on one routing, a decode step's 8-50 MB stay in the L2 cache."""
    active = expected_active_experts(spec.num_experts, spec.top_k, tokens) * expert_bytes(spec)
    return max(1, min(MAX_COLD_ROUTINGS, -(-L2_FLUSH_BYTES // max(1, int(active)))))
