"""Subprocess entry: let FlashInfer generate its ``fused_moe_<arch>`` sources and ``build.ninja``.

Run by :mod:`.build` as ``python -m moe_plugin_nvidia.aot._gen <module>`` with
``FLASHINFER_CUDA_ARCH_LIST``, ``FLASHINFER_WORKSPACE_BASE`` and ``CUDA_HOME``
set (FlashInfer reads them at import). Prints one JSON object on the last
line of stdout: ``name``, ``ninja``, ``sources``, ``flashinfer_version``,
``flashinfer_dir``. Nothing is compiled here.
"""

from __future__ import annotations

import json
import sys

_GENERATORS = {"fused_moe_90": "gen_cutlass_fused_moe_sm90_module"}


def main(argv: list[str]) -> int:
    module = argv[0] if argv else "fused_moe_90"
    import flashinfer
    import flashinfer.jit.fused_moe as fm

    spec = getattr(fm, _GENERATORS[module])()
    spec.write_ninja()
    info = {
        "name": spec.name,
        "ninja": str(spec.ninja_path),
        "sources": [str(s.resolve()) for s in spec.sources],
        "flashinfer_version": flashinfer.__version__,
        "flashinfer_dir": str(flashinfer.__path__[0]),
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
