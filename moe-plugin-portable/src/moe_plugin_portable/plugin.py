"""Hook implementations of moe-plugin-portable (entry point ``portable`` in ``moe_core.plugins``).

Registration imports no Triton: each module's ``kernel_entries()`` only
describes its kernels; Triton is imported when a kernel first runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from moe_core import hookimpl

from . import __version__
from ._common import interpreting

# Modules with a kernel_entries() function, added as their kernels land.
_MODULES: tuple[str, ...] = ("experts", "routing", "sorting")


@hookimpl
def register_kernels(register: Callable[[Any], None]) -> None:
    """Register every kernel of this plugin (routing, sorting, experts)."""
    for name in _MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        for entry in module.kernel_entries():
            register(entry)


@hookimpl
def environment_report() -> dict[str, Any]:
    spec = importlib.util.find_spec("triton")
    version = None
    if spec is not None:
        from importlib.metadata import version as dist_version

        version = dist_version("triton")
    from .configs import tuned_tables

    return {
        "version": __version__,
        "triton": version,
        "interpreter": interpreting(),
        "tuned_config_tables": tuned_tables(),
    }


@hookimpl
def tune(
    spec: Any, device: Any, tokens: list[int] | None, output_dir: str | None, progress: Callable
) -> list[str] | None:
    """Tune the fused MoE for ``spec`` on a GPU and merge the result into this GPU's table
    (any layer the kernel runs there: bf16/fp16, and the quantized schemes fp8, fp8_block, mxfp4)."""
    import os

    import torch

    from moe_core import device_info

    from .configs import _PACKAGE_DIR, layer_key
    from .tuning import DEFAULT_TOKENS, refusal, tune_layer, write_table

    info = device_info(device)
    if not info.is_gpu or refusal(spec, info):
        return None
    from importlib.metadata import version

    entries = {layer_key(spec): tune_layer(spec, device, tokens or DEFAULT_TOKENS, progress=progress)}
    folder = output_dir or os.environ.get("MOE_PORTABLE_CONFIG_DIR") or _PACKAGE_DIR
    return [str(write_table(torch.cuda.get_device_name(device), entries, folder, version("triton")))]
