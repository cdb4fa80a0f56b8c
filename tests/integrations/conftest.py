"""Integration tests are hermetic: only the built-in reference kernels load unless a test says otherwise."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _reference_only(monkeypatch: pytest.MonkeyPatch, _clean_moe_state):
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "")
