"""Shared fixtures: every test starts with no MOE_* variables and fresh plugin state."""

from __future__ import annotations

import os

import pytest

import moe_core


@pytest.fixture(autouse=True)
def _clean_moe_state(monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("MOE_"):
            monkeypatch.delenv(name)
    moe_core.reset_plugins()
    yield
    moe_core.reset_plugins()
