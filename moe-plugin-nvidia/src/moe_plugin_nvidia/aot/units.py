"""Which source units of FlashInfer's ``fused_moe_90`` each quant scheme needs.

The module's sources fall into three groups:

* *core*: the binding, the runner instantiation, helpers; always built;
* *per-dtype runners*: ``moe_gemm_kernels_<act>_<weight>.cu`` and
  ``fp8_blockscale_gemm.cu``;
* *generated instantiations* (``*.generated.cu``), classified by their
  content: the ``INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, A, B, Out, ...)``
  macros (SM90 grouped GEMM) and the ``sm80_generic_fused_moe_gemm_kernelLauncher
  <A, B, ...>`` templates (the SM80 fused gated GEMM used for small problems),
  and the ``sm90_generic_mixed_moe_gemm_kernelLauncher<A, B, ...>`` templates
  (the SM90 mixed-input grouped GEMM: bf16/fp8 activations x int4/fp4
  weights). Files with anything else (plain fpA_intB GEMMs) belong to no
  scheme we build.

A file is kept when any dtype key it instantiates belongs to a requested
scheme. Everything is pure text handling, testable without FlashInfer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath

__all__ = [
    "QUANT_SCHEMES",
    "UnitSelection",
    "classify_generated",
    "parse_quant_list",
    "select_units",
]

#: Quant schemes the AOT build knows, with the dtype keys their kernels use.
#: A key is ``tma:<A>,<B>,<Out>`` (SM90 TMA grouped GEMM), ``sm80:<A>`` (SM80
#: fused gated GEMM), ``mixed:<A>,<B>`` (SM90 mixed-input grouped GEMM) or
#: ``runner:<file stem>`` (a per-dtype runner source).
QUANT_SCHEMES: dict[str, frozenset[str]] = {
    "bf16": frozenset(
        {
            "tma:__nv_bfloat16,__nv_bfloat16,__nv_bfloat16",
            "sm80:cutlass::bfloat16_t",
            "runner:moe_gemm_kernels_bf16_bf16",
        }
    ),
    "fp16": frozenset({"tma:half,half,half", "sm80:cutlass::half_t", "runner:moe_gemm_kernels_fp16_fp16"}),
    "fp8": frozenset(
        {
            "tma:__nv_fp8_e4m3,__nv_fp8_e4m3,__nv_bfloat16",
            "tma:__nv_fp8_e4m3,__nv_fp8_e4m3,half",
            "runner:moe_gemm_kernels_fp8_fp8",
        }
    ),
    # DeepSeek-style 128x128 block scales: FlashInfer's SM90 path is the
    # DeepGEMM blockscale grouped GEMM (compiled by nvcc at first use of a shape),
    # reached through the runner typed bf16 activations x fp8 weights.
    "fp8_block": frozenset({"runner:fp8_blockscale_gemm", "runner:moe_gemm_kernels_bf16_fp8"}),
    # mxfp4 weights with bf16 activations (W4A16): the SM90 mixed-input
    # grouped GEMM (bf16 x e2m1 with e8m0 group scales).
    "mxfp4": frozenset({"mixed:__nv_bfloat16,SafeFP4", "runner:moe_gemm_kernels_bf16_fp4"}),
}

_RUNNER_RE = re.compile(r"^(moe_gemm_kernels_[a-z0-9]+_[a-z0-9]+|fp8_blockscale_gemm)$")
_TMA_RE = re.compile(
    r"INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM\(\s*Sm90\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,"
)
_SM80_RE = re.compile(r"sm80_generic_fused_moe_gemm_kernelLauncher\s*<\s*([^,>]+?)\s*,")
_MIXED_RE = re.compile(r"sm90_generic_mixed_moe_gemm_kernelLauncher\s*<\s*([^,>]+?)\s*,\s*([^,>]+?)\s*,")


def parse_quant_list(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"bf16,fp8"`` -> ``("bf16", "fp8")`` (sorted, unique); ValueError names unknown schemes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = sorted({s.strip() for s in items if s.strip()})
    unknown = [n for n in names if n not in QUANT_SCHEMES]
    if unknown or not names:
        raise ValueError(f"unknown quant scheme(s) {unknown or '(none)'}; known: {', '.join(QUANT_SCHEMES)}")
    return tuple(names)


def classify_generated(text: str) -> frozenset[str]:
    """The dtype keys a ``*.generated.cu`` file instantiates (empty: none we know)."""
    keys = {f"tma:{a},{b},{o}" for a, b, o in _TMA_RE.findall(text)}
    keys |= {f"sm80:{a}" for a in _SM80_RE.findall(text)}
    keys |= {f"mixed:{a},{b}" for a, b in _MIXED_RE.findall(text)}
    return frozenset(keys)


def source_keys(path: str, text: str | None) -> frozenset[str] | None:
    """Dtype keys of one source; ``None`` for a core source (always built)."""
    p = PurePath(path)
    if p.name.endswith(".generated.cu"):
        return classify_generated(text or "")
    stem = p.name.split(".")[0]
    if _RUNNER_RE.match(stem):
        return frozenset({f"runner:{stem}"})
    return None


@dataclass(frozen=True)
class UnitSelection:
    """The result of :func:`select_units`: sources to build and to leave out.

    ``by_scheme`` maps each requested scheme to the sources it alone pulls in
    (core sources are under ``"core"``), for per-scheme build times.
    """

    kept: tuple[str, ...]
    omitted: tuple[str, ...]
    by_scheme: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def select_units(sources: Mapping[str, str | None], quants: Iterable[str]) -> UnitSelection:
    """Split ``sources`` (path -> text, text needed for generated files) for ``quants``.

    Keeps core sources and every source with a key of a requested scheme,
    preserving the input order.
    """
    quants = parse_quant_list(quants)
    wanted = {q: QUANT_SCHEMES[q] for q in quants}
    kept: list[str] = []
    omitted: list[str] = []
    by_scheme: dict[str, list[str]] = {"core": [], **{q: [] for q in quants}}
    for path, text in sources.items():
        keys = source_keys(path, text)
        if keys is None:
            kept.append(path)
            by_scheme["core"].append(path)
            continue
        owners = [q for q, k in wanted.items() if keys & k]
        if owners:
            kept.append(path)
            by_scheme[owners[0]].append(path)
        else:
            omitted.append(path)
    return UnitSelection(tuple(kept), tuple(omitted), {k: tuple(v) for k, v in by_scheme.items()})
