"""Tokens per second of a small randomly initialised HF transformers MoE model, per experts backend.

    python benchmarks/hf_generate.py [--model qwen3_moe|mixtral] [--batch 1,8] [--new-tokens 32]
        [--prompt 64] [--impls eager,grouped_mm,batched_mm,moe_core] [--out DIR] [--device cuda]

Builds the model locally (no download; bf16 on a GPU, float32 on the CPU) at a size where the
experts matter (qwen3_moe: 4 layers, hidden 1024, 64 experts of 384, top-8), then per
``experts_implementation`` and batch size: greedy ``generate`` of ``--new-tokens`` tokens after
a ``--prompt``-token random prompt (one warm-up run first, then the median of 3), reported as
new tokens per second, plus the prefill time of the prompt alone, and whether the greedy
tokens equal those of transformers' ``eager`` experts (bf16 runs may diverge after a near tie;
the count of equal leading tokens is given). ``moe_core`` is this project's
``moe_core.integrations.transformers`` (the planner picks the kernel: printed). Eager mode,
no CUDA graphs: what a plain ``model.generate`` user gets. Writes ``hf_generate.json`` and
``hf_generate.md`` under ``--out`` (default ``$OUT`` or ``.``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def build(name: str, device: torch.device, dtype: torch.dtype, small: bool):
    import transformers

    common = dict(vocab_size=4096, num_hidden_layers=4, max_position_embeddings=1024)
    if small:  # CPU smoke run of this script
        common.update(vocab_size=128, num_hidden_layers=1)
    hidden = 64 if small else 1024
    if name == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            moe_intermediate_size=32 if small else 384,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=hidden // 8,
            num_experts=8 if small else 64,
            num_experts_per_tok=2 if small else 8,
            norm_topk_prob=True,
            **common,
        )
    elif name == "mixtral":
        cfg = transformers.MixtralConfig(
            hidden_size=hidden,
            intermediate_size=64 if small else 2048,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            **common,
        )
    else:
        raise SystemExit(f"unknown --model {name!r} (qwen3_moe, mixtral)")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device, dtype).eval()
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 3) -> tuple[float, object]:
    fn()  # warm-up: plans, prepares, compiles
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3_moe")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--impls", default="eager,grouped_mm,batched_mm,moe_core")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    from moe_core.integrations import transformers as moe_hf

    moe_hf.register()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.model, device, dtype, small=device.type != "cuda")
    vocab = model.config.vocab_size
    rows, reference = [], {}
    for batch in [int(b) for b in args.batch.split(",")]:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, args.prompt), generator=gen).to(device)
        mask = torch.ones_like(ids)
        for impl in args.impls.split(","):
            row = {"model": args.model, "impl": impl, "batch": batch}
            try:
                model.set_experts_implementation(impl)

                def generate(ids=ids, mask=mask):
                    with torch.no_grad():
                        return model.generate(
                            input_ids=ids,
                            attention_mask=mask,
                            max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens,
                            do_sample=False,
                            pad_token_id=0,
                        )

                def prefill(ids=ids):
                    with torch.no_grad():
                        return model(ids).logits

                seconds, out = timed(generate, device)
                prefill_s, _ = timed(prefill, device)
                new = out[:, args.prompt :]
                row.update(
                    tokens_per_s=round(batch * args.new_tokens / seconds, 1),
                    generate_ms=round(seconds * 1e3, 2),
                    prefill_ms=round(prefill_s * 1e3, 2),
                )
                if impl == "eager":
                    reference[batch] = new
                if batch in reference:
                    same = (new == reference[batch]).all(dim=0).long()
                    row["equal_leading_tokens"] = int(same.cumprod(0).sum())
                if impl == "moe_core":
                    plans = {p.kernel for m in model.modules() if (p := moe_hf.cached_plan(m)) is not None}
                    row["kernels"] = sorted(plans)
            except Exception as exc:  # one backend failing does not stop the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            print(json.dumps(row), flush=True)
            rows.append(row)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "config": model.config.to_dict() if hasattr(model.config, "to_dict") else {},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hf_generate.json"), "w") as f:
        json.dump({**env, "rows": rows}, f, indent=1, default=str)
    lines = [
        f"# HF generate, {args.model}, {env['device']} (torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['dtype']}, prompt {args.prompt}, {args.new_tokens} new tokens)",
        "",
        "| batch | experts impl | new tokens/s | generate ms | prefill ms | equal greedy tokens | kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['impl']} | {r.get('tokens_per_s', '-')} | {r.get('generate_ms', '-')} | "
            f"{r.get('prefill_ms', '-')} | {r.get('equal_leading_tokens', '-')} / {args.new_tokens} | "
            f"{', '.join(r.get('kernels', [])) or r.get('error', '')} |"
        )
    with open(os.path.join(args.out, "hf_generate.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0)


if __name__ == "__main__":
    main()
