"""Shared fixtures: every test starts with no MOE_* variables and fresh plugin state."""

from __future__ import annotations

import os

import pytest

import moe_core

if os.environ.get("TRITON_INTERPRET") == "1":  # kernels under the interpreter round as on a GPU
    from .interpreter_fixes import install

    install()


@pytest.fixture(autouse=True)
def _clean_moe_state(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    for name in list(os.environ):
        if name.startswith("MOE_"):
            monkeypatch.delenv(name)
    # no dispatch table from the user's cache dir (moe tune) changes what a test plans
    monkeypatch.setenv("MOE_DISPATCH_DIR", str(tmp_path_factory.mktemp("dispatch")))
    moe_core.reset_plugins()
    yield
    moe_core.reset_plugins()
