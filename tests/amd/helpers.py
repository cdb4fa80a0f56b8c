"""Shared by the AMD-plugin tests: where kernels run (a GPU, or the CPU in Triton's interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: device the non-GPU tests run on: the GPU if present, else the CPU under the interpreter
DEVICE = "cuda" if HAS_GPU else "cpu"

needs_triton = pytest.mark.skipif(
    not (HAS_GPU or INTERPRET), reason="needs a GPU, or TRITON_INTERPRET=1 set before Triton is imported"
)
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA/ROCm GPU")
