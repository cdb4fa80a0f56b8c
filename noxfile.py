"""Test sessions, one per vendor distribution, plus an umbrella, lint and demo.

Every session installs the CPU build of torch pinned below (on this project's
machines pip takes it from local disk, /opt/wheels); set MOE_TORCH_SPEC to
override (e.g. on a GPU machine: MOE_TORCH_SPEC=torch to keep what pip finds).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
TORCH = os.environ.get("MOE_TORCH_SPEC", "torch==2.13.0")
WHEELS = "/opt/wheels"
PACKAGES = {
    "core": "moe-core",
    "portable": "moe-plugin-portable",
    "nvidia": "moe-plugin-nvidia",
    "amd": "moe-plugin-amd",
}


def _install(session: nox.Session, *vendors: str) -> None:
    find_links = ["--find-links", WHEELS] if os.path.isdir(WHEELS) else []
    session.install(*find_links, TORCH)
    paths = ["-e", f"{ROOT / 'moe-core'}[test,cli]"]
    for vendor in vendors:
        if vendor != "core":
            paths += ["-e", str(ROOT / PACKAGES[vendor])]
    session.install(*find_links, *paths)


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("pytest", *(session.posargs or ["-q", *paths]), env={"TRITON_INTERPRET": "1"})


@nox.session(name="tests-core")
def tests_core(session: nox.Session) -> None:
    """moe-core alone: contract, reference, sorting, plugin system, CLI."""
    _install(session, "core")
    _pytest(session, "tests/core")


@nox.session(name="tests-portable")
def tests_portable(session: nox.Session) -> None:
    """The Triton plugin, under TRITON_INTERPRET=1 on the CPU."""
    _install(session, "core", "portable")
    _pytest(session, "tests/portable")


@nox.session(name="tests-nvidia")
def tests_nvidia(session: nox.Session) -> None:
    """The FlashInfer plugin: registration, supports() and prepare() on the CPU."""
    _install(session, "core", "nvidia")
    _pytest(session, "tests/nvidia")


@nox.session(name="tests-amd")
def tests_amd(session: nox.Session) -> None:
    """The AMD plugin: logic on the CPU, offline compilation for gfx950."""
    _install(session, "core", "amd")
    _pytest(session, "tests/amd")


@nox.session(name="tests")
def tests(session: nox.Session) -> None:
    """Everything, with all four distributions installed together (and transformers, for tests/integrations)."""
    _install(session, *PACKAGES)
    # moe-core's `hf` extra; torch named again so pip keeps the pinned build (transformers does not require torch)
    find_links = ["--find-links", WHEELS] if os.path.isdir(WHEELS) else []
    session.install(*find_links, TORCH, "-e", f"{ROOT / 'moe-core'}[hf]")
    # the tutorial plugin: tests/core/test_conformance_kit.py runs the conformance kit on it
    session.install("--no-deps", "-e", str(ROOT / "examples" / "minimal-plugin"))
    _pytest(session, "tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job on this machine, plus a plan for a GPU that is not here."""
    _install(session, *PACKAGES)
    session.run("moe", "plugins")
    session.run("moe", "run")
    session.run("moe", "plan", "--model", "deepseek-v3-tp8", "--device", "sm_90")
