"""Planning, preparing and applying a MoE layer's experts.

::

    plan = moe_plan(spec, device="cuda:0")      # choose the kernel, once per layer
    prepared = plan.prepare(weights)            # re-lay out the weights, once
    out = moe_apply(plan, x, prepared, topk_weights, topk_ids)   # every forward

``moe_apply`` validates its inputs (raising :class:`MoEInputError` before any
kernel launches), returns an empty ``[0, H]`` result for ``T == 0`` without
launching anything, and does not synchronise with the host for GPU kernels.
Under ``torch.compile`` it is the custom op ``moe_core::moe_apply``.

With a dispatch table (:mod:`moe_core.dispatch`, written by ``moe tune``) naming
several kernels, the plan runs each bucket of token counts on its own kernel:
``plan.kernel`` is :data:`DISPATCH`, ``plan.prepare`` prepares every distinct
kernel's weights once (sharing tensors that coincide) into a
:class:`DispatchedWeights`, and ``moe_apply`` picks the kernel from
``hidden_states.shape[0]`` on the host (no device sync; fixed per CUDA graph).
"""

from __future__ import annotations

import itertools
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .device import DeviceInfo, device_info
from .dispatch import DispatchTable, StaleDispatchWarning, bucket_index
from .errors import MoEInputError
from .registry import Candidate, KernelEntry, forced_backend, get_registry
from .spec import ExpertWeights, MoESpec
from .validation import (
    check_dtype,
    check_float_tensor,
    check_same_device,
    check_shape,
    check_topk,
    check_values_asked,
    should_check_values,
)

__all__ = [
    "DISPATCH",
    "DispatchedWeights",
    "MoEPlan",
    "PreparedWeights",
    "check_expert_weights",
    "moe_apply",
    "moe_plan",
]

#: ``plan.kernel`` (and ``prepared.kernel``) of a plan that dispatches by token count; no
#: registered kernel can have this name (kernel names have dots)
DISPATCH = "dispatch"

# Integer handles of plans and prepared-weight layouts for the custom ops (moe_core.ops):
# a traced graph holds the handle as a constant. Entries live as long as the process.
PLANS: dict[int, MoEPlan] = {}
LAYOUTS: dict[int, tuple[str, tuple[str, ...], dict[str, Any]]] = {}
_handles = itertools.count(1)
_handles_lock = threading.Lock()


def _new_handle(table: dict[int, Any], value: Any) -> int:
    with _handles_lock:
        handle = next(_handles)
        table[handle] = value
    return handle


_versions = itertools.count(1)


class TensorDict(dict):
    """The ``dict`` of :attr:`PreparedWeights.tensors`: ``version``, unique in the process, changes
    with every change of its items, so that a kernel's per-layer cache (and the core's input check)
    is validated by one comparison per call instead of one per tensor."""

    __slots__ = ("version",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = next(_versions)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.version = next(_versions)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.version = next(_versions)

    def __ior__(self, other: Any) -> TensorDict:
        super().__ior__(other)
        self.version = next(_versions)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.version = next(_versions)

    def pop(self, *args: Any) -> Any:
        self.version = next(_versions)
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self.version = next(_versions)
        return super().popitem()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.version = next(_versions)
        return super().setdefault(key, default)

    def clear(self) -> None:
        super().clear()
        self.version = next(_versions)


@dataclass
class PreparedWeights:
    """Weights re-laid out for one kernel by its ``prepare``.

    Attributes:
        kernel: name of the kernel they were prepared for.
        tensors: the kernel's tensors, by name (the kernel's own layout); kept as a
            :class:`TensorDict` (a ``dict`` whose ``version`` changes with its items).
        meta: non-tensor facts the kernel recorded (tile sizes, layout tags).
        layout_handle: integer id of (kernel, tensor names, meta) for the custom op.
        cache: scratch of the kernel's ``apply``, empty at first: what it derives from
            these tensors once instead of on every call (e.g. call arguments). Not part of
            the layout: a rebuilt copy (custom op, shared tensors) starts empty, so an entry
            must record what it was built from and be rebuilt when that changed.
    """

    kernel: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    layout_handle: int | None = field(default=None, repr=False, compare=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tensors.__class__ is not TensorDict:
            self.tensors = TensorDict(self.tensors)
        if self.layout_handle is None:  # the custom op rebuilds prepared weights under a known handle
            self.layout_handle = _new_handle(LAYOUTS, (self.kernel, tuple(self.tensors), self.meta))

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass
class DispatchedWeights(PreparedWeights):
    """Every kernel's prepared weights for a plan that dispatches by token count.

    Attributes:
        parts: each distinct kernel's :class:`PreparedWeights`, by kernel name. Tensors
            that two kernels share are the same tensor object in both parts.
        tensors: the distinct tensors of all parts (what the custom op receives).
        meta: ``{"parts": ((kernel, part layout handle, indices into tensors), ...)}``.
    """

    parts: dict[str, PreparedWeights] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, parts: dict[str, PreparedWeights]) -> DispatchedWeights:
        flat: dict[str, torch.Tensor] = {}
        index: dict[int, int] = {}
        layout = []
        for kernel, part in parts.items():
            picks = []
            for name, t in part.tensors.items():
                if id(t) not in index:
                    index[id(t)] = len(flat)
                    flat[f"{kernel}/{name}"] = t
                picks.append(index[id(t)])
            layout.append((kernel, part.layout_handle, tuple(picks)))
        return cls(DISPATCH, flat, {"parts": tuple(layout)}, parts=parts)


def rebuild_prepared(layout: int, weights: list[torch.Tensor]) -> PreparedWeights:
    """The prepared weights registered as ``layout``, around ``weights`` (for the custom ops)."""
    kernel, names, meta = LAYOUTS[layout]
    if kernel != DISPATCH:
        return PreparedWeights(kernel, dict(zip(names, weights)), meta, layout_handle=layout)
    parts = {
        name: rebuild_prepared(handle, [weights[i] for i in picks]) for name, handle, picks in meta["parts"]
    }
    return DispatchedWeights(kernel, dict(zip(names, weights)), meta, layout_handle=layout, parts=parts)


def _share(prepared: PreparedWeights, pool: list[torch.Tensor]) -> PreparedWeights:
    """``prepared`` with each tensor that equals one in ``pool`` (same layout and values) replaced by it."""
    tensors, changed = {}, False
    for name, t in prepared.tensors.items():
        same = next((p for p in pool if p is t), None)
        if same is None:
            same = next((p for p in pool if _coincide(p, t)), None)
        if same is None:
            pool.append(t)
            same = t
        changed |= same is not t
        tensors[name] = same
    if not changed:
        return prepared
    return PreparedWeights(prepared.kernel, tensors, prepared.meta, layout_handle=prepared.layout_handle)


def _coincide(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.device, a.dtype, a.shape, a.stride()) != (b.device, b.dtype, b.shape, b.stride()):
        return False
    if a.data_ptr() == b.data_ptr() and a.storage_offset() == b.storage_offset():
        return True
    return bool(torch.equal(a, b))


def memory_report(
    parts: dict[str, PreparedWeights], canonical: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Bytes held by prepared weights, each storage counted once.

    ``per_kernel``: bytes of each kernel's storages; ``total``: of all distinct storages;
    ``unshared``: the sum over kernels (what separate copies would take); ``shared``:
    ``unshared - total``; ``canonical``: bytes of ``total`` that are the caller's
    canonical weights themselves (the kernel kept them as they were).
    """

    def storages(tensors) -> dict[tuple, int]:
        found = {}
        for t in tensors:
            st = t.untyped_storage()
            found[(str(t.device), st.data_ptr())] = st.nbytes()
        return found

    per_kernel = {k: sum(storages(p.tensors.values()).values()) for k, p in parts.items()}
    everything = storages(t for p in parts.values() for t in p.tensors.values())
    total = sum(everything.values())
    given = storages((canonical or {}).values())
    return {
        "per_kernel": per_kernel,
        "total": total,
        "unshared": sum(per_kernel.values()),
        "shared": sum(per_kernel.values()) - total,
        "canonical": sum(n for key, n in everything.items() if key in given),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


class MoEPlan:
    """The kernel chosen for one MoE layer on one device, and why.

    Attributes:
        spec: the layer's :class:`MoESpec`.
        device: the :class:`DeviceInfo` planned for.
        entry: the chosen :class:`KernelEntry`.
        candidates: every kernel considered, chosen one first, each with its
            refusal reason (``None`` when usable).
        dispatch: the :class:`moe_core.dispatch.DispatchTable` in use, or ``None``
            (static priorities).
        routes: with a table naming several kernels, the entry of each bucket of
            :data:`moe_core.dispatch.BUCKETS`; else ``None`` (``entry`` runs every T).
        static_entry: the kernel the static priorities chose (``entry`` unless a
            table named one other kernel for every bucket).
        memory: bytes held by the last ``prepare`` (:func:`memory_report`), or ``None``.
        dispatch_note: why a dispatch table was not used, when one was found.
        check_values: ``MOE_CHECK_INPUTS`` when the plan was made: whether ``moe_apply``
            reads GPU expert ids to check their range (a host sync; CPU ids always are).
    """

    def __init__(
        self,
        spec: MoESpec,
        device: DeviceInfo,
        entry: KernelEntry,
        candidates: list[Candidate],
        backend: str | None,
        dispatch: DispatchTable | None = None,
        dispatch_note: str | None = None,
    ):
        self.spec = spec
        self.device = device
        self.entry = entry
        self.static_entry = entry
        self.candidates = candidates
        self.backend = backend
        self.dispatch = dispatch
        self.dispatch_note = dispatch_note
        self.routes: tuple[KernelEntry, ...] | None = None
        self.memory: dict[str, Any] | None = None
        self._fast: tuple | None = None  # _fast_facts
        self._fast_device: torch.device | None = None  # the last input device _plain_inputs accepted
        #: MOE_CHECK_INPUTS as it was when the plan was made (the fast input check's value checks)
        self.check_values = check_values_asked()
        if dispatch is not None:
            by_name = {c.name: c.entry for c in candidates}
            routes = tuple(by_name[k] if k is not None else entry for k in dispatch.kernels)
            if len({e.name for e in routes}) == 1:
                self.entry = routes[0]
            else:
                self.routes = routes
        #: integer id under which the custom op finds this plan (see :mod:`moe_core.ops`)
        self.handle = _new_handle(PLANS, self)

    @property
    def kernel(self) -> str:
        """Name of the chosen kernel (:data:`DISPATCH` when the plan dispatches by token count)."""
        return DISPATCH if self.routes is not None else self.entry.name

    @property
    def kernels(self) -> tuple[str, ...]:
        """The distinct kernels the plan runs."""
        if self.routes is None:
            return (self.entry.name,)
        return tuple(dict.fromkeys(e.name for e in self.routes))

    @property
    def entries(self) -> tuple[KernelEntry, ...]:
        """The distinct entries the plan runs, in bucket order."""
        if self.routes is None:
            return (self.entry,)
        return tuple({e.name: e for e in self.routes}.values())

    def entry_for(self, num_tokens: int) -> KernelEntry:
        """The entry that runs ``num_tokens >= 1`` tokens (host integers only)."""
        return self.entry if self.routes is None else self.routes[bucket_index(num_tokens)]

    def kernel_for(self, num_tokens: int) -> str:
        """Name of the kernel that runs ``num_tokens >= 1`` tokens."""
        return self.entry_for(num_tokens).name

    def explain(self) -> str:
        """Every candidate kernel, the chosen one(s), the dispatch table, and why others were not chosen."""
        lines = [f"MoE plan for {self.spec.describe()}", f"device: {self.device}"]
        if self.backend:
            lines.append(f"backend forced: {self.backend}")
        if self.routes is not None:
            lines.append(f"chosen: {DISPATCH} by token count over {', '.join(self.kernels)}")
        else:
            how = " by the dispatch table" if self.dispatch is not None else ""
            rank = next((c.rank for c in self.candidates if c.entry is self.entry), self.entry.priority)
            lines.append(f"chosen{how}: {self.kernel} (plugin {self.entry.plugin}, priority {rank})")
        if self.dispatch is not None:
            table = self.dispatch
            where = table.path or "not saved"
            lines.append(f"dispatch table ({where}; tuned {table.created or '?'} on {table.device}):")
            lines += table.describe()
            if None in table.kernels:
                lines.append(f"  (buckets not tuned run the static choice {self.static_entry.name})")
        elif self.dispatch_note:
            lines.append(f"dispatch table: {self.dispatch_note}")
        if self.memory is not None:
            m = self.memory
            per = ", ".join(f"{k} {_mib(v)}" for k, v in m["per_kernel"].items())
            lines.append(
                f"memory: prepared weights hold {_mib(m['total'])} ({per}; shared {_mib(m['shared'])}; "
                f"{_mib(m['canonical'])} are the canonical weights as given)"
            )
        else:
            lines.append("memory: not prepared yet")
        lines.append("candidates (best first):")
        width = max(len(c.name) for c in self.candidates)
        for c in self.candidates:
            if c.name in self.kernels:
                status = "CHOSEN" if self.routes is None else "CHOSEN (dispatch)"
            elif c.reason is None:
                status = "usable, lower priority"
            else:
                status = f"refused: {c.reason}"
            lines.append(f"  {c.name.ljust(width)}  p={c.rank:<4d} {status}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MoEPlan(kernel={self.kernel!r}, device={self.device}, spec={self.spec.describe()!r})"

    def prepare(self, weights: ExpertWeights) -> PreparedWeights:
        """Validate canonical ``weights`` and re-lay them out for the chosen kernel (once per layer).

        A dispatching plan prepares each distinct kernel once and returns
        :class:`DispatchedWeights`; a tensor equal to one another kernel prepared
        (same dtype, shape, strides and values) is replaced by that one, so it is held once.
        ``plan.memory`` (and ``explain()``) then reports the bytes held.
        """
        check_expert_weights(self.spec, weights)
        if not self.device.simulated:
            check_same_device(weights.tensors(), _torch_device(self.device, weights.device))
        if self.routes is None:
            result = _prepare_entry(self.entry, self.spec, weights, self.device)
            self.memory = memory_report({result.kernel: result}, weights.tensors())
            return result
        pool: list[torch.Tensor] = []
        parts = {}
        for entry in self.entries:
            parts[entry.name] = _share(_prepare_entry(entry, self.spec, weights, self.device), pool)
        self.memory = memory_report(parts, weights.tensors())
        return DispatchedWeights.build(parts)


def _prepare_entry(
    entry: KernelEntry, spec: MoESpec, weights: ExpertWeights, device: DeviceInfo
) -> PreparedWeights:
    if entry.prepare is None:
        result: Any = weights.tensors()
    else:
        result = entry.prepare(spec, weights, device)
    if isinstance(result, PreparedWeights):
        if result.kernel != entry.name:
            raise MoEInputError(f"kernel {entry.name} prepared weights labelled for {result.kernel}")
        return result
    return PreparedWeights(entry.name, dict(result))


def _torch_device(info: DeviceInfo, fallback: torch.device) -> torch.device:
    if info.vendor == "cpu":
        return torch.device("cpu")
    dev = info.device
    return dev if dev.index is not None or fallback.type != dev.type else fallback


def moe_plan(
    spec: MoESpec,
    device: DeviceInfo | torch.device | str | None = None,
    *,
    backend: str | None = None,
    tune: bool = False,
    dispatch: bool | DispatchTable | None = None,
) -> MoEPlan:
    """Choose the kernel for ``spec`` on ``device`` (default: current GPU, else CPU).

    Loads plugins on first call. ``backend`` (or ``MOE_BACKEND``) restricts the
    choice to kernels named by it or by a dotted prefix of their name; if none
    of those is usable, :class:`UnsupportedError` lists every reason.
    ``device`` may be a :class:`DeviceInfo` or an arch string (``"sm_90"``,
    ``"gfx950"``) to plan for a device that is not present.

    Per-token-count dispatch (:mod:`moe_core.dispatch`; never with a forced backend
    or a simulated device): ``tune=True`` times every usable kernel per bucket
    here and now and saves the table (the plugins' own ``tune`` hooks are not
    run: ``moe tune`` does both); otherwise the saved table for this spec and
    device is loaded (``dispatch=None``/``True``, unless ``MOE_DISPATCH=0``), not
    (``dispatch=False``), or ``dispatch`` is the :class:`DispatchTable` to use.
    A table that does not fit is ignored with a :class:`StaleDispatchWarning`.
    """
    if not isinstance(spec, MoESpec):
        raise MoEInputError(f"spec must be a MoESpec, got {type(spec).__name__}")
    info = device_info(device)
    chosen_backend = forced_backend(backend)
    entry, candidates = get_registry().select("experts", "experts", spec, info, chosen_backend)
    table, note = None, None
    if chosen_backend is not None or info.simulated:
        if tune or isinstance(dispatch, DispatchTable):
            note = "not used: " + ("backend forced" if chosen_backend else "simulated device")
    else:
        from . import dispatch as dispatching

        if tune:
            table = dispatching.tune_dispatch(spec, info)
            if table is None:
                note = "not tuned: fewer than two kernels support this spec here"
        elif isinstance(dispatch, DispatchTable):
            table = dispatch
        elif dispatch is None or dispatch is True:
            if dispatching.enabled():
                table, why = dispatching.find_table(spec, info)
                if why is not None:
                    note = f"{why}: ignored (run `moe tune` again)"
                    warnings.warn(f"dispatch table {note}; static priorities apply", StaleDispatchWarning, 2)
        elif dispatch is not False:
            raise MoEInputError(
                f"dispatch must be None, a bool or a DispatchTable, got {type(dispatch).__name__}"
            )
        if table is not None:
            usable = [c.name for c in candidates if c.reason is None]
            why = dispatching.unusable_reason(table, spec, usable)
            if why is not None:
                note = f"{table.path or 'given table'} ignored: {why}"
                warnings.warn(f"dispatch table {note}; static priorities apply", StaleDispatchWarning, 2)
                table = None
    return MoEPlan(spec, info, entry, candidates, chosen_backend, dispatch=table, dispatch_note=note)


def check_expert_weights(spec: MoESpec, weights: ExpertWeights) -> None:
    """Raise :class:`MoEInputError` unless ``weights`` fit ``spec`` (canonical layout).

    Quantized schemes accept either their storage format with scales, or
    high-precision float weights (quantized by the kernel's ``prepare``).
    """
    if not isinstance(weights, ExpertWeights):
        raise MoEInputError(f"weights must be an ExpertWeights, got {type(weights).__name__}")
    scheme = spec.quant
    L, H, inter, N1 = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.w13_rows
    for name in ("w13", "w2"):
        if not isinstance(getattr(weights, name), torch.Tensor):
            raise MoEInputError(f"{name} must be a tensor")
    high = weights.w13.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if high != (weights.w2.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        raise MoEInputError(
            f"w13 ({weights.w13.dtype}) and w2 ({weights.w2.dtype}) must both be quantized or both not"
        )
    pack = 2 if scheme.is_fp4 and not high else 1
    check_shape(weights.w13, (L, N1, H // pack), "w13")
    check_shape(weights.w2, (L, H, inter // pack), "w2")
    if not scheme.is_quantized:
        check_dtype(weights.w13, scheme.weight_dtype, "w13")
        check_dtype(weights.w2, scheme.weight_dtype, "w2")
    elif not high:
        check_dtype(weights.w13, scheme.weight_dtype, "w13")
        check_dtype(weights.w2, scheme.weight_dtype, "w2")
        for name, (n, kdim) in (("w13", (N1, H)), ("w2", (H, inter))):
            _check_scales(spec, weights, name, n, kdim)
    if spec.has_bias:
        for name, n in (("b13", N1), ("b2", H)):
            bias = getattr(weights, name)
            if bias is None:
                raise MoEInputError(f"spec has_bias=True but {name} is missing")
            check_float_tensor(bias, name)
            check_shape(bias, (L, n), name)
    elif weights.b13 is not None or weights.b2 is not None:
        raise MoEInputError("biases given but spec has_bias=False")
    if scheme.static_activation_scale:
        for name in ("a13_scale", "a2_scale"):
            scale = getattr(weights, name)
            if scale is None:
                raise MoEInputError(f"activation mode {scheme.activation} needs a static {name}")
            check_float_tensor(scale, name)
            if scale.numel() != 1:
                raise MoEInputError(f"{name} must hold one value, got shape {list(scale.shape)}")
    check_same_device(weights.tensors())


def _check_scales(spec: MoESpec, weights: ExpertWeights, name: str, n: int, kdim: int) -> None:
    scheme, L = spec.quant, spec.num_local_experts
    scale = getattr(weights, f"{name}_scale")
    if scale is None:
        raise MoEInputError(f"quant {scheme.name} needs {name}_scale")
    if scheme.name == "fp8":
        check_dtype(scale, torch.float32, f"{name}_scale")
        check_shape(scale, (L,) if scheme.weight_scale == "per_tensor" else (L, n), f"{name}_scale")
    elif scheme.name == "fp8_block":
        bn, bk = scheme.block_shape
        check_dtype(scale, torch.float32, f"{name}_scale")
        check_shape(scale, (L, -(-n // bn), -(-kdim // bk)), f"{name}_scale")
    elif scheme.name == "mxfp4":
        check_dtype(scale, torch.uint8, f"{name}_scale")
        check_shape(scale, (L, n, kdim // 32), f"{name}_scale")
    elif scheme.name == "nvfp4":
        check_dtype(scale, torch.float8_e4m3fn, f"{name}_scale")
        check_shape(scale, (L, n, kdim // 16), f"{name}_scale")
        gscale = getattr(weights, f"{name}_global_scale")
        if gscale is None:
            raise MoEInputError(f"quant nvfp4 needs {name}_global_scale")
        check_dtype(gscale, torch.float32, f"{name}_global_scale")
        check_shape(gscale, (L,), f"{name}_global_scale")


_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_ID_DTYPES = (torch.int32, torch.int64)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: key of ``PreparedWeights.cache`` where :func:`_plain_inputs` notes the tensors' version, the
#: device it found them all on and the plan they were checked for (a dispatching plan: every part)
_CHECKED = "moe_core.checked"
_PREPARED = (PreparedWeights, DispatchedWeights)


def _fast_facts(plan: MoEPlan) -> tuple:
    """What :func:`_plain_inputs` compares against, kept on the plan (rebuilt when ``plan.device``
    or ``plan.entry`` is replaced): ``(device info, entry, kernel name (a dispatching plan's:
    :data:`DISPATCH`), H, dtype, top_k, contiguous input needed (by any of its kernels),
    simulated, device type, index or None, value checks asked)``.
    ``MOE_CHECK_INPUTS`` is the plan's (read when it was made), not the environment on every call."""
    facts = plan._fast
    if facts is None or facts[0] is not plan.device or facts[1] is not plan.entry:
        info, entry, spec = plan.device, plan.entry, plan.spec
        want = torch.device("cpu") if info.vendor == "cpu" else info.device
        plan._fast_device = None
        facts = plan._fast = (
            info,
            entry,
            plan.kernel,
            spec.hidden_size,
            spec.dtype,
            spec.top_k,
            any(e.needs_contiguous for e in plan.entries),
            info.simulated,
            want.type,
            want.index,
            plan.check_values,
        )
    return facts


def _plain_inputs(plan: Any, x: Any, prepared: Any, topk_weights: Any, topk_ids: Any, out: Any) -> bool:
    """Whether every check of :func:`check_apply_inputs` passes, decided in a few direct comparisons
    (host time on the hot path). Conservative: ``False`` sends the call through the checks one by
    one, which raise with the precise message (or pass); ``True`` only where each of them passes
    and no value check applies (CPU tensors; ``MOE_CHECK_INPUTS``, as read when planned)."""
    if plan.__class__ is not MoEPlan or prepared.__class__ not in _PREPARED:
        return False
    if not (isinstance(x, _Tensor) and isinstance(topk_weights, _Tensor) and isinstance(topk_ids, _Tensor)):
        return False
    _, _, kernel, hidden, dtype, top_k, contiguous, simulated, dev_type, dev_index, checks = _fast_facts(plan)
    shape = x.shape
    if simulated or prepared.kernel != kernel or len(shape) != 2:
        return False
    rows, cols = shape
    if cols != hidden or x.dtype != dtype or (contiguous and not x.is_contiguous()):  # dtype: the spec's
        return False
    pair = (rows, top_k)
    if (
        topk_ids.shape != pair
        or topk_weights.shape != pair
        or topk_ids.dtype not in _ID_DTYPES
        or topk_weights.dtype not in _FLOATS
    ):
        return False
    if out is not None and not (
        isinstance(out, _Tensor) and out.shape == shape and out.dtype == dtype and out.is_contiguous()
    ):
        return False
    device = x.device
    fast_device = plan._fast_device
    if device != fast_device:  # (a torch.device's type and index are slow to read)
        if device.type != dev_type or (dev_index is not None and device.index != dev_index):
            return False
        plan._fast_device = fast_device = device
    if topk_weights.device != device or topk_ids.device != device:
        return False
    if out is not None and out.device != device:
        return False
    tensors = prepared.tensors
    version = getattr(tensors, "version", None)
    seen = prepared.cache.get(_CHECKED)
    if (
        seen is None
        or seen[0] != version
        or seen[1] is not fast_device
        or seen[2] is not plan
        or version is None
    ):
        for t in tensors.values():
            if not isinstance(t, _Tensor) or t.device != device:
                return False
        if plan.routes is not None and any(k not in getattr(prepared, "parts", {}) for k in plan.kernels):
            return False
        prepared.cache[_CHECKED] = (version, fast_device, plan)  # while the version holds
    if dev_type == "cpu" or checks:
        return not should_check_values(topk_ids)
    return True  # a GPU tensor, no value checks asked: should_check_values would say False


def check_apply_inputs(
    plan: MoEPlan,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Every check of :func:`moe_apply`; raises :class:`MoEInputError`."""
    if _plain_inputs(plan, hidden_states, prepared, topk_weights, topk_ids, out):
        return  # the common call: every check below would pass
    if not isinstance(plan, MoEPlan):
        raise MoEInputError(f"plan must be a MoEPlan from moe_plan(), got {type(plan).__name__}")
    spec = plan.spec
    if not isinstance(prepared, PreparedWeights):
        raise MoEInputError("prepared must come from plan.prepare(weights)")
    if prepared.kernel != plan.kernel:
        raise MoEInputError(f"weights were prepared for {prepared.kernel}, but the plan runs {plan.kernel}")
    if plan.routes is not None:
        parts = getattr(prepared, "parts", {})
        missing = [k for k in plan.kernels if k not in parts]
        if missing:
            raise MoEInputError(
                f"prepared weights hold no weights for {', '.join(missing)}; use this plan's prepare()"
            )
    x = check_float_tensor(hidden_states, "hidden_states")
    if x.dim() != 2:
        raise MoEInputError(f"hidden_states must be 2-D [tokens, hidden], got shape {list(x.shape)}")
    check_shape(x, (None, spec.hidden_size), "hidden_states")
    check_dtype(x, spec.dtype, "hidden_states")
    if not x.is_contiguous():
        strict = [e.name for e in plan.entries if e.needs_contiguous]
        if strict:
            raise MoEInputError(f"kernel {strict[0]} needs contiguous hidden_states; call .contiguous()")
    check_topk(topk_weights, topk_ids, x.shape[0], spec.top_k, spec.num_experts)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise MoEInputError("out must be a tensor")
        check_shape(out, tuple(x.shape), "out")
        check_dtype(out, spec.dtype, "out")
        if not out.is_contiguous():
            raise MoEInputError("out must be contiguous")
    if plan.device.simulated:
        raise MoEInputError(
            f"plan was made for a simulated device ({plan.device}); plan for a real device to run"
        )
    tensors = {"hidden_states": x, "topk_weights": topk_weights, "topk_ids": topk_ids, "out": out}
    tensors.update({f"prepared.{k}": v for k, v in prepared.tensors.items()})
    check_same_device(tensors, _torch_device(plan.device, x.device))


def moe_apply(
    plan: MoEPlan,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the planned experts: ``[T, H]`` in ``plan.spec.dtype``.

    Args:
        plan: from :func:`moe_plan`.
        hidden_states: ``[T, H]`` of ``spec.dtype``.
        prepared: from ``plan.prepare``.
        topk_weights: float ``[T, top_k]`` router weights.
        topk_ids: int32/int64 ``[T, top_k]`` global expert ids in ``[0, num_experts)``.
        out: optional contiguous ``[T, H]`` buffer of ``spec.dtype`` to write into.
    """
    if not _plain_inputs(plan, hidden_states, prepared, topk_weights, topk_ids, out):
        check_apply_inputs(plan, hidden_states, prepared, topk_weights, topk_ids, out)
    if _is_compiling():
        from .ops import moe_apply_op

        return moe_apply_op(plan, hidden_states, prepared, topk_weights, topk_ids, out)
    if plan.routes is not None or out is None or not hidden_states.numel():  # (numel: T * H, H > 0)
        return run_experts(plan, hidden_states, prepared, topk_weights, topk_ids, out)
    # run_experts' common case, without its call
    plan.entry.apply(plan.spec, hidden_states, prepared, topk_weights, topk_ids, out)
    return out


def run_experts(
    plan: MoEPlan,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Call the kernel (for a dispatching plan: the bucket's) on checked inputs (``T == 0`` launches nothing)."""
    if out is None:
        out = torch.empty(hidden_states.shape, dtype=plan.spec.dtype, device=hidden_states.device)
    tokens = hidden_states.shape[0]
    if tokens:
        if plan.routes is None:
            plan.entry.apply(plan.spec, hidden_states, prepared, topk_weights, topk_ids, out)
        else:
            entry = plan.routes[bucket_index(tokens)]
            entry.apply(plan.spec, hidden_states, prepared.parts[entry.name], topk_weights, topk_ids, out)
    return out
