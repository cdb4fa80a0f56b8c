"""Device descriptions and kernel capability requirements."""

from __future__ import annotations

import pytest
import torch

from moe_core import Capability, DeviceInfo, MoEInputError, device_info

H100 = DeviceInfo.parse("sm_90")
B200 = DeviceInfo.parse("cuda:10.0")
MI355 = DeviceInfo.parse("gfx950")
MI300 = DeviceInfo.parse("hip:gfx942")
CPU = device_info("cpu")


def test_parse():
    assert (H100.vendor, H100.arch, H100.capability, H100.simulated) == ("nvidia", "sm_90", (9, 0), True)
    assert B200.capability == (10, 0) and DeviceInfo.parse("sm120").capability == (12, 0)
    assert (MI355.vendor, MI355.arch) == ("amd", "gfx950")
    assert CPU.vendor == "cpu" and not CPU.simulated and CPU.device == torch.device("cpu")
    with pytest.raises(MoEInputError):
        DeviceInfo.parse("tpu9")


@pytest.mark.parametrize(
    ("requirement", "ok", "refused"),
    [
        ("any", [CPU, H100, MI355], []),
        ("cpu", [CPU], [H100, MI355]),
        ("gpu", [H100, MI355], [CPU]),
        ("cuda", [H100, B200], [CPU, MI355]),
        ("cuda>=9.0,<10.0", [H100], [B200, CPU, MI355]),
        ("cuda>=10.0", [B200], [H100]),
        ("hip gfx950", [MI355], [MI300, H100]),
        ("hip gfx950,gfx942", [MI355, MI300], [H100]),
        ("cuda>=9.0 | hip gfx950", [H100, B200, MI355], [MI300, CPU]),
    ],
)
def test_capability(requirement, ok, refused):
    cap = Capability.parse(requirement)
    for dev in ok:
        assert cap.refusal(dev) is None, (requirement, dev)
    for dev in refused:
        reason = cap.refusal(dev)
        assert reason and requirement in reason and str(dev) in reason


def test_capability_reason_is_specific():
    assert "compute capability <10.0" in Capability.parse("cuda>=9.0,<10.0").refusal(B200)
    assert "gfx950" in Capability.parse("hip gfx950").refusal(MI300)


@pytest.mark.parametrize("bad", ["", "tpu", "cuda>=x", "cpu gfx950"])
def test_capability_parse_errors(bad):
    with pytest.raises(ValueError):
        Capability.parse(bad)


def test_override_env(monkeypatch):
    monkeypatch.setenv("MOE_DEVICE_OVERRIDE", "gfx950")
    assert device_info(None) == MI355
    assert device_info("cpu").vendor == "cpu"  # CPU tensors stay CPU
    assert device_info("sm_90") == H100
