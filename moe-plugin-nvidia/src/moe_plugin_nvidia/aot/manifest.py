"""What a module built by ``moe nvidia build`` contains: ``moe_build.json`` beside the ``.so``.

Fields: ``module`` (``fused_moe_90``), ``arch`` (``9.0a``), ``quants`` (the
schemes built), ``flashinfer_version``, ``units`` (sources compiled),
``omitted`` (sources left out), ``stubs`` (symbols stubbed), ``seconds``
(``{"wall": ..., "core": ..., "<scheme>": ...}``: wall time of the build and
summed compile seconds per scheme, from ``.ninja_log``), ``jobs``, ``nvcc``,
``built_at`` (ISO time). A module without this file (FlashInfer's own JIT or
jit-cache build) is taken to contain every scheme.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "Manifest", "read_manifest", "write_manifest"]

MANIFEST_NAME = "moe_build.json"


@dataclass
class Manifest:
    module: str
    arch: str
    quants: list[str]
    flashinfer_version: str
    units: int = 0
    omitted: int = 0
    stubs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    jobs: int = 0
    nvcc: str = ""
    built_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/moe_build.json``; returns its path."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder``, or ``None`` when absent or unreadable."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        known = set(Manifest.__dataclass_fields__)
        return Manifest(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError):
        return None
