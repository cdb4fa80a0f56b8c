"""Each ``--moe-kernel`` names a registered kernel, and each kernel declares only names the core knows.

A typo in a declaration (``activations={"swiglu"}``) never fails planning: the
kernel is just never chosen. These tests catch it.
"""

from __future__ import annotations

import pytest

from ..plugins import plugin_manager
from ..registry import KernelEntry
from ..routing import ROUTING_METHODS
from ..spec import ACTIVATIONS, QUANT_SCHEMES
from ..testing.plugin import requested_kernels
from ._kit import USAGE, matches, selected_entries

#: Optional features a kernel of each family may declare (see :class:`moe_core.KernelEntry`).
FEATURES = {
    "experts": {"bias", "expert_parallel", "router_weight_on_input"},
    "routing": {*ROUTING_METHODS, "fused_shared_experts"},
    "sorting": {"expert_map"},
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wanted = requested_kernels(metafunc.config)
    if not wanted:
        pytest.skip(f"no kernel to check: run {USAGE}")
    if "requested" in metafunc.fixturenames:
        metafunc.parametrize("requested", wanted)
    if "entry" in metafunc.fixturenames:
        entries = selected_entries(metafunc.config)
        metafunc.parametrize("entry", entries, ids=[e.name for e in entries])


def test_kernel_is_registered(requested: str) -> None:
    manager = plugin_manager()
    names = [e.name for e in manager.registry.entries()]
    if any(matches(name, requested) for name in names):
        return
    problems = [
        f"  {r.name}: {r.status}" + (f" ({r.error.strip().splitlines()[-1]})" if r.error else "")
        for r in manager.records.values()
        if r.status != "loaded"
    ]
    lines = [f"--moe-kernel {requested} matches no registered kernel (name or dotted prefix)."]
    lines.append("registered: " + ", ".join(names))
    if problems:
        lines += ["plugins not loaded (see `moe plugins`):", *problems]
    pytest.fail("\n".join(lines), pytrace=False)


def test_declarations_are_known(entry: KernelEntry) -> None:
    unknown = sorted(set(entry.features) - FEATURES[entry.family])
    if entry.family == "experts":
        unknown += [f"quant {n}" for n in sorted(set(entry.quant) - set(QUANT_SCHEMES))]
        unknown += [f"activation {n}" for n in sorted(set(entry.activations) - set(ACTIVATIONS))]
    elif entry.quant or entry.activations:
        unknown.append("quant/activations (only experts kernels declare them)")
    assert not unknown, f"{entry.name} declares names the core does not know: {', '.join(unknown)}"
