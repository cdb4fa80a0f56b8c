"""The kernel registry and deterministic kernel selection.

Plugins describe each kernel with a :class:`KernelEntry` and hand it to the
``register`` callback of their ``register_kernels`` hook (see
:mod:`moe_core.hookspecs`). Selection for a request on a device:

1. keep the entries of the family and op;
2. if a backend is forced (``backend=`` or ``MOE_BACKEND``), keep the entries
   whose name equals it or starts with it followed by ``.``;
3. refuse the entries whose capability does not match the device, whose
   declared quant schemes / activations / features do not cover the request,
   or whose ``supports(request, device)`` returns a reason;
4. choose the highest priority (``rank(request, device)`` where the entry has
   one, else ``priority``); ties go to the lexicographically smallest name.
   Every refusal is kept for :meth:`moe_core.MoEPlan.explain`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import Capability, DeviceInfo, device_info
from .errors import UnsupportedError

__all__ = [
    "FAMILIES",
    "Candidate",
    "KernelEntry",
    "Registry",
    "dispatch_op",
    "get_registry",
]

#: Op families and the ops each holds; an entry implements exactly one op.
FAMILIES: dict[str, tuple[str, ...]] = {
    "experts": ("experts",),
    "routing": ("select_experts",),
    "sorting": ("align_block_size", "moe_sorting", "ragged_metadata"),
}

_NAME_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+){1,}$")


@dataclass(frozen=True)
class KernelEntry:
    """One kernel, as a plugin registers it.

    Attributes:
        name: ``<plugin>.<backend>.<variant>``, lowercase, dot-separated, unique.
        family: ``experts``, ``routing`` or ``sorting`` (:data:`FAMILIES`).
        apply: the kernel. Its signature depends on the op:

            - ``experts``: ``apply(spec, hidden_states, prepared, topk_weights,
              topk_ids, out) -> None``; writes ``out [T, H]`` (``spec.dtype``).
              ``prepared`` is what ``prepare`` returned, as
              :class:`moe_core.PreparedWeights`. Never called with ``T == 0``;
              must not synchronise with the host; must skip (not fault on)
              ids outside ``[0, num_experts)``; must not modify ``prepared``
              (a dispatching plan may share its tensors with another kernel).
            - ``routing`` (``select_experts``): ``apply(logits, routing,
              correction_bias) -> (weights float32 [T, k'], ids int32 [T, k'])``.
            - ``sorting``: the keyword signature of the same-named function in
              :mod:`moe_core.sorting`, returning its named tuple.
        op: the op within the family; defaults to the family's only op
            (required for ``sorting``).
        prepare: ``experts`` only: ``prepare(spec, weights, device) ->
            PreparedWeights | dict[str, Tensor]``, run once per layer. Receives
            canonical :class:`moe_core.ExpertWeights`; re-lays them out (and
            quantizes high-precision weights when the spec asks for a quantized
            scheme). ``None`` keeps the canonical tensors as they are.
        supports: ``supports(request, device) -> str | None``: ``None`` if the
            kernel runs this request on this :class:`DeviceInfo`, else the
            reason it does not. ``request`` is a :class:`moe_core.MoESpec`
            (experts), a :class:`moe_core.routing.RoutingRequest` (routing) or
            a :class:`moe_core.sorting.SortingRequest` (sorting).
        quant: quant scheme names handled (``experts``; empty = any).
        activations: activation names handled (``experts``; empty = any).
        features: optional features handled. ``experts``: ``bias``,
            ``expert_parallel``, ``router_weight_on_input``. ``routing``: the
            methods (``softmax``, ...) and ``fused_shared_experts``. ``sorting``:
            ``expert_map``.
        capability: device requirement string, see :class:`moe_core.device.Capability`.
        priority: higher wins; the reference backend is 0.
        rank: ``rank(request, device) -> int``: the priority for one request
            where it differs by request, e.g. lower for the schemes where a
            peer kernel is measured faster. ``None`` (default): ``priority``.
            A ``rank`` that raises or returns a non-int counts as ``priority``.
        needs_contiguous: ``hidden_states`` must be contiguous (checked by the core).
        description: one line for ``moe plugins`` and ``plan.explain()``.
        plugin: set by the registry to the registering plugin's name.
    """

    name: str
    family: str
    apply: Callable[..., Any]
    op: str | None = None
    prepare: Callable[..., Any] | None = None
    supports: Callable[[Any, DeviceInfo], str | None] | None = None
    quant: frozenset[str] = frozenset()
    activations: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()
    capability: str = "any"
    priority: int = 0
    needs_contiguous: bool = True
    description: str = ""
    plugin: str = ""
    rank: Callable[[Any, DeviceInfo], int] | None = None  # last: positional fields keep their places
    _capability: Capability = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"kernel name {self.name!r} must look like '<plugin>.<backend>.<variant>'")
        if self.family not in FAMILIES:
            raise ValueError(
                f"kernel {self.name}: unknown family {self.family!r}; expected one of {list(FAMILIES)}"
            )
        ops = FAMILIES[self.family]
        if self.op is None:
            if len(ops) != 1:
                raise ValueError(f"kernel {self.name}: family {self.family!r} needs op= one of {ops}")
            object.__setattr__(self, "op", ops[0])
        elif self.op not in ops:
            raise ValueError(f"kernel {self.name}: op {self.op!r} is not in family {self.family!r} {ops}")
        if not callable(self.apply):
            raise ValueError(f"kernel {self.name}: apply must be callable")
        for attr in ("prepare", "supports", "rank"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise ValueError(f"kernel {self.name}: {attr} must be callable or None")
        for attr in ("quant", "activations", "features"):
            object.__setattr__(self, attr, frozenset(getattr(self, attr)))
        if not isinstance(self.priority, int):
            raise ValueError(f"kernel {self.name}: priority must be an int")
        object.__setattr__(self, "_capability", Capability.parse(self.capability))

    def priority_for(self, request: Any, device: DeviceInfo) -> int:
        """The priority of this kernel for ``request`` on ``device`` (``rank``, else ``priority``)."""
        if self.rank is None:
            return self.priority
        try:
            value = self.rank(request, device)
        except Exception:  # a broken rank() falls back to the static priority
            return self.priority
        return value if isinstance(value, int) and not isinstance(value, bool) else self.priority

    def refusal(self, request: Any, device: DeviceInfo) -> str | None:
        """``None`` if this kernel takes ``request`` on ``device``, else the reason."""
        reason = self._capability.refusal(device)
        if reason is not None:
            return reason
        reason = _declared_refusal(self, request)
        if reason is not None:
            return reason
        if self.supports is not None:
            try:
                reason = self.supports(request, device)
            except Exception as exc:  # a broken supports() refuses, it does not crash planning
                return f"supports() raised {type(exc).__name__}: {exc}"
        return reason


def _declared_refusal(entry: KernelEntry, request: Any) -> str | None:
    """Check the request against the entry's declared quant/activations/features."""
    needs: set[str] = set()
    if entry.family == "experts":
        quant = request.quant.name
        if entry.quant and quant not in entry.quant:
            return f"quant {quant} not supported (has {', '.join(sorted(entry.quant))})"
        if entry.activations and request.activation not in entry.activations:
            return (
                f"activation {request.activation} not supported (has {', '.join(sorted(entry.activations))})"
            )
        if request.has_bias:
            needs.add("bias")
        if request.is_expert_parallel:
            needs.add("expert_parallel")
        if request.apply_router_weight_on_input:
            needs.add("router_weight_on_input")
    else:
        needs.update(getattr(request, "features", ()))
    missing = sorted(needs - entry.features)
    if missing:
        return f"feature {', '.join(missing)} not supported"
    return None


@dataclass(frozen=True)
class Candidate:
    """One kernel considered by a selection: refused (with ``reason``) or usable, at ``priority``
    (the entry's priority for this request; ``None``: its static ``priority``)."""

    entry: KernelEntry
    reason: str | None
    chosen: bool = False
    priority: int | None = None

    @property
    def rank(self) -> int:
        """The priority this candidate was ordered by."""
        return self.entry.priority if self.priority is None else self.priority

    @property
    def name(self) -> str:
        return self.entry.name


def _matches_backend(name: str, backend: str) -> bool:
    return name == backend or name.startswith(backend + ".")


class Registry:
    """Holds registered kernels and selects among them."""

    def __init__(self) -> None:
        self._entries: dict[str, KernelEntry] = {}
        self.generation = 0

    def add(self, entry: KernelEntry, plugin: str) -> None:
        """Add ``entry`` on behalf of ``plugin``; a duplicate name is a ``ValueError``."""
        if entry.name in self._entries:
            owner = self._entries[entry.name].plugin
            raise ValueError(f"kernel {entry.name!r} is already registered by plugin {owner!r}")
        object.__setattr__(entry, "plugin", plugin)
        self._entries[entry.name] = entry
        self.generation += 1

    def remove_plugin(self, plugin: str) -> None:
        """Forget every kernel registered by ``plugin``."""
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}
        self.generation += 1

    def entries(self, family: str | None = None, op: str | None = None) -> list[KernelEntry]:
        """Registered entries, optionally of one family/op, sorted by name."""
        found = (e for e in self._entries.values() if (family is None or e.family == family))
        return sorted((e for e in found if op is None or e.op == op), key=lambda e: e.name)

    def get(self, name: str) -> KernelEntry:
        return self._entries[name]

    def candidates(
        self,
        family: str,
        op: str,
        request: Any,
        device: DeviceInfo,
        backend: str | None = None,
    ) -> list[Candidate]:
        """Every entry of ``family``/``op``, each with its refusal reason; best usable one first."""
        entries = self.entries(family, op)
        out = []
        for e in entries:
            if backend and not _matches_backend(e.name, backend):
                out.append(Candidate(e, f"not selected: backend forced to {backend!r}"))
            else:
                reason = e.refusal(request, device)
                out.append(
                    Candidate(e, reason, priority=e.priority_for(request, device) if reason is None else None)
                )
        out.sort(key=lambda c: (c.reason is not None, -c.rank, c.entry.name))
        if out and out[0].reason is None:
            out[0] = Candidate(out[0].entry, None, chosen=True, priority=out[0].priority)
        return out

    def select(
        self,
        family: str,
        op: str,
        request: Any,
        device: DeviceInfo,
        backend: str | None = None,
    ) -> tuple[KernelEntry, list[Candidate]]:
        """The chosen entry and all candidates; :class:`UnsupportedError` if none is usable."""
        if backend and not any(_matches_backend(e.name, backend) for e in self.entries(family, op)):
            known = ", ".join(e.name for e in self.entries(family, op)) or "none"
            raise UnsupportedError(
                f"backend {backend!r} matches no registered {family} kernel (registered: {known})"
            )
        cands = self.candidates(family, op, request, device, backend)
        if not cands or not cands[0].chosen:
            lines = [f"no {family} kernel supports {_describe(request)} on {device}:"]
            lines += [f"  {c.name}: {c.reason}" for c in cands]
            raise UnsupportedError("\n".join(lines))
        return cands[0].entry, cands


def _describe(request: Any) -> str:
    describe = getattr(request, "describe", None)
    return describe() if callable(describe) else repr(request)


def forced_backend(explicit: str | None = None) -> str | None:
    """The backend forced by the argument or ``MOE_BACKEND`` (argument wins)."""
    value = explicit if explicit is not None else os.environ.get("MOE_BACKEND", "")
    return value.strip() or None


_dispatch_cache: dict[tuple, tuple[Registry, int, Callable | None]] = {}


def dispatch_op(
    family: str, op: str, device: torch.device | DeviceInfo | str, request: Any = None
) -> Callable | None:
    """The ``apply`` of the best registered kernel for ``op`` on ``device``, or ``None``.

    Used on the hot path by :func:`moe_core.select_experts` and
    :mod:`moe_core.sorting`: results are cached per (op, device, request) until
    the registry changes. ``MOE_BACKEND`` restricts the choice when it matches
    a kernel of this family; a request no kernel supports returns ``None``
    (the caller then runs the reference).
    """
    backend = forced_backend()
    key = (family, op, str(device), request, backend)
    registry = get_registry()
    hit = _dispatch_cache.get(key)
    if hit is not None and hit[0] is registry and hit[1] == registry.generation:
        return hit[2]
    info = device_info(device)
    if backend and not any(_matches_backend(e.name, backend) for e in registry.entries(family, op)):
        backend = None
    cands = registry.candidates(family, op, request, info, backend)
    impl = cands[0].entry.apply if cands and cands[0].chosen else None
    _dispatch_cache[key] = (registry, registry.generation, impl)
    return impl


def get_registry() -> Registry:
    """The process-wide registry, with plugins loaded on first use."""
    from .plugins import plugin_manager

    return plugin_manager().registry
