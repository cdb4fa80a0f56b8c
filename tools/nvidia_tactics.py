"""On the lent GPU: why FlashInfer's autotuner rejects cutlass MoE tactics with the prebuilt module.

    python tools/nvidia_tactics.py [--model qwen3-30b-a3b] [--tokens 32] [--each]

Plans ``nvidia.flashinfer.cutlass`` for the preset (bf16), runs FlashInfer's own autotuner at
``--tokens`` with its logger at DEBUG, and prints per GEMM how many tactics FlashInfer offers, how
many it skipped, and each distinct failure message with its count (the stubbed symbols of the
dtypes not built name themselves: "built without ..."). ``--each`` also runs every tactic of each
GEMM alone through ``profile_ids`` and prints its time or its error. Needs FlashInfer and the
prebuilt ``fused_moe_90`` (tools/device_nvidia.sh sets that up).
"""

from __future__ import annotations

import argparse
import collections
import logging
import re

import torch

from moe_core import moe_plan
from moe_core.presets import get_preset
from moe_core.testing import random_expert_weights


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--each", action="store_true")
    args = ap.parse_args()

    from flashinfer import autotune

    from moe_plugin_nvidia import cutlass

    preset = get_preset(args.model)
    spec = preset.moe_spec(torch.bfloat16, None)
    plan = moe_plan(spec, "cuda", backend=cutlass.KERNEL)
    prepared = plan.prepare(random_expert_weights(spec, device="cuda", seed=1))
    T = args.tokens
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    w, ids = torch.topk(torch.softmax(torch.randn(T, spec.num_experts, device="cuda"), -1), spec.top_k, -1)
    out = torch.empty_like(x)
    fn, act = cutlass._flashinfer()
    kw = cutlass.flashinfer_kwargs(
        spec, x, prepared, w, ids.int(), out, act(prepared.meta["activation"]), None
    )

    handler = Collect()
    for name in [*logging.root.manager.loggerDict, "flashinfer"]:
        if name.startswith("flashinfer"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.DEBUG)
            lg.addHandler(handler)
    with autotune(True, tuning_buckets=(T,)):
        fn(**kw)
    torch.cuda.synchronize()
    errors: collections.Counter[str] = collections.Counter()
    for m in handler.messages:
        if "Skipping tactic" in m:
            errors[re.sub(r"tactic \S+ \S+", "tactic N", m)[:400]] += 1
    print(f"{len(handler.messages)} log records; skipped-tactic messages by kind:")
    for m, n in errors.most_common(12):
        print(f"  {n:4d} x {m}")
    for m in handler.messages:
        if "Skipped" in m or ("tactic" in m.lower() and "Skipping" not in m):
            print("  log:", m[:300])

    if args.each:
        ok = {1: [], 2: []}
        for gemm in (1, 2):
            failures = 0  # in a row: past the last tactic, every index fails
            for tactic in range(-1, 200):
                ids_ = [tactic, -1] if gemm == 1 else [-1, tactic]
                try:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    fn(**dict(kw, profile_ids=ids_))
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(5):
                        fn(**dict(kw, profile_ids=ids_))
                    end.record()
                    torch.cuda.synchronize()
                    ok[gemm].append((tactic, start.elapsed_time(end) / 5 * 1e3))
                    failures = 0
                except Exception as exc:
                    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
                    failures += 1
                    if failures > 12 and tactic > 40:
                        break
                    print(f"  gemm{gemm} tactic {tactic}: {type(exc).__name__}: {msg}")
                    with __import__("contextlib").suppress(Exception):
                        torch.cuda.synchronize()
            best = sorted(ok[gemm], key=lambda r: r[1])[:5]
            print(f"gemm{gemm}: {len(ok[gemm])} tactics ran; fastest (tactic, us of the whole call): {best}")


if __name__ == "__main__":
    main()
