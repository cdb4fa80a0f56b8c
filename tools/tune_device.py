"""On the lent GPU: tune the portable fused MoE for presets and write this GPU's config table.

    python tools/tune_device.py --out DIR [--models a,b] [--dtype bf16] [--space quick]

Same search as ``moe tune`` (``moe_plugin_portable.tuning``), one model after
another; the table ``DIR/<device name>.json`` is rewritten after each model so
a run cut short keeps what it finished. Copy the result into
``moe-plugin-portable/src/moe_plugin_portable/configs/`` to ship it.
"""

from __future__ import annotations

import argparse
import time
from importlib import metadata

import torch

from moe_core.presets import get_preset
from moe_plugin_portable.configs import layer_key
from moe_plugin_portable.tuning import DEFAULT_TOKENS, tune_layer, write_table

MODELS = "qwen3-30b-a3b,qwen3-235b-a22b-tp8,deepseek-v3-tp8,gpt-oss-20b,gpt-oss-120b,mixtral-8x7b"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--space", default="quick", choices=("full", "quick"))
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = [int(t) for t in args.tokens.split(",")]
    name = torch.cuda.get_device_name()
    for model in args.models.split(","):
        spec = get_preset(model).moe_spec(dtype)
        start = time.perf_counter()
        found = tune_layer(spec, "cuda", tokens, space=args.space)
        path = write_table(name, {layer_key(spec): found}, args.out, metadata.version("triton"))
        print(f"{model}: tuned in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
        for bucket, entry in found.items():
            t = entry["timing"]
            g1, g2 = entry["gemm1"], entry["gemm2"]
            print(
                f"  T<={bucket:>4s} m{entry['block_m']:<3d} "
                f"g1 n{g1['block_n']}k{g1['block_k']}w{g1['num_warps']}s{g1['num_stages']} "
                f"g2 n{g2['block_n']}k{g2['block_k']}w{g2['num_warps']}s{g2['num_stages']}  "
                f"sort {t['sort_us']:.1f} gemm1 {t['gemm1_us']:.1f} gemm2 {t['gemm2_us']:.1f} "
                f"combine {t['combine_us']:.1f} total {t['total_us']:.1f} us",
                flush=True,
            )


if __name__ == "__main__":
    main()
