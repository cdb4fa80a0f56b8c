"""Hook specifications of the ``moe_core`` pluggy project.

A plugin is a module named by an entry point in the group ``moe_core.plugins``
that implements some of these hooks with :data:`hookimpl`::

    # pyproject.toml
    [project.entry-points."moe_core.plugins"]
    mybackend = "my_package.plugin"

    # my_package/plugin.py
    from moe_core import KernelEntry, hookimpl

    @hookimpl
    def register_kernels(register):
        register(KernelEntry(name="mybackend.triton.fused", family="experts", ...))

Each plugin's hooks are called on their own: a plugin that raises is recorded
as failed (with its traceback) and none of its kernels are kept; the others
load normally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "moe_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_kernels(register: Callable[[Any], None]) -> None:
    """Register the plugin's kernels.

    Called once, when plugins are first loaded (the first ``moe_plan``,
    ``select_experts`` or sorting call, or ``moe plugins``). Call
    ``register(entry)`` with a :class:`moe_core.KernelEntry` for each kernel
    the plugin ships, whether or not it can run on this machine: device and
    library checks belong in the entry's ``capability`` and ``supports`` so that
    ``plan.explain()`` can say why a kernel was refused. Do not import heavy
    vendor libraries here; import them lazily in ``supports``/``prepare``/``apply``.
    Returns nothing.
    """


@hookspec
def register_presets(register: Callable[[Any], None]) -> None:
    """Register extra model presets for the CLI.

    Call ``register(preset)`` with a :class:`moe_core.presets.ModelPreset` per
    model. Names must not clash with the core's presets. Returns nothing.
    """


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add the plugin's own ``moe`` subcommands.

    Called once each time the ``moe`` CLI builds its parser, after the core's
    commands and after plugins are loaded. ``subparsers`` is the
    :mod:`argparse` subparsers action of ``moe``: call
    ``subparsers.add_parser(name, help=...)`` and give each parser a ``func``
    default (``parser.set_defaults(func=run)``); ``run(args)`` returns the exit
    status, and :class:`moe_core.MoEError` raised from it prints as an error
    with status 2. Name commands after the plugin (``moe amd profile``) so they
    cannot clash with the core's or another plugin's. Keep it cheap: import
    what a command needs inside ``run``. A plugin whose hook raises (a name
    clash included) is reported on stderr and its commands are left out
    (``MOE_STRICT_PLUGINS=1``: the CLI fails instead). Returns nothing.
    """


@hookspec
def environment_report() -> dict[str, Any] | None:
    """Return facts for ``moe doctor``: library versions, caches, build state.

    Keys are short labels, values JSON-serialisable. Must be cheap and must
    not compile or download anything. Return ``None`` for nothing to report.
    """


@hookspec
def tune(
    spec: Any, device: Any, tokens: list[int], output_dir: str | None, progress: Callable
) -> list[str] | None:
    """Tune this plugin's kernels for ``spec`` on ``device`` and persist the result.

    Called by ``moe tune``. ``tokens`` are the token counts to tune at (one per
    bucket); ``output_dir`` the folder to write tables into (``None``: the
    plugin's default, which its runtime reads); ``progress(description,
    completed, total)`` reports progress. Return the paths written, or
    ``None`` when the plugin has nothing to tune for this spec/device.

    After every plugin's hook, ``moe tune`` times all usable experts kernels per
    token bucket in the same process (:mod:`moe_core.dispatch`), so the plugin's
    runtime must use what this hook wrote from then on (clear its table caches).
    """
