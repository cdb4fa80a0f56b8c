"""On the lent GPU: tune the portable fused MoE for presets and write this GPU's config table.

    python tools/tune_device.py --out DIR [--models a,b] [--dtype bf16] [--quant fp8,fp8_block,mxfp4]
        [--space quick] [--tokens 1,8,...] [--precompile N] [--triton-cache DIR]

Same search as ``moe tune`` (``moe_plugin_portable.tuning``), one layer (model x
quant scheme) after another; the table ``DIR/<device name>.json`` is rewritten
after each layer so a run cut short keeps what it finished. ``--quant`` takes
``moe_core`` scheme names (``bf16``, ``fp16``, ``fp8``, ``fp8_block``, ``mxfp4``,
as ``moe bench --quant``) and the portable plugin's named variants
(``fp8_tensor``, ``mxfp4_w4a8``: ``experts.QUANT_VARIANTS``); default: the
unquantized layer in ``--dtype``. A layer the kernel does not run on this GPU
is skipped with the kernel's reason. ``--precompile N``: each round's candidates are compiled
ahead in ``N`` worker processes (``tune_layer(precompile=N)``); each tuned bucket prints the wall
seconds of the candidates' first runs, their timing and the precompiles; with
``MOE_PORTABLE_TUNE_CHAIN=1`` the decode buckets also time the chained launch (printed beside the
two launches' step). Copy the result into
``moe-plugin-portable/src/moe_plugin_portable/configs/`` to ship it.
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import metadata

import torch

from moe_core import QuantScheme, device_info
from moe_core.presets import get_preset
from moe_plugin_portable.configs import layer_key
from moe_plugin_portable.experts import QUANT_VARIANTS
from moe_plugin_portable.tuning import DEFAULT_TOKENS, refusal, tune_layer, write_table

MODELS = "qwen3-30b-a3b,qwen3-235b-a22b-tp8,deepseek-v3-tp8,gpt-oss-20b,gpt-oss-120b,mixtral-8x7b"


def scheme(name: str) -> QuantScheme:
    """A ``--quant`` name as a scheme: a portable variant, else a ``moe_core`` scheme name."""
    return QUANT_VARIANTS.get(name) or QuantScheme.parse(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--quant", default=None, help="comma list of quant schemes (default: --dtype)")
    parser.add_argument("--space", default="quick", choices=("full", "quick"))
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument(
        "--precompile",
        type=int,
        default=None,
        help="worker processes compiling each round's candidates ahead (0: none; default: tuning.default_precompile)",
    )
    parser.add_argument("--triton-cache", default=None, help="Triton's on-disk cache folder for this run")
    args = parser.parse_args()
    if args.triton_cache:  # read by Triton at each compile, inherited by the precompile workers
        os.environ["TRITON_CACHE_DIR"] = args.triton_cache
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = [int(t) for t in args.tokens.split(",")]
    schemes = [scheme(q.strip()) for q in (args.quant or args.dtype).split(",") if q.strip()]
    models = [get_preset(m) for m in args.models.split(",")]  # unknown names fail before any tuning
    name = torch.cuda.get_device_name()
    info = device_info("cuda")
    for preset in models:
        for quant in schemes:
            spec = preset.moe_spec(dtype, quant)
            label = f"{preset.name} {quant}"
            reason = refusal(spec, info)
            if reason:
                print(f"{label}: skipped, {reason}", flush=True)
                continue
            start = time.perf_counter()
            found = tune_layer(spec, "cuda", tokens, space=args.space, precompile=args.precompile)
            path = write_table(name, {layer_key(spec): found}, args.out, metadata.version("triton"))
            searched = sum(entry["searched"][0] + entry["searched"][1] for entry in found.values())
            print(
                f"{label}: tuned in {time.perf_counter() - start:.0f} s ({searched} configs) "
                f"-> {path} [{layer_key(spec)}]",
                flush=True,
            )
            for bucket, entry in found.items():
                _print_entry(bucket, entry)


def _print_entry(bucket: str, entry: dict) -> None:
    t = entry["timing"]
    g1, g2 = entry["gemm1"], entry["gemm2"]
    timed, failed = entry["searched"]
    line = (
        f"  T<={bucket:>4s} m{entry['block_m']:<3d} "
        f"g1 n{g1['block_n']}k{g1['block_k']}w{g1['num_warps']}s{g1['num_stages']} "
        f"g2 n{g2['block_n']}k{g2['block_k']}w{g2['num_warps']}s{g2['num_stages']}  "
        f"sort {t['sort_us']:.1f} quant {t['quant_us']:.1f} gemm1 {t['gemm1_us']:.1f} "
        f"gemm2 {t['gemm2_us']:.1f} combine {t['combine_us']:.1f} total {t['total_us']:.1f} us"
        f"  ({timed} timed, {failed} failed, over {entry.get('routings', 1)} routings)"
    )
    spent = entry.get("search_s")
    if spent:
        line += (
            f"  [first runs {spent['first_runs']:.0f} s, timing {spent['timing']:.0f} s, "
            f"precompile {spent.get('precompile', 0):.0f} s]"
        )
    decode = entry.get("decode")
    if decode:
        timing = decode["timing"]
        line += f"  decode {timing['total_us']:.1f} us (use: {decode['use']})"
        if "step_us" in timing:  # the two launches as one step, and the chained launch where it ran
            chained = f", chained {timing['chain_us']:.1f}" if "chain_us" in timing else ""
            line += f" [two launches {timing['step_us']:.1f}{chained}{', chain taken' if decode.get('chain') else ''}]"
    print(line, flush=True)


if __name__ == "__main__":
    main()
