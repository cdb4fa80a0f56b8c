"""moe_plugin_nvidia.aot.stubs: throwing stand-ins for the omitted dtypes' symbols."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from moe_plugin_nvidia.aot.stubs import MISSING_PREFIX, link_stub_source, needs_stub, stub_source

SYM = "_ZN12tensorrt_llm7kernels15cutlass_kernels12MoeGemmRunnerIfffvE3runEv"
DEM = "tensorrt_llm::kernels::cutlass_kernels::MoeGemmRunner<float, float, float, void>::run()"


def test_needs_stub_only_for_flashinfer_code():
    assert needs_stub(SYM, DEM)
    assert not needs_stub("cudaMalloc", "cudaMalloc")
    assert not needs_stub("_ZNSt6vectorIiSaIiEE9push_backEv", "std::vector<int>::push_back()")
    assert not needs_stub("_ZN12tensorrt_llm3foo@GLIBC", "tensorrt_llm::foo")  # not an identifier


def test_stub_source_throws_with_the_rebuild_hint():
    src = stub_source({SYM: DEM}, 'rebuild with "moe nvidia build"')
    assert f'void {SYM}() {{ moe_missing("{DEM}"); }}' in src
    assert MISSING_PREFIX in src and '\\"moe nvidia build\\"' in src
    with pytest.raises(ValueError, match="data symbols"):
        stub_source({"_ZTVN12tensorrt_llm1AE": "vtable for tensorrt_llm::A"}, "")


@pytest.mark.skipif(shutil.which("c++") is None or shutil.which("nm") is None, reason="needs c++ and nm")
def test_stub_source_compiles_to_the_mangled_names(tmp_path):
    src = tmp_path / "s.cpp"
    src.write_text(stub_source({SYM: DEM}, "hint"))
    obj = tmp_path / "s.o"
    subprocess.run(["c++", "-std=c++17", "-fPIC", "-c", str(src), "-o", str(obj)], check=True)
    defined = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    assert f" T {SYM}" in defined


def test_link_stub_source():
    src = link_stub_source(["cuLaunchKernel", "cuLaunchKernel", "nvrtcCompileProgram", "bad name"])
    assert (
        src.count("void cuLaunchKernel(void) {}") == 1 and "nvrtcCompileProgram" in src and "bad" not in src
    )
