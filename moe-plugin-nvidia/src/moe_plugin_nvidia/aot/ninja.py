"""Read FlashInfer's generated ``build.ninja`` and write a subset of it.

FlashInfer writes one ``build.ninja`` per JIT module: a header of variables
and rules, one ``build <obj>: cuda_compile|compile <src>`` statement per
source (possibly followed by indented per-build variables), and one link
statement. :func:`parse_ninja` splits it; :func:`render_subset` writes a file
that compiles only the chosen sources (same flags, same object paths, so
objects are shared between subsets), links a *probe* library without stubs and
a *final* library with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CompileEdge", "NinjaFile", "parse_ninja", "parse_ninja_log", "render_subset"]

_BUILD_RE = re.compile(r"^build (\S+): (\w+) (\S+)\s*$")


@dataclass(frozen=True)
class CompileEdge:
    """One compile statement: object, rule (``cuda_compile``/``compile``), source, extra lines."""

    obj: str
    rule: str
    src: str
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class NinjaFile:
    """A parsed FlashInfer ``build.ninja``: header text, compile edges, the link rule's name."""

    header: str
    edges: tuple[CompileEdge, ...]
    link_rule: str

    def edge_for(self, src: str) -> CompileEdge:
        for e in self.edges:
            if e.src == src:
                return e
        raise KeyError(src)


def parse_ninja(text: str) -> NinjaFile:
    """Split FlashInfer's ``build.ninja`` text; ValueError if it has no compile or link statement."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("build ")), None)
    if first is None:
        raise ValueError("build.ninja has no build statements")
    header = "\n".join(lines[:first]).rstrip() + "\n"
    edges: list[CompileEdge] = []
    link_rule = ""
    i = first
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("build "):
            continue
        extra: list[str] = []
        while i < len(lines) and lines[i].startswith("  "):
            extra.append(lines[i])
            i += 1
        m = _BUILD_RE.match(line)
        if m and m.group(2) in ("cuda_compile", "compile"):
            edges.append(CompileEdge(m.group(1), m.group(2), m.group(3), tuple(extra)))
        elif ":" in line:
            rule = (line.split(":", 1)[1].split() or [""])[0]
            if rule in ("link", "nvcc_link"):
                link_rule = rule
    if not edges or not link_rule:
        raise ValueError("build.ninja: expected compile statements and a link statement")
    return NinjaFile(header, tuple(edges), link_rule)


def render_subset(
    nf: NinjaFile,
    sources: Iterable[str],
    *,
    probe_so: str,
    final_so: str,
    stub_src: str,
    stub_obj: str,
    extra_ldflags: Iterable[str] = (),
) -> str:
    """A ``build.ninja`` compiling ``sources`` and linking ``probe_so`` and ``final_so``.

    ``probe_so`` links the kept objects only (undefined symbols allowed, read
    back to write ``stub_src``); ``final_so`` adds ``stub_obj`` compiled from
    ``stub_src``, with FlashInfer's own link flags. ``extra_ldflags`` go after FlashInfer's own.
    """
    if nf.link_rule != "link":
        raise ValueError(f"unsupported link rule {nf.link_rule!r} (expected FlashInfer's host link)")
    wanted = list(sources)
    edges = [nf.edge_for(s) for s in wanted]
    out = [nf.header.rstrip(), ""]
    out.append("moe_extra_ldflags = " + " ".join(extra_ldflags))
    out += ["", "rule moe_link", "  command = $cxx $in $ldflags $moe_extra_ldflags -o $out", ""]
    for e in edges:
        out.append(f"build {e.obj}: {e.rule} {e.src}")
        out.extend(e.extra)
    objs = " ".join(e.obj for e in edges)
    out.append(f"build {stub_obj}: compile {stub_src}")
    out.append(f"build {probe_so}: moe_link {objs}")
    out.append(f"build {final_so}: moe_link {objs} {stub_obj}")
    out.append(f"default {probe_so}")
    out.append("")
    return "\n".join(out)


def parse_ninja_log(text: str) -> dict[str, float]:
    """``.ninja_log`` (v5) -> output path -> seconds of its last build."""
    times: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) >= 4 and parts[0].isdigit() and parts[1].isdigit():
            times[parts[3]] = (int(parts[1]) - int(parts[0])) / 1000.0
    return times
