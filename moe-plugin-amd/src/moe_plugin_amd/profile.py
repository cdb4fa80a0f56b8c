"""``moe amd profile``: compile every Triton kernel config this plugin launches, offline, for an AMD target.

::

    moe amd profile [--target gfx950] [--tokens 1,16,256,2048,16384] [--no-portable] [--no-gluon]

builds the launches of ``amd.triton.moe_sorting`` (every path) at the benchmark
shapes (``E=257 k=9 unit 32``, int32 ids, float32 weights, with and without an
expert mask) on ``meta`` tensors, the launches of ``amd.gluon.mxfp4`` (its two
Gluon GEMMs and the slot sum, for gfx950 only) at the gpt-oss shapes (``H = I =
2880``, ``E = 32 / 128``, ``k = 4``; W4A16 and W4A8) for one token count per
block-table bucket (:data:`GLUON_TOKENS`), adds the portable plugin's default launch set
(its routing, sorting and fused-MoE kernels, which this plugin's users run on
AMD too), compiles them all for the target with ``triton.compile`` (no GPU),
prints one row per distinct kernel and exits 1 when any of them spills
registers, uses scratch memory, overflows LDS or fails to compile, or when an
``amd.gluon.mxfp4`` GEMM lacks its CDNA4 microscaling instructions: the W4A8
GEMMs must contain scaled MFMAs (``v_mfma_scale_f32_*``), the W4A16 GEMMs scaled
fp4 upcasts (``v_cvt_scalef32_pk_bf16_fp4``) feeding ``v_mfma``.

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
    "GLUON_MODELS",
    "GLUON_TOKENS",
    "add_command",
    "gluon_launch_groups",
    "gluon_problems",
    "launch_configs",
    "main",
    "run",
    "sorting_launch_groups",
]

#: Token counts of ``benchmarks/amd_sorting.py`` (one per path boundary region).
BENCH_TOKENS = (1, 16, 256, 2048, 16384)
#: ``(E, k, unit_size)``: DeepSeek-V3/R1 with its shared expert fused (257 experts, 9 slots).
BENCH_SHAPES = ((257, 9, 32),)
#: the models whose layers amd.gluon.mxfp4 is profiled at (H = I = 2880, E = 32 / 128, k = 4)
GLUON_MODELS = ("gpt-oss-20b", "gpt-oss-120b")
#: one token count per bucket of moe_plugin_amd.gluon_configs.BUCKETS (T = 1 also: its value-1 specialization)
GLUON_TOKENS = (1, 16, 128, 1024, 4096)
_GLUON_GEMMS = ("moe_gemm1", "moe_gemm2")


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


def gluon_launch_groups(
    models: Iterable[str] = GLUON_MODELS, tokens: Iterable[int] = GLUON_TOKENS
) -> list[tuple[str, list[Any]]]:
    """``(user, launches)`` of ``amd.gluon.mxfp4`` (W4A16 and W4A8) per model and ``T``, on meta tensors."""
    from moe_core import MoESpec, QuantScheme
    from moe_core.presets import PRESETS
    from moe_core.sorting import SortedTokens, max_num_blocks, max_padded_len

    from .gluon_configs import select_config
    from .gluon_moe import gluon_launches

    def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    groups = []
    for model in models:
        p = PRESETS[model]
        E, k, H, inter = p.num_experts, p.routing.top_k, p.hidden_size, p.intermediate_size
        for quant in (QuantScheme("mxfp4"), QuantScheme("mxfp4", activation="fp8_per_tensor")):
            spec = MoESpec(
                num_experts=E, top_k=k, hidden_size=H, intermediate_size=inter, activation=p.activation,
                has_bias=p.has_bias, quant=quant, dtype=torch.bfloat16,
            )  # fmt: skip
            tensors = {n: meta(E, 16, dtype=torch.uint8) for n in ("w13", "w13_scale", "w2", "w2_scale")}
            tensors.update({n: meta(16, dtype=torch.float32) for n in ("b13", "b2", "a13_scale", "a2_scale")})
            tensors["local_map"] = meta(E, dtype=torch.int32)
            for T in tokens:
                unit = select_config(T).block_m
                rows = max_padded_len(T * k, E, unit)
                st = SortedTokens(
                    meta(rows, dtype=torch.int32),
                    meta(rows, dtype=torch.float32),
                    meta(max_num_blocks(T * k, E, unit), dtype=torch.int32),
                    meta(2, dtype=torch.int32),
                )
                x = meta(T, H, dtype=torch.bfloat16)
                ids = meta(T, k, dtype=torch.int32)
                launches = gluon_launches(spec, x, tensors, st, ids, meta(T, H, dtype=torch.bfloat16))
                groups.append((f"{model} {quant}/T={T}", launches))
    return groups


def gluon_problems(p: Any) -> list[str]:
    """What an ``amd.gluon.mxfp4`` GEMM's code lacks (empty: it has its scaled instructions)."""
    if p.kernel not in _GLUON_GEMMS or p.error:
        return []
    if "fp8_per_tensor" in (p.users[0] if p.users else ""):
        return [] if p.mfma_scaled else ["no scaled MFMA (v_mfma_scale_f32_*) in a W4A8 GEMM"]
    if p.cvt_scaled and p.mfma:
        return []
    return ["no scaled fp4 upcast (v_cvt_scalef32_pk_*_fp4) + MFMA in a W4A16 GEMM"]


def launch_configs(
    tokens: Iterable[int] = BENCH_TOKENS,
    shapes: Iterable[tuple[int, int, int]] = BENCH_SHAPES,
    masks: Iterable[bool] = (False, True),
    gluon: bool = False,
    gluon_tokens: Iterable[int] = GLUON_TOKENS,
) -> list[Any]:
    """The distinct compiles (:class:`moe_plugin_portable.profile.LaunchConfig`) of this plugin's kernels
    (``gluon``: also ``amd.gluon.mxfp4``'s, which compile for gfx950 only)."""
    groups = sorting_launch_groups(tokens, shapes, masks)
    if gluon:
        groups += gluon_launch_groups(tokens=gluon_tokens)
    return _portable_profile().merge_launches(groups)


def run(args: argparse.Namespace) -> int:
    """``moe amd profile``: compile, print the table, 1 if anything fails the gate."""
    profile = _portable_profile()
    start = time.perf_counter()
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    configs = launch_configs(tokens, gluon=args.target == "gfx950" and not args.no_gluon)
    if not args.no_portable:
        configs += profile.launch_configs(args.target)
    profiles = profile.compile_profile(args.target, configs, jobs=args.jobs, use_cache=not args.no_cache)
    print(profile.format_table(profiles))
    bad = [p for p in profiles if not p.ok or gluon_problems(p)]
    fresh = sum(not p.cached for p in profiles)
    print(
        f"\n{len(profiles)} kernels for {args.target} ({fresh} compiled, {len(profiles) - fresh} cached) "
        f"in {time.perf_counter() - start:.1f} s; {len(bad)} failing"
    )
    for p in bad:
        print(f"FAIL {p.kernel} [{p.config}] w{p.num_warps}: {'; '.join(p.problems() + gluon_problems(p))}")
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
    p.add_argument("--no-gluon", action="store_true", help="leave out amd.gluon.mxfp4's Gluon kernels")
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
