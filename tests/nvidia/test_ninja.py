"""moe_plugin_nvidia.aot.ninja: FlashInfer's build.ninja read and rewritten for a subset."""

from __future__ import annotations

import pytest

from moe_plugin_nvidia.aot.ninja import parse_ninja, parse_ninja_log, render_subset

NINJA = """ninja_required_version = 1.3
name = fused_moe_90
cuda_cflags = -O3 $
    -DX
ldflags = -shared -lcudart

rule compile
  command = $cxx -c $in -o $out

rule cuda_compile
  command = $nvcc -c $in -o $out

rule link
  command = $cxx $in $ldflags -o $out

build /o/a.cuda.o: cuda_compile /s/a.cu
build /o/b.cuda.o: cuda_compile /s/b.cu
  cuda_cflags = -O0
build /o/c.o: compile /s/c.cpp

build /o/fused_moe_90.so: link /o/a.cuda.o /o/b.cuda.o /o/c.o
default /o/fused_moe_90.so
"""


def test_parse_splits_header_edges_and_link():
    nf = parse_ninja(NINJA)
    assert [e.src for e in nf.edges] == ["/s/a.cu", "/s/b.cu", "/s/c.cpp"]
    assert nf.edge_for("/s/b.cu").extra == ("  cuda_cflags = -O0",)
    assert nf.edge_for("/s/c.cpp").rule == "compile"
    assert nf.link_rule == "link"
    assert "rule cuda_compile" in nf.header and "build " not in nf.header
    with pytest.raises(KeyError):
        nf.edge_for("/s/missing.cu")


def test_render_subset_keeps_flags_and_links_probe_and_final():
    nf = parse_ninja(NINJA)
    text = render_subset(
        nf,
        ["/s/b.cu", "/s/c.cpp"],
        probe_so="/p.so",
        final_so="/f.so",
        stub_src="/st.cpp",
        stub_obj="/st.o",
        extra_ldflags=["-L/x"],
    )
    assert "build /o/a.cuda.o" not in text
    assert "build /o/b.cuda.o: cuda_compile /s/b.cu\n  cuda_cflags = -O0" in text
    assert "build /p.so: moe_link /o/b.cuda.o /o/c.o\n" in text
    assert "build /f.so: moe_link /o/b.cuda.o /o/c.o /st.o" in text
    assert "build /st.o: compile /st.cpp" in text
    assert "moe_extra_ldflags = -L/x" in text
    assert text.startswith("ninja_required_version = 1.3")


def test_parse_rejects_files_without_edges():
    with pytest.raises(ValueError):
        parse_ninja("rule x\n  command = true\n")
    with pytest.raises(ValueError):
        parse_ninja("build /o/a.o: compile /s/a.cpp\n")  # no link statement


def test_ninja_log_durations():
    log = "# ninja log v5\n0\t1500\t0\t/o/a.cuda.o\tabc\n100\t350\t0\t/o/c.o\tdef\nbad line\n"
    assert parse_ninja_log(log) == {"/o/a.cuda.o": 1.5, "/o/c.o": 0.25}
