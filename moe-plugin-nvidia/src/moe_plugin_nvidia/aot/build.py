"""Driver of ``moe nvidia build``: generate, select, compile, stub, link, install.

Steps (each a function, the whole in :func:`build_module`):

1. FlashInfer generates its sources and ``build.ninja`` in a subprocess
   (:mod:`._gen`) with ``FLASHINFER_CUDA_ARCH_LIST=<arch>`` and
   ``FLASHINFER_WORKSPACE_BASE=<output>/workspace`` (no GPU needed);
2. :func:`.units.select_units` keeps the units of the requested schemes;
3. ninja compiles them (FlashInfer's flags and object paths, so a later build
   with more schemes reuses the objects) and links a probe library;
4. the probe's undefined ``tensorrt_llm::`` symbols get throwing stubs
   (:mod:`.stubs`); the final library is linked with them;
5. the library and its manifest are copied to FlashInfer's AOT slot
   (``<flashinfer>/data/aot/fused_moe_90/``), where FlashInfer loads it
   without compiling.

The output folder defaults to ``$MOE_NVIDIA_BUILD_DIR`` or
``~/.cache/moe-kernels/nvidia``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_core import MoEError

from .manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest
from .ninja import parse_ninja, parse_ninja_log, render_subset
from .stubs import link_stub_source, needs_stub, stub_source
from .units import parse_quant_list, select_units

__all__ = ["BuildResult", "build_module", "default_output_dir", "install_module"]

MODULES = {"9.0a": "fused_moe_90"}

Progress = Callable[[str, int, int], None]


class BuildError(MoEError):
    """The AOT build could not run or failed (the message says which step and where the log is)."""


@dataclass(frozen=True)
class BuildResult:
    """Where the built module is, where it was installed (``None``: not installed), its manifest."""

    library: Path
    installed: Path | None
    manifest: Manifest
    log: Path


def default_output_dir() -> Path:
    """``$MOE_NVIDIA_BUILD_DIR``, else ``~/.cache/moe-kernels/nvidia``."""
    env = os.environ.get("MOE_NVIDIA_BUILD_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moe-kernels" / "nvidia"


def find_cuda_home() -> Path:
    """The CUDA toolkit: ``CUDA_HOME``/``CUDA_PATH``, the ``nvcc`` on PATH, ``/usr/local/cuda``.

    A candidate counts when it has ``bin/nvcc`` and ``include/cuda_runtime.h``
    (``/usr/local/bin/nvcc`` may be a wrapper script). BuildError without one.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # a wrapper script: `exec /path/to/nvcc "$@"`
            m = re.search(r"(/\S+)/bin/nvcc", Path(nvcc).read_text(errors="ignore")[:4096])
            cands.append(m.group(1) if m else None)
        except OSError:
            pass
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise BuildError(
        "CUDA toolkit not found (nvcc + include/cuda_runtime.h): install CUDA 12.8+ or set CUDA_HOME"
    )


#: Headers FlashInfer's fused-MoE sources include beyond the CUDA runtime.
NEEDED_HEADERS = ("cublasLt.h", "nvrtc.h", "curand_kernel.h")


def _wheel_include_dirs() -> list[Path]:
    """``include`` folders of installed ``nvidia-*`` wheels (``nvidia/<pkg>/include``)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(p for r in roots for p in Path(r).glob("*/include") if p.is_dir())


def find_extra_includes(cuda_home: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """Folders to add so that every header of :data:`NEEDED_HEADERS` is found.

    Looks in ``extra`` (``--cuda-include``, ``$MOE_NVIDIA_CUDA_INCLUDE``, a
    ``:``-list), then in installed ``nvidia-*`` wheels; BuildError naming the
    wheels to install when a header is nowhere.
    """
    env = [Path(p) for p in os.environ.get("MOE_NVIDIA_CUDA_INCLUDE", "").split(":") if p]
    # absolute: ninja runs the compilers from its own build folder
    search = [Path(p).resolve() for p in [*extra, *env]] + _wheel_include_dirs()
    out: list[Path] = []
    missing = []
    for h in NEEDED_HEADERS:
        if (cuda_home / "include" / h).exists() or any((d / h).exists() for d in out):
            continue
        hit = next((d for d in search if (d / h).exists()), None)
        if hit is None:
            missing.append(h)
        else:
            out.append(hit)
    if missing:
        raise BuildError(
            f"CUDA headers {missing} are not in {cuda_home}/include: install the toolkit's cuBLAS/NVRTC/cuRAND "
            "development files, or `pip install nvidia-cublas nvidia-cuda-nvrtc nvidia-curand` (their include folders "
            "are found automatically), or pass --cuda-include DIR"
        )
    return out


def nvcc_version(cuda_home: Path) -> str:
    out = subprocess.run(
        [str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _generate(
    module: str, arch: str, workspace: Path, cuda_home: Path, includes: Sequence[Path], log
) -> dict:
    env = dict(os.environ)
    inc = " ".join(f"-isystem {p}" for p in includes)
    env.update(
        FLASHINFER_CUDA_ARCH_LIST=arch,
        FLASHINFER_WORKSPACE_BASE=str(workspace),
        CUDA_HOME=str(cuda_home),
        FLASHINFER_LOGGING_LEVEL="warning",
        FLASHINFER_EXTRA_CUDAFLAGS=(os.environ.get("FLASHINFER_EXTRA_CUDAFLAGS", "") + " " + inc).strip(),
        FLASHINFER_EXTRA_CFLAGS=(os.environ.get("FLASHINFER_EXTRA_CFLAGS", "") + " " + inc).strip(),
    )
    cmd = [sys.executable, "-m", "moe_plugin_nvidia.aot._gen", module]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise BuildError("FlashInfer could not generate the module sources:\n  " + "\n  ".join(tail))
    return json.loads(p.stdout.strip().splitlines()[-1])


def _run_ninja(
    build_dir: Path, ninja_file: Path, target: str, jobs: int, progress: Progress, log, nice: int
) -> None:
    """``ninja -C build_dir -f ninja_file target``; ``build_dir`` holds the one ``.ninja_log`` of all
    subsets, so an object compiled for one set of schemes is up to date for the next."""
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    cmd = ["ninja", "-C", str(build_dir), "-f", str(ninja_file), "-j", str(jobs), target]

    def lower() -> None:  # pragma: no cover - runs in the child
        if nice:
            os.nice(nice)

    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=lower
    )
    status = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        m = status.match(line)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            name = m.group(3).split()[-1].rsplit("/", 1)[-1] if m.group(3) else ""
            progress(name[:60], done, total)
    log.flush()
    if proc.wait() != 0:
        raise BuildError(f"ninja failed (target {Path(target).name}); see {log.name}")


def _undefined_symbols(lib: Path) -> dict[str, str]:
    nm = subprocess.run(
        ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
    )
    names = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
    names = [n.split("@")[0] for n in names]
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, dem.stdout.splitlines(), strict=False))


def _objects_undefined(objs: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for chunk in range(0, len(objs), 50):
        nm = subprocess.run(
            ["nm", "--undefined-only", *objs[chunk : chunk + 50]], capture_output=True, text=True
        )
        out |= {line.split()[-1] for line in nm.stdout.splitlines() if line.strip().startswith("U ")}
    return out


def _link_standins(cuda_home: Path, objs: Sequence[str], folder: Path, cuda_major: str, log) -> list[str]:
    """``-L`` flags for link-time stand-ins of ``libcuda``/``libnvrtc`` when the toolkit lacks them."""
    lib_dirs = [cuda_home / "lib64", cuda_home / "lib64" / "stubs", cuda_home / "lib"]
    wanted = {"cuda": ("libcuda.so.1", "cu"), "nvrtc": (f"libnvrtc.so.{cuda_major}", "nvrtc")}
    missing = {k: v for k, v in wanted.items() if not any((d / f"lib{k}.so").exists() for d in lib_dirs)}
    if not missing:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    undefined = _objects_undefined(objs)
    for lib, (soname, prefix) in missing.items():
        names = [n for n in undefined if n.startswith(prefix) and not n.startswith("cuda")]
        src = folder / f"{lib}_standin.c"
        src.write_text(link_stub_source(names))
        cmd = [
            "cc",
            "-shared",
            "-fPIC",
            f"-Wl,-soname,{soname}",
            str(src),
            "-o",
            str(folder / f"lib{lib}.so"),
        ]
        log.write(f"$ {' '.join(cmd)}\n")
        subprocess.run(cmd, check=True)
    return [f"-L{folder}"]


def build_module(
    arch: str = "9.0a",
    quants: Sequence[str] | str = ("bf16",),
    *,
    output: Path | None = None,
    jobs: int | None = None,
    nice: int = 0,
    install: bool = True,
    progress: Progress | None = None,
    cuda_include: Sequence[Path] = (),
    echo: Callable[[str], None] = print,
    force: bool = False,
) -> BuildResult:
    """Build FlashInfer's fused-MoE module for ``arch`` with only ``quants``' kernels.

    ``output`` holds FlashInfer's workspace (generated sources, objects,
    reused by later builds) and ``<module>/<arch>-<schemes>/<module>.so``.
    ``install`` copies the library and ``moe_build.json`` into FlashInfer's
    AOT slot (replacing what is there). ``progress(unit, done, total)`` is
    called as ninja finishes units. ``cuda_include``: extra header folders
    (see :func:`find_extra_includes`). A library already built in ``output``
    for the same arch, schemes, nvcc and installed FlashInfer version is
    reused (installed, not compiled again: a fresh environment's FlashInfer
    headers are newer files, which would make ninja recompile every unit)
    unless ``force``. Raises BuildError (the log path in its message) on
    failure.
    """
    if arch not in MODULES:
        raise BuildError(f"arch {arch!r} is not supported (supported: {', '.join(MODULES)})")
    quants = parse_quant_list(quants)
    module = MODULES[arch]
    output = Path(output or default_output_dir()).resolve()
    key = f"sm{arch.replace('.', '')}-" + "+".join(quants)
    out_dir = output / module / key
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, os.cpu_count() or 1)
    progress = progress or (lambda *_: None)
    log_path = out_dir / "build.log"
    cuda_home = find_cuda_home()
    nvcc = nvcc_version(cuda_home)
    includes = find_extra_includes(cuda_home, cuda_include)
    final = out_dir / f"{module}.so"
    installed_fi = _installed_flashinfer()
    prior = read_manifest(out_dir) if final.exists() and not force else None
    if (
        prior is not None
        and installed_fi is not None
        and (prior.arch, prior.quants, prior.nvcc, prior.flashinfer_version)
        == (arch, list(quants), nvcc, installed_fi[0])
    ):
        echo(f"reusing {final} (built {prior.built_at}; --force rebuilds)")
        installed = install_module(final, installed_fi[1], echo=echo) if install else None
        return BuildResult(final, installed, prior, log_path)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        echo(f"generating FlashInfer's {module} sources (arch {arch}, nvcc {nvcc} at {cuda_home})")
        info = _generate(module, arch, output / "workspace", cuda_home, includes, log)
        nf = parse_ninja(Path(info["ninja"]).read_text())
        texts = {s: (Path(s).read_text() if s.endswith(".generated.cu") else None) for s in info["sources"]}
        sel = select_units(texts, quants)
        objs = [nf.edge_for(s).obj for s in sel.kept]
        probe = out_dir / f"{module}.probe.so"
        stub_src = out_dir / "moe_stubs.cpp"
        stub_obj = out_dir / "moe_stubs.o"
        if not stub_src.exists():
            stub_src.write_text("// placeholder, rewritten after the probe link\n")
        ninja_dir = output / module / "ninja"  # shared by every subset: one .ninja_log
        ninja_dir.mkdir(parents=True, exist_ok=True)
        ninja_path = ninja_dir / f"build-{key}.ninja"

        def write(extra_ld: list[str]) -> None:
            ninja_path.write_text(
                render_subset(
                    nf,
                    sel.kept,
                    probe_so=str(probe),
                    final_so=str(final),
                    stub_src=str(stub_src),
                    stub_obj=str(stub_obj),
                    extra_ldflags=extra_ld,
                )
            )

        write([])
        n_todo = len(sel.kept)
        echo(
            f"building {n_todo} of {len(info['sources'])} units for {','.join(quants)} "
            f"with {jobs} jobs into {out_dir}"
        )
        # Compile every object first (the link stand-ins need their undefined symbols).
        _run_objects(ninja_dir, ninja_path, objs, jobs, progress, log, nice)
        extra_ld = _link_standins(cuda_home, objs, out_dir / "link-standins", nvcc.split(".")[0], log)
        write(extra_ld)
        _run_ninja(ninja_dir, ninja_path, str(probe), jobs, progress, log, nice)
        undefined = _undefined_symbols(probe)
        stubs = {m: d for m, d in undefined.items() if needs_stub(m, d)}
        hint = f"rebuild with `moe nvidia build --arch {arch} --quant <schemes>` (built: {','.join(quants)})"
        new_src = stub_source(stubs, hint)
        if not stub_src.exists() or stub_src.read_text() != new_src:
            stub_src.write_text(new_src)
        _run_ninja(ninja_dir, ninja_path, str(final), jobs, progress, log, nice)
        left = {m: d for m, d in _undefined_symbols(final).items() if needs_stub(m, d)}
        if left:
            raise BuildError(
                f"{len(left)} symbols still undefined after stubbing, e.g. {next(iter(left.values()))}"
            )
        wall = time.monotonic() - t0
        ninja_log = ninja_dir / ".ninja_log"
        times = parse_ninja_log(ninja_log.read_text()) if ninja_log.exists() else {}
        obj_of = {s: nf.edge_for(s).obj for s in sel.kept}
        seconds = {"wall": round(wall, 1)}
        for scheme, srcs in sel.by_scheme.items():
            seconds[scheme] = round(sum(times.get(obj_of[s], 0.0) for s in srcs), 1)
        manifest = Manifest(
            module=module,
            arch=arch,
            quants=list(quants),
            flashinfer_version=info["flashinfer_version"],
            units=len(sel.kept),
            omitted=len(sel.omitted),
            stubs=len(stubs),
            seconds=seconds,
            jobs=jobs,
            nvcc=nvcc,
            built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        write_manifest(out_dir, manifest)
        probe.unlink(missing_ok=True)
    installed = install_module(final, Path(info["flashinfer_dir"]), echo=echo) if install else None
    return BuildResult(final, installed, manifest, log_path)


def _installed_flashinfer() -> tuple[str, Path] | None:
    """(version, package folder) of the installed flashinfer-python, found without importing it."""
    from importlib import metadata, util

    try:
        spec = util.find_spec("flashinfer")
        if spec is None or not spec.submodule_search_locations:
            return None
        return metadata.version("flashinfer-python"), Path(next(iter(spec.submodule_search_locations)))
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None


def _run_objects(
    ninja_dir: Path, ninja_path: Path, objs: Sequence[str], jobs: int, progress: Progress, log, nice: int
) -> None:
    # ninja accepts several targets; pass them through a phony target to keep the command line short.
    text = ninja_path.read_text()
    if "build moe_objects: phony" not in text:
        text = text.replace("\ndefault ", "\nbuild moe_objects: phony " + " ".join(objs) + "\ndefault ", 1)
        ninja_path.write_text(text)
    _run_ninja(ninja_dir, ninja_path, "moe_objects", jobs, progress, log, nice)


def install_module(library: Path, flashinfer_dir: Path, echo: Callable[[str], None] = print) -> Path:
    """Copy ``library`` and its ``moe_build.json`` into FlashInfer's AOT slot; returns the installed path."""
    module = library.stem
    slot = flashinfer_dir / "data" / "aot" / module
    try:
        slot.mkdir(parents=True, exist_ok=True)
        dst = slot / library.name
        tmp = slot / (library.name + ".tmp")
        shutil.copy2(library, tmp)
        os.replace(tmp, dst)
        manifest = library.parent / MANIFEST_NAME
        if manifest.exists():
            shutil.copy2(manifest, slot / MANIFEST_NAME)
    except OSError as e:
        raise BuildError(
            f"cannot write FlashInfer's AOT slot {slot} ({e}); copy {library} and "
            f"{library.parent / MANIFEST_NAME} there yourself, or rerun with --no-install"
        ) from e
    echo(f"installed {dst}")
    return dst
