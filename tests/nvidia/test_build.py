"""moe_plugin_nvidia.aot.build / manifest / flashinfer_env: header lookup, install, what is prebuilt."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_plugin_nvidia import flashinfer_env
from moe_plugin_nvidia.aot import build
from moe_plugin_nvidia.aot.manifest import Manifest, read_manifest, write_manifest


def _toolkit(tmp_path, headers=()):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("")
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    for h in headers:
        (home / "include" / h).write_text("")
    return home


def test_find_cuda_home_reads_wrapper_scripts(tmp_path, monkeypatch):
    home = _toolkit(tmp_path)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert build.find_cuda_home() == home
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert build.find_cuda_home() == home


def test_extra_includes_from_flag_or_wheels(tmp_path, monkeypatch):
    home = _toolkit(tmp_path, headers=("nvrtc.h",))
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.setattr(build, "_wheel_include_dirs", lambda: [])
    with pytest.raises(build.BuildError, match=r"cublasLt\.h"):
        build.find_extra_includes(home)
    (extra / "cublasLt.h").write_text("")
    (extra / "curand_kernel.h").write_text("")
    assert build.find_extra_includes(home, [extra]) == [extra]
    monkeypatch.setattr(build, "_wheel_include_dirs", lambda: [extra])
    assert build.find_extra_includes(home) == [extra]
    # a relative --cuda-include comes back absolute (ninja compiles from its own folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "_wheel_include_dirs", lambda: [])
    assert build.find_extra_includes(home, [Path("extra")]) == [extra]


def test_install_puts_library_and_manifest_in_the_aot_slot(tmp_path):
    lib_dir = tmp_path / "out"
    lib_dir.mkdir()
    lib = lib_dir / "fused_moe_90.so"
    lib.write_bytes(b"\x7fELF")
    write_manifest(lib_dir, Manifest("fused_moe_90", "9.0a", ["bf16"], "0.7.2", units=31))
    fi = tmp_path / "site" / "flashinfer"
    fi.mkdir(parents=True)
    dst = build.install_module(lib, fi, echo=lambda s: None)
    assert dst == fi / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so" and dst.read_bytes() == b"\x7fELF"
    m = read_manifest(dst.parent)
    assert m is not None and m.quants == ["bf16"] and m.units == 31


def test_prebuilt_module_finds_the_slot_and_its_manifest(tmp_path, monkeypatch):
    fi = tmp_path / "flashinfer"
    monkeypatch.setattr(flashinfer_env, "flashinfer_dir", lambda: fi)
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path / "ws"))
    assert flashinfer_env.prebuilt_module("fused_moe_90") is None
    slot = fi / "data" / "aot" / "fused_moe_90"
    slot.mkdir(parents=True)
    (slot / "fused_moe_90.so").write_bytes(b"")
    found = flashinfer_env.prebuilt_module("fused_moe_90")
    assert (
        found.source == "aot" and found.manifest is None and found.has_quant("fp8")
    )  # FlashInfer's own build
    write_manifest(slot, Manifest("fused_moe_90", "9.0a", ["bf16"], "0.7.2"))
    found = flashinfer_env.prebuilt_module("fused_moe_90")
    assert found.has_quant("bf16") and not found.has_quant("fp8")


def test_version_tuple():
    assert flashinfer_env.version_tuple("0.7.2.post1") == (0, 7, 2)
    assert flashinfer_env.version_tuple("0.10.0rc1+cu130") == (0, 10, 0)
    assert flashinfer_env.version_tuple(None) == ()


def test_build_refuses_unknown_arch_and_scheme(tmp_path):
    with pytest.raises(build.BuildError, match="arch"):
        build.build_module("8.0", ["bf16"], output=tmp_path)
    with pytest.raises(ValueError, match="int8"):
        build.build_module("9.0a", "int8", output=tmp_path)


FAKE_NINJA = """ninja_required_version = 1.3
cxx = c++
cflags = -fPIC -std=c++17
ldflags = -shared -L{home}/lib64 -lcuda

rule compile
  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out
  depfile = $out.d
  deps = gcc

rule link
  command = $cxx $in $ldflags -o $out

build {obj}/core.o: compile {src}/core.cpp
build {obj}/bf16.o: compile {src}/moe_gemm_kernels_bf16_bf16.cpp
build {obj}/fp8.o: compile {src}/moe_gemm_kernels_fp8_fp8.cpp
build {obj}/fp16.o: compile {src}/moe_gemm_kernels_fp16_fp16.cpp

build {obj}/fused_moe_90.so: link {obj}/core.o {obj}/bf16.o {obj}/fp8.o {obj}/fp16.o
default {obj}/fused_moe_90.so
"""
CORE = """namespace tensorrt_llm { int bf16_gemm(int); int fp8_gemm(int); }
extern "C" int cuInit(unsigned);
extern "C" int run(int fp8) { cuInit(0); return fp8 ? tensorrt_llm::fp8_gemm(1) : tensorrt_llm::bf16_gemm(1); }
"""


@pytest.mark.skipif(
    not (shutil.which("ninja") and shutil.which("c++") and shutil.which("nm")), reason="needs ninja"
)
def test_build_module_end_to_end_with_a_fake_flashinfer(tmp_path, monkeypatch):
    """The whole driver on a tiny FlashInfer-shaped project: subset, link stand-in for libcuda,
    probe link, stubs for the omitted fp8 symbol (throwing), final link, manifest, install."""
    home = _toolkit(tmp_path)
    src, obj, fi = tmp_path / "src", tmp_path / "obj", tmp_path / "site" / "flashinfer"
    src.mkdir(), obj.mkdir(), fi.mkdir(parents=True)
    (src / "core.cpp").write_text(CORE)
    (src / "moe_gemm_kernels_bf16_bf16.cpp").write_text(
        "namespace tensorrt_llm { int bf16_gemm(int x) { return x + 41; } }\n"
    )
    (src / "moe_gemm_kernels_fp8_fp8.cpp").write_text("#error fp8 must not be compiled for --quant bf16\n")
    (src / "moe_gemm_kernels_fp16_fp16.cpp").write_text(
        "namespace tensorrt_llm { int fp16_gemm(int x) { return x; } }\n"
    )
    (obj / "build.ninja").write_text(FAKE_NINJA.format(home=home, obj=obj, src=src))
    names = (
        "core.cpp",
        "moe_gemm_kernels_bf16_bf16.cpp",
        "moe_gemm_kernels_fp8_fp8.cpp",
        "moe_gemm_kernels_fp16_fp16.cpp",
    )
    sources = [str(src / n) for n in names]
    info = {
        "name": "fused_moe_90",
        "ninja": str(obj / "build.ninja"),
        "sources": sources,
        "flashinfer_version": "0.7.2",
        "flashinfer_dir": str(fi),
    }
    monkeypatch.setattr(build, "_generate", lambda *a: info)
    monkeypatch.setattr(build, "find_cuda_home", lambda: home)
    monkeypatch.setattr(build, "nvcc_version", lambda h: "13.0")
    monkeypatch.setattr(build, "find_extra_includes", lambda h, extra=(): [])
    seen = []
    res = build.build_module(
        "9.0a",
        "bf16",
        output=tmp_path / "out",
        jobs=2,
        progress=lambda *a: seen.append(a),
        echo=lambda s: None,
    )
    assert res.manifest.quants == ["bf16"] and res.manifest.units == 2 and res.manifest.omitted == 2
    assert res.manifest.stubs == 1 and set(res.manifest.seconds) == {"wall", "core", "bf16"}
    assert res.installed == fi / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so"
    assert read_manifest(res.installed.parent).quants == ["bf16"]
    assert seen and seen[-1][1] == seen[-1][2]  # progress reached its total
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", str(res.library)], capture_output=True, text=True
    ).stdout
    assert "_ZN12tensorrt_llm8fp8_gemmEi" in nm  # the stub
    assert "moe nvidia build" in (res.library.parent / "moe_stubs.cpp").read_text()
    assert not (res.library.parent / "fused_moe_90.probe.so").exists()
    # A second subset reuses the first one's objects (one .ninja_log for every subset).
    before = {p.name: p.stat().st_mtime_ns for p in obj.glob("*.o")}
    more = build.build_module(
        "9.0a", "bf16,fp16", output=tmp_path / "out", jobs=2, install=False, echo=lambda s: None
    )
    after = {p.name: p.stat().st_mtime_ns for p in obj.glob("*.o")}
    assert after["core.o"] == before["core.o"] and after["bf16.o"] == before["bf16.o"] and "fp16.o" in after
    assert more.manifest.units == 3 and more.library != res.library and more.installed is None
    # The same build again (a fresh environment): reused and installed, nothing generated or
    # compiled, unless FlashInfer's version changed or force is given.
    monkeypatch.setattr(build, "_installed_flashinfer", lambda: ("0.7.2", fi))

    def no_generate(*a):
        raise AssertionError("generated again")

    monkeypatch.setattr(build, "_generate", no_generate)
    (fi / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so").unlink()
    again = build.build_module("9.0a", "bf16", output=tmp_path / "out", echo=lambda s: None)
    assert again.library == res.library and again.manifest == res.manifest
    assert again.installed == res.installed and again.installed.exists()
    for kwargs, version in (({"force": True}, "0.7.2"), ({}, "0.7.3")):
        monkeypatch.setattr(build, "_installed_flashinfer", lambda v=version: (v, fi))
        with pytest.raises(AssertionError, match="generated again"):
            build.build_module("9.0a", "bf16", output=tmp_path / "out", echo=lambda s: None, **kwargs)


def test_installed_flashinfer_is_found_without_importing_it():
    found = build._installed_flashinfer()
    if importlib.util.find_spec("flashinfer") is None:
        assert found is None
    else:
        assert found[0] == importlib.metadata.version("flashinfer-python")
        assert (found[1] / "__init__.py").exists()
