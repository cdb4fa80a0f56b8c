"""moe_plugin_nvidia.aot.build / manifest / flashinfer_env: header lookup, install, what is prebuilt."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="mxfp4"):
        build.build_module("9.0a", "mxfp4", output=tmp_path)
