"""``moe nvidia ...`` commands (added through the ``register_commands`` hook).

``moe nvidia build --arch 9.0a --quant bf16,fp8 [--jobs N] [--output DIR] [--no-install] [--force]``
builds FlashInfer's fused-MoE module ahead of time (see :mod:`.aot.build`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .aot.units import QUANT_SCHEMES

__all__ = ["add_command", "main"]


def add_command(subparsers: Any) -> None:
    """``moe nvidia build`` (called from the plugin's ``register_commands`` hook)."""
    nv = subparsers.add_parser("nvidia", help="moe-plugin-nvidia commands (build)")
    commands = nv.add_subparsers(dest="nvidia_command", required=True)
    p = commands.add_parser(
        "build",
        help="build FlashInfer's SM90 cutlass fused-MoE module ahead of time (nvcc, no GPU), "
        "only the kernels of the given quant schemes, and install it in FlashInfer's AOT slot",
    )
    p.add_argument("--arch", default="9.0a", choices=("9.0a",))
    p.add_argument("--quant", default="bf16", help=f"comma list of {', '.join(QUANT_SCHEMES)} (default bf16)")
    p.add_argument("--jobs", type=int, default=None, help="parallel nvcc jobs (default: CPU count)")
    p.add_argument("--nice", type=int, default=0, help="run the compilers at this niceness")
    p.add_argument(
        "--output", default=None, help="build folder (default $MOE_NVIDIA_BUILD_DIR or ~/.cache/...)"
    )
    p.add_argument(
        "--cuda-include", action="append", default=[], help="extra CUDA header folder (repeatable)"
    )
    p.add_argument("--no-install", action="store_true", help="build only; do not copy into FlashInfer")
    p.add_argument(
        "--force", action="store_true", help="compile again even when the same module is already built"
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.set_defaults(func=run_build)


class _Bar:
    """A rich progress bar (tqdm, or plain lines, when rich is missing or output is not a terminal)."""

    def __init__(self, plain: bool) -> None:
        self._rich = None
        self._task = None
        self._last = -1
        if not plain and sys.stderr.isatty():
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._rich = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
                )
            except ImportError:
                self._rich = None

    def __enter__(self) -> _Bar:
        if self._rich is not None:
            self._rich.__enter__()
            self._task = self._rich.add_task("compiling", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def __call__(self, unit: str, done: int, total: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total, description=unit or "compiling")
        elif done != self._last:
            self._last = done
            print(f"[{done}/{total}] {unit}", file=sys.stderr, flush=True)


def run_build(args: argparse.Namespace) -> int:
    from .aot.build import build_module

    with _Bar(args.no_progress) as bar:
        res = build_module(
            args.arch,
            args.quant,
            output=args.output,
            jobs=args.jobs,
            nice=args.nice,
            install=not args.no_install,
            progress=bar,
            cuda_include=args.cuda_include,
            echo=lambda s: print(s, file=sys.stderr),
            force=args.force,
        )
    print(
        json.dumps(
            {
                "library": str(res.library),
                "installed": str(res.installed) if res.installed else None,
                **res.manifest.to_json(),
            },
            indent=2,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_plugin_nvidia.cli build ...``: the same as ``moe nvidia build ...``."""
    parser = argparse.ArgumentParser(prog="python -m moe_plugin_nvidia.cli")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["nvidia", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
