"""Device capability detection and kernel capability requirements.

A :class:`DeviceInfo` says what a device is (vendor, arch, compute capability);
a :class:`Capability` is what a kernel requires, parsed from a short string:

=========================  ==============================================
requirement                matches
=========================  ==============================================
``any``                    every device (the reference backend)
``cpu``                    CPU tensors
``gpu``                    any CUDA or ROCm device
``cuda``                   any NVIDIA device
``cuda>=9.0,<10.0``        NVIDIA compute capability 9.x (Hopper)
``hip``                    any AMD device
``hip gfx950,gfx942``      AMD devices of those architectures
``cuda>=9.0 | hip gfx950`` either (alternatives separated by ``|``)
=========================  ==============================================

For tests and for planning on a machine without the device, the detected
capability can be overridden: pass a :class:`DeviceInfo` (or a string such as
``"sm_90"``, ``"gfx950"``) wherever a device is taken, or set
``MOE_DEVICE_OVERRIDE`` (same syntax) to override detection globally.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field

import torch

from .env import getenv
from .errors import MoEInputError

__all__ = ["Capability", "DeviceInfo", "device_info", "triton_interpreting", "triton_refusal"]


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is.

    Attributes:
        vendor: ``"cpu"``, ``"nvidia"`` or ``"amd"``.
        arch: ``"cpu"``, ``"sm_90"``-style for NVIDIA, ``"gfx950"``-style for AMD.
        capability: ``(major, minor)`` for NVIDIA, ``None`` otherwise.
        name: marketing name (``"NVIDIA H100 80GB HBM3"``) when known.
        device: the torch device tensors live on (``cuda`` for ROCm too).
        simulated: True when this describes a device that is not really present.
    """

    vendor: str
    arch: str
    capability: tuple[int, int] | None = None
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    simulated: bool = False

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("nvidia", "amd")

    def __str__(self) -> str:
        label = self.name or self.arch
        text = f"{self.vendor}:{self.arch}" if self.vendor != "cpu" else "cpu"
        if label and label not in (self.arch, "cpu"):
            text += f" ({label})"
        if self.simulated:
            text += " [simulated]"
        return text

    @classmethod
    def parse(cls, text: str) -> DeviceInfo:
        """A simulated device from ``cpu``, ``sm_90``/``sm90``/``cuda:9.0``, ``gfx950``/``hip:gfx950``."""
        s = text.strip().lower()
        if s == "cpu":
            return cls("cpu", "cpu")
        m = re.fullmatch(r"(?:sm_?|cuda:|nvidia:)(\d+)(?:\.(\d+))?", s)
        if m:
            if m.group(2) is not None:
                major, minor = int(m.group(1)), int(m.group(2))
            else:
                digits = m.group(1)
                major, minor = int(digits[:-1] or 0), int(digits[-1])
            return cls(
                "nvidia", f"sm_{major}{minor}", (major, minor), device=torch.device("cuda"), simulated=True
            )
        m = re.fullmatch(r"(?:hip:|rocm:|amd:)?(gfx[0-9a-f]+)", s)
        if m:
            return cls("amd", m.group(1), device=torch.device("cuda"), simulated=True)
        raise MoEInputError(f"cannot parse device {text!r}; use cpu, sm_90, cuda:9.0 or gfx950")


def _detect(device: torch.device) -> DeviceInfo:
    if device.type == "cpu":
        return DeviceInfo("cpu", "cpu", device=device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoEInputError(f"device {device} requested but torch sees no CUDA/ROCm device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        dev = torch.device("cuda", index)
        if getattr(torch.version, "hip", None):
            arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
            return DeviceInfo("amd", arch, name=props.name, device=dev)
        cap = (props.major, props.minor)
        return DeviceInfo("nvidia", f"sm_{cap[0]}{cap[1]}", cap, props.name, dev)
    return DeviceInfo(device.type, device.type, device=device)


def device_info(device: DeviceInfo | torch.device | str | None = None) -> DeviceInfo:
    """Describe ``device`` (default: the current CUDA device if any, else the CPU).

    ``MOE_DEVICE_OVERRIDE`` replaces what is detected for accelerator devices
    (and for ``None``); a :class:`DeviceInfo` or an arch string passes through.
    """
    if isinstance(device, DeviceInfo):
        return device
    if isinstance(device, str) and not re.match(r"^(cpu|cuda|meta|mps|xpu)(:\d+)?$", device.strip()):
        return DeviceInfo.parse(device)
    override = os.environ.get("MOE_DEVICE_OVERRIDE", "").strip()
    if device is None:
        if override:
            return DeviceInfo.parse(override)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if override and device.type != "cpu":
        return DeviceInfo.parse(override)
    return _detect(device)


_VERSION_RE = re.compile(r"(>=|<=|==|>|<)\s*(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class _Alternative:
    vendor: str  # any | cpu | gpu | nvidia | amd
    bounds: tuple[tuple[str, tuple[int, int]], ...] = ()
    archs: frozenset[str] = frozenset()

    def refusal(self, dev: DeviceInfo) -> str | None:
        if self.vendor == "any":
            return None
        if self.vendor == "gpu":
            return None if dev.is_gpu else "needs a GPU"
        if dev.vendor != self.vendor:
            return f"needs {'an' if self.vendor == 'amd' else 'a'} {self.vendor} device"
        if self.archs and dev.arch not in self.archs:
            return f"needs arch {'/'.join(sorted(self.archs))}"
        for op, (major, minor) in self.bounds:
            cap = dev.capability or (0, 0)
            ok = {
                ">=": cap >= (major, minor),
                ">": cap > (major, minor),
                "<=": cap <= (major, minor),
                "<": cap < (major, minor),
                "==": cap == (major, minor),
            }[op]
            if not ok:
                return f"needs compute capability {op}{major}.{minor}"
        return None


@dataclass(frozen=True)
class Capability:
    """A kernel's device requirement, parsed from a string (see the module docstring)."""

    text: str
    alternatives: tuple[_Alternative, ...]

    @classmethod
    def parse(cls, text: str) -> Capability:
        alts = []
        for part in text.split("|"):
            tokens = part.strip().split(None, 1)
            if not tokens:
                raise ValueError(f"empty capability alternative in {text!r}")
            head = tokens[0].lower()
            rest = tokens[1] if len(tokens) > 1 else ""
            m = re.match(r"^(any|cpu|gpu|cuda|nvidia|hip|rocm|amd)(.*)$", head)
            if not m:
                raise ValueError(f"unknown capability {part.strip()!r}; expected any/cpu/gpu/cuda.../hip ...")
            vendor = {"cuda": "nvidia", "hip": "amd", "rocm": "amd"}.get(m.group(1), m.group(1))
            tail = (m.group(2) + " " + rest).strip()
            bounds: list[tuple[str, tuple[int, int]]] = []
            archs: set[str] = set()
            if vendor == "nvidia" and tail:
                for item in tail.split(","):
                    vm = _VERSION_RE.fullmatch(item.strip())
                    if not vm:
                        raise ValueError(f"bad compute-capability bound {item.strip()!r} in {text!r}")
                    bounds.append((vm.group(1), (int(vm.group(2)), int(vm.group(3) or 0))))
            elif vendor == "amd" and tail:
                archs = {a.strip().lower() for a in re.split(r"[,\s]+", tail.lstrip(":")) if a.strip()}
            elif tail:
                raise ValueError(f"capability {head!r} takes no qualifiers: {text!r}")
            alts.append(_Alternative(vendor, tuple(bounds), frozenset(archs)))
        return cls(text, tuple(alts))

    def refusal(self, dev: DeviceInfo) -> str | None:
        """``None`` if ``dev`` satisfies the requirement, else why not."""
        reasons = []
        for alt in self.alternatives:
            reason = alt.refusal(dev)
            if reason is None:
                return None
            reasons.append(reason)
        return f"{' or '.join(reasons)} ({self.text}); device is {dev}"

    def __str__(self) -> str:
        return self.text


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return getenv("TRITON_INTERPRET", "") in ("1", "true", "True")


def triton_refusal(device: DeviceInfo) -> str | None:
    """Why Triton kernels cannot run on ``device``, or ``None`` (for plugins' ``supports``).

    GPUs (NVIDIA, AMD) run compiled kernels; the CPU runs them only in the
    interpreter, which is slow and meant for tests. Imports no Triton.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.vendor == "cpu" and not triton_interpreting():
        return "Triton runs on the CPU only in its interpreter (TRITON_INTERPRET=1, for tests)"
    return None
