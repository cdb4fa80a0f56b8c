"""moe-core's pytest plugin: the options and fixtures of the conformance kit.

Registered in the entry-point group ``pytest11`` (name ``moe_core``), so pytest
loads it in every run where moe-core is installed; it therefore only adds
options and fixtures, changes nothing else, and imports nothing beyond pytest
at import time: it is a top-level module, outside the ``moe_core`` package, whose
``__init__`` imports torch (disable it with ``-p no:moe_core``). Also importable as
:mod:`moe_core.testing.plugin`. The tests themselves are
in :mod:`moe_core.conformance`::

    pytest --pyargs moe_core.conformance --moe-kernel example.torch.loop

Options:

``--moe-kernel NAME``
    a kernel to check, by its registry name or a dotted prefix of names
    (``portable.triton`` checks every kernel of that backend); repeatable, and
    a comma list is split.
``--moe-device DEVICE``
    the torch device to run on (``cuda``, ``cuda:1``, ``cpu``); default
    ``cuda`` when torch sees a GPU, else ``cpu``.

Fixtures: ``moe_kernels`` (the names given, a list) and ``moe_device`` (a
``torch.device``).
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["moe_device", "moe_kernels", "requested_device", "requested_kernels"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe", "moe_core conformance kit (pytest --pyargs moe_core.conformance)")
    group.addoption(
        "--moe-kernel",
        action="append",
        default=[],
        dest="moe_kernels",
        metavar="NAME",
        help="kernel to check: a registry name or dotted prefix (repeatable)",
    )
    group.addoption(
        "--moe-device",
        default=None,
        dest="moe_device",
        metavar="DEVICE",
        help="torch device for the kit (default: cuda if available, else cpu)",
    )


def requested_kernels(config: pytest.Config) -> list[str]:
    """The names given with ``--moe-kernel``, in order, without duplicates."""
    names: list[str] = []
    for value in config.getoption("moe_kernels", default=None) or []:
        for name in str(value).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def requested_device(config: pytest.Config) -> Any:
    """The ``torch.device`` given with ``--moe-device`` (default: ``cuda`` if available, else ``cpu``)."""
    import torch

    value = config.getoption("moe_device", default=None)
    if not value:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise pytest.UsageError(f"--moe-device {value!r}: {exc}") from None


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    kernels = requested_kernels(config)
    if not kernels:
        return None
    device = config.getoption("moe_device", default=None) or "default (cuda if available, else cpu)"
    return [f"moe_core conformance: kernels {', '.join(kernels)}; device {device}"]


@pytest.fixture(scope="session")
def moe_kernels(pytestconfig: pytest.Config) -> list[str]:
    """The kernel names given with ``--moe-kernel`` (possibly empty)."""
    return requested_kernels(pytestconfig)


@pytest.fixture(scope="session")
def moe_device(pytestconfig: pytest.Config) -> Any:
    """The ``torch.device`` the conformance kit runs on (``--moe-device``)."""
    return requested_device(pytestconfig)
