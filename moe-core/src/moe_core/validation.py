"""Input checks that raise :class:`MoEInputError` before any kernel launches.

Shape, dtype, device and layout checks are free (host metadata only) and always
run. Value checks (expert ids in range) read tensor data; on an accelerator
that is a host-device synchronisation, so they run:

- always for CPU tensors;
- for GPU tensors only when ``MOE_CHECK_INPUTS=1`` (debugging), never while a
  CUDA graph is being captured or under ``torch.compile`` tracing.

GPU kernels must therefore never fault on out-of-range ids; they skip them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .errors import MoEInputError

__all__ = [
    "check_dtype",
    "check_float_tensor",
    "check_same_device",
    "check_shape",
    "check_topk",
    "check_topk_ids",
    "check_values_asked",
    "should_check_values",
]

_INT_DTYPES = (torch.int32, torch.int64)


def check_values_asked() -> bool:
    """Whether ``MOE_CHECK_INPUTS`` asks for value checks on GPU tensors (``1``, ``true``, ``yes``)."""
    return os.environ.get("MOE_CHECK_INPUTS", "") in ("1", "true", "yes")


def should_check_values(tensor: torch.Tensor) -> bool:
    """Whether data-dependent checks may run on ``tensor`` without an unwanted sync."""
    if torch.compiler.is_compiling():
        return False
    if tensor.device.type == "cpu":
        return True
    if not check_values_asked():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MoEInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_shape(tensor: torch.Tensor, shape: Iterable[int | None], name: str) -> None:
    """Check ``tensor.shape`` against ``shape`` (``None`` matches any size)."""
    expected = tuple(shape)
    if tensor.dim() != len(expected) or any(e is not None and e != s for s, e in zip(tensor.shape, expected)):
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise MoEInputError(f"{name} has shape {list(tensor.shape)}, expected {shown}")


def check_dtype(tensor: torch.Tensor, dtypes: torch.dtype | Iterable[torch.dtype], name: str) -> None:
    allowed = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if tensor.dtype not in allowed:
        shown = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise MoEInputError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {shown}")


def check_float_tensor(tensor: object, name: str) -> torch.Tensor:
    tensor = check_tensor(tensor, name)
    if not tensor.dtype.is_floating_point:
        raise MoEInputError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def check_same_device(tensors: dict[str, torch.Tensor | None], device: torch.device | None = None) -> None:
    """All given tensors live on one device (``device`` if given)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    if not present:
        return
    ref_name, ref = next(iter(present.items()))
    want = torch.device(device) if device is not None else ref.device
    for name, t in present.items():
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            other = ref_name if device is None else "the planned device"
            raise MoEInputError(f"{name} is on {t.device}, but {other} is on {want}")


def check_topk_ids(topk_ids: object, num_experts: int, name: str = "topk_ids") -> torch.Tensor:
    """``topk_ids`` is a 2-D int32/int64 tensor with values in ``[0, num_experts)``."""
    ids = check_tensor(topk_ids, name)
    if ids.dim() != 2:
        raise MoEInputError(f"{name} must be 2-D [tokens, top_k], got shape {list(ids.shape)}")
    check_dtype(ids, _INT_DTYPES, name)
    if ids.numel() and should_check_values(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise MoEInputError(f"{name} holds a negative expert id ({lo})")
        if hi >= num_experts:
            raise MoEInputError(f"{name} holds expert id {hi}, out of range for num_experts={num_experts}")
    return ids


def check_topk(
    topk_weights: object, topk_ids: object, num_tokens: int, top_k: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router outputs: weights float ``[T, k]`` and ids int ``[T, k]`` with ids in range."""
    ids = check_topk_ids(topk_ids, num_experts)
    weights = check_float_tensor(topk_weights, "topk_weights")
    check_shape(weights, (num_tokens, top_k), "topk_weights")
    check_shape(ids, (num_tokens, top_k), "topk_ids")
    return weights, ids
