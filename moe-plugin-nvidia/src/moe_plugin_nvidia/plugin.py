"""Hook implementations of moe-plugin-nvidia (entry point ``nvidia`` in ``moe_core.plugins``).

Registration imports no FlashInfer: FlashInfer is located on disk
(:mod:`.flashinfer_env`) for ``supports`` and ``moe doctor`` and imported
only when a kernel first runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from moe_core import hookimpl

from . import __version__

_MODULES: tuple[str, ...] = ("cutlass", "sm100")


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """Register ``nvidia.flashinfer.cutlass`` and the SM100 ``trtllm`` / ``cute_dsl`` entries."""
    for name in _MODULES:
        for entry in importlib.import_module(f"{__package__}.{name}").kernel_entries():
            register(entry)


@hookimpl
def register_commands(subparsers: Any) -> None:
    """``moe nvidia build``: the ahead-of-time FlashInfer module build."""
    from .cli import add_command

    add_command(subparsers)


@hookimpl
def environment_report() -> dict[str, Any]:
    """FlashInfer version and location, prebuilt modules (with what they contain), tune tables."""
    from .doctor import report

    return report(__version__)


@hookimpl
def tune(
    spec: Any, device: Any, tokens: list[int] | None, output_dir: str | None, progress: Callable
) -> list[str] | None:
    """Autotune FlashInfer's cutlass MoE for ``spec`` and merge the tactics into this GPU's table.

    fp8_block has nothing to tune (FlashInfer's DeepGEMM path has one tactic).
    """
    from moe_core import device_info

    from .cutlass import supports

    info = device_info(device)
    if info.vendor != "nvidia" or info.simulated or spec.quant.name == "fp8_block" or supports(spec, info):
        return None
    from pathlib import Path

    import torch

    from .flashinfer_env import flashinfer_version
    from .tuning import DEFAULT_TOKENS, default_write_dir, layer_key, merge_table, table_name, tune_layer

    name = torch.cuda.get_device_name(info.device)
    entry = tune_layer(spec, info, tokens or DEFAULT_TOKENS, progress=progress)
    folder = Path(output_dir) if output_dir else default_write_dir()
    path = merge_table(folder / table_name(name), name, flashinfer_version() or "", {layer_key(spec): entry})
    return [str(path)]
