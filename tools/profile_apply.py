"""Host overhead of moe_apply on the GPU: per-call wall time when host-bound, and a cProfile."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

import moe_core
from moe_core.presets import get_preset
from moe_core.testing import random_expert_weights, random_routing

model = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 1
preset = get_preset(model)
spec = preset.moe_spec(torch.bfloat16)
plan = moe_core.moe_plan(spec, "cuda")
prepared = plan.prepare(random_expert_weights(spec, device="cuda"))
x = torch.randn(T, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
w, ids = random_routing(preset.routing, T, preset.num_experts, device="cuda")
out = torch.empty_like(x)
for _ in range(20):
    moe_core.moe_apply(plan, x, prepared, w, ids, out=out)
torch.cuda.synchronize()
n = 300
t0 = time.perf_counter()
for _ in range(n):
    moe_core.moe_apply(plan, x, prepared, w, ids, out=out)
host = (time.perf_counter() - t0) / n * 1e6
torch.cuda.synchronize()
total = (time.perf_counter() - t0) / n * 1e6
print(f"{model} T={T}: host {host:.1f} us/call, host+device {total:.1f} us/call")
prof = cProfile.Profile()
prof.enable()
for _ in range(n):
    moe_core.moe_apply(plan, x, prepared, w, ids, out=out)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
