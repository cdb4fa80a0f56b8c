"""What the conformance modules share: which kernels to check, parametrization, seeds, spies."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from ..device import DeviceInfo, device_info
from ..errors import MoEError
from ..registry import KernelEntry, get_registry
from ..testing.plugin import requested_device, requested_kernels

USAGE = "pytest --pyargs moe_core.conformance --moe-kernel NAME"

#: Marks a test function with the kind of cases it runs on (see :func:`parametrize`).
_KIND_ATTR = "moe_conformance_cases"

_CACHE: pytest.StashKey[dict[str, Any]] = pytest.StashKey()


def cases(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the test takes a ``case`` argument, one per case of ``kind`` per kernel."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _KIND_ATTR, kind)
        return fn

    return mark


def matches(name: str, requested: str) -> bool:
    """``requested`` names this kernel exactly or is a dotted prefix of its name."""
    return name == requested or name.startswith(requested + ".")


def target_device(config: pytest.Config) -> tuple[torch.device, DeviceInfo]:
    """The torch device of ``--moe-device`` and what moe_core detects it to be."""
    cache = config.stash.setdefault(_CACHE, {})
    if "device" not in cache:
        device = requested_device(config)
        try:
            cache["device"] = (device, device_info(device))
        except MoEError as exc:
            raise pytest.UsageError(f"--moe-device {device}: {exc}") from None
    return cache["device"]


def selected_entries(config: pytest.Config, family: str | None = None) -> list[KernelEntry]:
    """Registered kernels (of ``family``) named by ``--moe-kernel``, sorted by name."""
    wanted = requested_kernels(config)
    entries = get_registry().entries(family)
    return [e for e in entries if any(matches(e.name, w) for w in wanted)]


@dataclass(frozen=True, kw_only=True)
class Case:
    """One conformance case of one kernel: ``label`` names it; ``refusal`` is why the kernel refuses it.

    The test modules subclass it with the data their cases need.
    """

    entry: KernelEntry
    label: str
    refusal: str | None = None

    @property
    def id(self) -> str:
        return f"{self.entry.name}:{self.label}"

    @property
    def seed(self) -> int:
        """A seed of its own, stable across runs: fresh data per case, reproducible failures."""
        return zlib.crc32(self.id.encode())


def to_param(case: Case) -> Any:
    """``case`` as a pytest parameter; a case the kernel refuses is skipped with its reason.

    A ``supports()`` that raised is not a refusal: that case runs and fails.
    """
    reason = case.refusal
    marks = ()
    if reason is not None and not reason.startswith("supports() raised"):
        marks = (pytest.mark.skip(reason=f"{case.entry.name} refuses {case.label}: {reason}"),)
    return pytest.param(case, id=case.id, marks=marks)


@dataclass(frozen=True)
class Skip:
    """A case that does not apply to a kernel (``label`` as a case's), with the reason."""

    label: str
    reason: str


def parametrize(
    metafunc: pytest.Metafunc,
    family: str,
    build: Callable[[KernelEntry, torch.device, DeviceInfo], Iterable[tuple[str, Case | Skip]]],
) -> None:
    """Parametrize ``metafunc``'s ``case`` argument with the cases of its kind, for every kernel.

    ``build(entry, device, info)`` yields ``(kind, case)`` pairs (a
    :class:`Skip` for a case that does not apply to that kernel); a test
    marked ``@cases(kind)`` runs on the cases of its kind. Skips the whole
    module when no kernel of ``family`` was asked for.
    """
    config = metafunc.config
    wanted = requested_kernels(config)
    if not wanted:
        pytest.skip(f"no kernel to check: run {USAGE}")
    entries = selected_entries(config, family)
    if not entries:
        pytest.skip(f"no {family} kernel among --moe-kernel {', '.join(wanted)}")
    kind = getattr(metafunc.function, _KIND_ATTR, None)
    if kind is None or "case" not in metafunc.fixturenames:
        return
    cache = config.stash.setdefault(_CACHE, {})
    key = f"cases:{family}"
    if key not in cache:
        device, info = target_device(config)
        by_kind: dict[str, list[Any]] = {}
        for entry in entries:
            for case_kind, case in build(entry, device, info):
                if isinstance(case, Skip):
                    mark = pytest.mark.skip(reason=case.reason)
                    param = pytest.param(None, id=f"{entry.name}:{case.label}", marks=mark)
                else:
                    param = to_param(case)
                by_kind.setdefault(case_kind, []).append(param)
        cache[key] = by_kind
    params = cache[key].get(kind, [])
    if not params:
        params = [
            pytest.param(None, id=kind, marks=pytest.mark.skip(reason=f"no {kind} case for these kernels"))
        ]
    metafunc.parametrize("case", params)


class Spy:
    """Wraps a kernel's ``apply`` and records each call (to check what ran before an error)."""

    def __init__(self, apply: Callable[..., Any]):
        self.apply = apply
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.apply(*args, **kwargs)


def spy_on(plan: Any) -> Spy:
    """Route ``plan``'s kernel calls through a :class:`Spy` (the registry entry stays untouched)."""
    spy = Spy(plan.entry.apply)
    plan.entry = replace(plan.entry, apply=spy)
    return spy


def generator(seed: int) -> torch.Generator:
    """A CPU generator (tensors are drawn on the CPU, then moved: same data on every device)."""
    return torch.Generator().manual_seed(seed)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view of ``t``'s values (every other element along a doubled last dim)."""
    return torch.stack([t, t], dim=-1)[..., 0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe; works for fp8 and packed fp4 too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()

    return torch.equal(raw(a), raw(b))


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors``, to check later that nobody wrote into them."""
    return {name: t.detach().clone() for name, t in tensors.items()}


def assert_unchanged(tensors: dict[str, torch.Tensor], before: dict[str, torch.Tensor], what: str) -> None:
    changed = [name for name, t in before.items() if not same_bits(tensors[name], t)]
    if changed:
        raise AssertionError(f"{what} modified its inputs in place: {', '.join(changed)}")
