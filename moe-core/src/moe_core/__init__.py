"""moe_core: the Mixture-of-Experts kernel contract, reference backend and plugin system.

::

    import moe_core as moe

    topk_weights, topk_ids = moe.select_experts(router_logits, routing)
    plan = moe.moe_plan(spec, device="cuda:0")
    prepared = plan.prepare(moe.ExpertWeights(w13=..., w2=...))
    out = moe.moe_apply(plan, hidden_states, prepared, topk_weights, topk_ids)

Importing this package loads no plugin and no vendor library; plugins load on
the first plan (or routing/sorting call).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import ops as _ops  # noqa: F401  (registers the torch.library custom ops)
from . import quant, sorting
from .device import Capability, DeviceInfo, device_info
from .errors import MoEError, MoEInputError, PluginError, UnsupportedError
from .hookspecs import hookimpl
from .planner import MoEPlan, PreparedWeights, moe_apply, moe_plan
from .plugins import load_plugins, reset_plugins
from .registry import KernelEntry
from .routing import RoutingSpec, select_experts
from .spec import ExpertWeights, MoESpec, QuantScheme

try:
    __version__ = version("moe-core")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "Capability",
    "DeviceInfo",
    "ExpertWeights",
    "KernelEntry",
    "MoEError",
    "MoEInputError",
    "MoEPlan",
    "MoESpec",
    "PluginError",
    "PreparedWeights",
    "QuantScheme",
    "RoutingSpec",
    "UnsupportedError",
    "__version__",
    "device_info",
    "hookimpl",
    "load_plugins",
    "moe_apply",
    "moe_plan",
    "quant",
    "reset_plugins",
    "select_experts",
    "sorting",
]
