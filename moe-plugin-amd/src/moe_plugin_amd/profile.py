"""``moe amd profile``: compile every Triton kernel config this plugin launches, offline, for an AMD target.

::

    moe amd profile [--target gfx950] [--tokens 1,16,256,2048,16384] [--no-portable]

builds the launches of ``amd.triton.moe_sorting`` (every path) at the benchmark
shapes (``E=257 k=9 unit 32``, int32 ids, float32 weights, with and without an
expert mask) on ``meta`` tensors, adds the portable plugin's default launch set
(its routing, sorting and fused-MoE kernels, which this plugin's users run on
AMD too), compiles them all for the target with ``triton.compile`` (no GPU),
prints one row per distinct kernel and exits 1 when any of them spills
registers, uses scratch memory, overflows LDS or fails to compile.

The compile machinery is :mod:`moe_plugin_portable.profile`'s (worker
processes without ``TRITON_INTERPRET``, the on-disk cache under
``$MOE_PROFILE_CACHE``, the table and the gate); moe-plugin-portable must be
installed (``pip install moe-plugin-amd[profile]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BENCH_SHAPES",
    "BENCH_TOKENS",
    "add_command",
    "launch_configs",
    "main",
    "run",
    "sorting_launch_groups",
]

#: Token counts of ``benchmarks/amd_sorting.py`` (one per path boundary region).
BENCH_TOKENS = (1, 16, 256, 2048, 16384)
#: ``(E, k, unit_size)``: DeepSeek-V3/R1 with its shared expert fused (257 experts, 9 slots).
BENCH_SHAPES = ((257, 9, 32),)


def _portable_profile() -> Any:
    try:
        from moe_plugin_portable import profile
    except ImportError as exc:
        from moe_core import MoEError

        raise MoEError(
            "moe amd profile compiles through moe_plugin_portable.profile: install moe-plugin-portable "
            f"(pip install 'moe-plugin-amd[profile]'): {exc}"
        ) from exc
    return profile


def sorting_launch_groups(
    tokens: Iterable[int] = BENCH_TOKENS,
    shapes: Iterable[tuple[int, int, int]] = BENCH_SHAPES,
    masks: Iterable[bool] = (False, True),
) -> list[tuple[str, list[Any]]]:
    """``(user, launches)`` of ``amd.triton.moe_sorting`` for each ``T``, shape and mask, on meta tensors."""
    from .sorting import moe_sorting_launches

    groups = []
    for E, k, unit in shapes:
        for T in tokens:
            ids = torch.empty(T, k, dtype=torch.int32, device="meta")
            weights = torch.empty(T, k, dtype=torch.float32, device="meta")
            for masked in masks:
                mask = torch.empty(E, dtype=torch.bool, device="meta") if masked else None
                _, launches = moe_sorting_launches(
                    ids, weights, num_experts=E, unit_size=unit, expert_mask=mask
                )
                user = f"moe_sorting E={E} k={k} unit={unit}/T={T}" + ("/mask" if masked else "")
                groups.append((user, launches))
    return groups


def launch_configs(
    tokens: Iterable[int] = BENCH_TOKENS,
    shapes: Iterable[tuple[int, int, int]] = BENCH_SHAPES,
    masks: Iterable[bool] = (False, True),
) -> list[Any]:
    """The distinct compiles (:class:`moe_plugin_portable.profile.LaunchConfig`) of this plugin's kernels."""
    return _portable_profile().merge_launches(sorting_launch_groups(tokens, shapes, masks))


def run(args: argparse.Namespace) -> int:
    """``moe amd profile``: compile, print the table, 1 if anything fails the gate."""
    profile = _portable_profile()
    start = time.perf_counter()
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    configs = launch_configs(tokens)
    if not args.no_portable:
        configs += profile.launch_configs(args.target)
    profiles = profile.compile_profile(args.target, configs, jobs=args.jobs, use_cache=not args.no_cache)
    print(profile.format_table(profiles))
    bad = [p for p in profiles if not p.ok]
    fresh = sum(not p.cached for p in profiles)
    print(
        f"\n{len(profiles)} kernels for {args.target} ({fresh} compiled, {len(profiles) - fresh} cached) "
        f"in {time.perf_counter() - start:.1f} s; {len(bad)} failing"
    )
    for p in bad:
        print(f"FAIL {p.kernel} [{p.config}] w{p.num_warps}: {'; '.join(p.problems())}")
    if args.json:
        rows = [{k: v for k, v in dataclasses.asdict(p).items() if k != "launch"} for p in profiles]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


def add_command(subparsers: Any) -> None:
    """``moe amd profile`` (called from the plugin's ``register_commands`` hook)."""
    amd = subparsers.add_parser("amd", help="moe-plugin-amd commands (profile)")
    commands = amd.add_subparsers(dest="amd_command", required=True)
    p = commands.add_parser(
        "profile",
        help="compile every Triton kernel config of the AMD plugin (and the portable one) offline for an "
        "AMD target; exit 1 on spills, scratch, LDS overflow or compile errors",
    )
    p.add_argument("--target", default="gfx950", choices=("gfx950", "gfx942"))
    p.add_argument(
        "--tokens", default=",".join(map(str, BENCH_TOKENS)), help="token counts of the sorting launches"
    )
    p.add_argument("--no-portable", action="store_true", help="only this plugin's kernels")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything")
    p.add_argument("--json", default=None, help="also write the profiles to this JSON file")
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_plugin_amd.profile [args]``: the same as ``moe amd profile [args]``."""
    parser = argparse.ArgumentParser(prog="python -m moe_plugin_amd.profile")
    add_command(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["amd", "profile", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
