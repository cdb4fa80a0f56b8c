"""moe_core.env.getenv: os.environ.get's answers, on the live environment."""

from __future__ import annotations

import os

from moe_core.env import getenv


def test_reads_the_live_environment(monkeypatch):
    name = "MOE_TEST_ENV_KNOB"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None and getenv(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "1")
    assert getenv(name) == "1"
    os.environ[name] = "é and spaces "
    assert getenv(name) == os.environ.get(name) == "é and spaces "
    del os.environ[name]
    assert getenv(name, "") == ""


def test_falls_back_where_os_environ_is_a_plain_mapping(monkeypatch):
    monkeypatch.setattr(os, "environ", {"MOE_TEST_ENV_KNOB": "x"})
    assert getenv("MOE_TEST_ENV_KNOB") == "x" and getenv("MOE_OTHER", "d") == "d"
