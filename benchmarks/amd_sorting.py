"""Time ``amd.triton.moe_sorting`` against ``portable.triton.moe_sorting`` on the GPU (aiter/CK contract).

    python benchmarks/amd_sorting.py [--tokens 1,16,256,2048,16384] [--mask] [--set TILE=1024 ...]
                                     [--out results.json]

Shape: E=257, k=9, unit 32 (DeepSeek-V3/R1 with the shared expert fused),
router ids uniform top-k per token, float32 weights. For each ``T`` and sorter:
``host`` (us of host time per call, calls queued without a sync: what an eager
engine pays to launch), ``eager`` (median device time of back-to-back calls,
one event pair each) and ``graph`` (median of CUDA-graph replays: the kernels
alone). Both sorters are called directly (no dispatch) and checked against
``moe_sorting_reference`` first. ``--set NAME=VALUE`` overrides a module
constant of ``moe_plugin_amd.sorting`` (path thresholds, tile sizes) to try
another geometry; the table says which path and how many launches each T took.
"""

from __future__ import annotations

import argparse
import json

import torch

from moe_core.bench.timing import launch_costs
from moe_core.sorting import moe_sorting_reference
from moe_plugin_amd import sorting as amd

TOKENS = (1, 16, 256, 2048, 16384)
E, K, UNIT = 257, 9, 32


def _sorters() -> dict[str, object]:
    sorters = {"amd.triton.moe_sorting": amd.moe_sorting_triton}
    try:
        from moe_plugin_portable.sorting import moe_sorting_triton as portable
    except ImportError:
        print("moe-plugin-portable is not installed: timing the AMD sorter alone")
    else:
        sorters["portable.triton.moe_sorting"] = portable
    return sorters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--mask", action="store_true", help="expert parallel: half the experts local")
    parser.add_argument(
        "--set", action="append", default=[], help="NAME=VALUE: a moe_plugin_amd.sorting constant"
    )
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    for item in args.set:
        name, value = item.split("=")
        if not hasattr(amd, name):
            raise SystemExit(f"moe_plugin_amd.sorting has no constant {name}")
        setattr(amd, name, int(value))
    torch.manual_seed(0)
    mask = (torch.rand(E, device="cuda") < 0.5) if args.mask else None
    sorters = _sorters()
    rows = []
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; moe_sorting E={E} k={K} unit {UNIT}, mask={args.mask}")
    print(
        f"{'sorter':30s} {'T':>6s} {'path':>8s} {'launches':>8s} {'host':>7s} {'eager':>7s} {'graph':>7s}  (us)"
    )
    for T in (int(t) for t in args.tokens.split(",")):
        ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32)
        weights = torch.rand(T, K, device="cuda")
        kw = {"num_experts": E, "unit_size": UNIT, "expert_mask": mask}
        want = moe_sorting_reference(ids, weights, **kw)
        for label, fn in sorters.items():
            got = fn(ids, weights, **kw)
            exact = all(torch.equal(g, w) for g, w in zip(got, want))
            timing = launch_costs(lambda fn=fn, ids=ids, w=weights, kw=kw: fn(ids, w, **kw), args.iters)
            plan = amd.sort_plan(T, K, E, UNIT) if label.startswith("amd") else None
            path = plan.path if plan else "-"
            launches = str(plan.launches) if plan else "-"
            rows.append({"sorter": label, "T": T, "path": path, "exact": exact, **timing})
            print(
                f"{label:30s} {T:6d} {path:>8s} {launches:>8s} {timing['host_us']:7.1f} "
                f"{timing['eager_us']:7.1f} {timing['graph_us']:7.1f}" + ("" if exact else "  MISMATCH")
            )
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "E": E, "k": K, "unit": UNIT, "mask": args.mask}
        overrides = dict(item.split("=") for item in args.set)
        with open(args.out, "w") as f:
            json.dump({"meta": {**meta, "overrides": overrides}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
