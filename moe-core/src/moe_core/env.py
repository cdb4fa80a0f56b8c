"""Environment variables read on the per-call path.

``os.environ.get`` of a variable that is not set costs about 0.7 us (a ``KeyError`` raised and
caught inside ``Mapping.get``); :func:`getenv` is one dict lookup on ``os.environ``'s own store,
so that a knob read on every ``moe_apply`` costs what its comparison does. It reads the live
environment (``os.environ[...] = ...``, ``monkeypatch.setenv`` and ``putenv`` through ``os.environ``
are seen at once) and falls back to ``os.environ.get`` where ``os.environ`` is not CPython's
``_Environ`` (replaced by a plain mapping).
"""

from __future__ import annotations

import os

__all__ = ["getenv"]

_KEYS: dict[str, object] = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, without the cost of an unset name."""
    env = os.environ
    try:
        data, key = env._data, _KEYS[name]  # type: ignore[attr-defined]
    except (AttributeError, KeyError):
        if not hasattr(env, "_data") or not hasattr(env, "encodekey"):
            return env.get(name, default)
        key = _KEYS[name] = env.encodekey(name)
        data = env._data
    raw = data.get(key)
    return default if raw is None else env.decodevalue(raw)  # type: ignore[attr-defined]
