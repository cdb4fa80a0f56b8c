"""Run the benchmark cases: every experts kernel that supports a case, checked and timed, and the peers.

A case is (model preset, activation dtype, quant scheme, token count T). For each:

1. the layer's floor (:mod:`.floors`) from the ceilings measured in the same run;
2. ``copies`` sets of random canonical weights and inputs (on a GPU enough copies
   to exceed the L2 cache, so that rotating through them does not flatter), routed
   by the preset's router on random logits *without* a correction bias
   (:func:`uniform_routing`), and the float64 reference output for the first set;
3. every registered experts kernel that supports the spec on this device (registry
   candidates with no refusal reason, narrowed by ``kernels=``), planned with
   ``moe_plan(spec, device, backend=name)``: prepared, checked once against the
   reference (``relative_error``, ``passed``), then timed (:mod:`.timing`: CUDA events
   with iterations queued, plus CUDA-graph replay for T <= 128; ``perf_counter`` on
   the CPU). A kernel that raises or is wrong is recorded as such; the run goes on;
4. each peer (:mod:`.peers`) that runs the spec, checked and timed the same way.

:func:`run_bench` returns the report (see :mod:`.report` for its fields).
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import torch

from ..device import device_info
from ..planner import MoEPlan, moe_apply, moe_plan
from ..presets import PRESETS, ModelPreset, get_preset
from ..reference import fused_experts_reference
from ..registry import get_registry
from ..routing import RoutingSpec, select_experts
from ..spec import QUANT_SCHEMES, MoESpec
from ..testing import random_expert_weights, random_logits, relative_error, tolerance
from .floors import L2_FLUSH_BYTES, measure_ceilings, preset_floor_us
from .peers import Peer, make_peers
from .timing import graph_times, median_us, rotating

__all__ = [
    "DTYPES",
    "GRAPH_MAX_T",
    "QUICK_TOKENS",
    "SHAPES",
    "TOKENS",
    "BenchConfig",
    "default_models",
    "quick_models",
    "run_bench",
    "run_case",
    "uniform_routing",
]

#: the model shapes of ../shared/BENCHMARKS.md (the default on a GPU)
SHAPES = [
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b-tp8",
    "deepseek-v3-tp8",
    "gpt-oss-120b",
    "gpt-oss-20b",
]
TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
QUICK_TOKENS = [1, 32, 512, 4096]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: decode cases (T up to this) are also timed from CUDA graphs, as engines run them
GRAPH_MAX_T = 128

Progress = Callable[[str, int, int], None]


@dataclass
class BenchConfig:
    """What to run. ``quants`` entries are scheme names or full schemes (``QuantScheme.parse``), ``None``
    meaning unquantized in the dtype;
    ``kernels`` narrows the experts kernels by name or dotted prefix (``None``: all)."""

    models: list[str]
    tokens: list[int]
    dtypes: list[torch.dtype] = field(default_factory=lambda: [torch.bfloat16])
    quants: list[str | None] = field(default_factory=lambda: [None])
    kernels: list[str] | None = None
    iters: int = 30
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    vllm_peer: str | None = None
    peers: bool = True
    warmup: int = 5
    seed: int = 0
    #: measured on the device when ``None``
    ceilings: dict[str, float] | None = None
    quick: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["dtypes"] = [str(d).removeprefix("torch.") for d in self.dtypes]
        out["device"] = str(self.device)
        out.pop("ceilings")
        return out


def default_models(device: torch.device | str) -> list[str]:
    """BENCHMARKS.md's shapes on a GPU; the ``tiny-*`` presets on the CPU (big layers would take forever)."""
    if torch.device(device).type == "cuda":
        return list(SHAPES)
    return sorted(name for name in PRESETS if name.startswith("tiny-"))


def _layer_size(preset: ModelPreset) -> int:
    experts = preset.num_experts + preset.routing.num_fused_shared_experts
    return experts * 3 * preset.hidden_size * preset.intermediate_size


def quick_models(models: Sequence[str], count: int = 3) -> list[str]:
    """The ``count`` smallest layers (by weight count) of ``models``, in their given order."""
    smallest = set(sorted(models, key=lambda m: _layer_size(get_preset(m)))[:count])
    return [m for m in models if m in smallest]


def uniform_routing(
    routing: RoutingSpec, tokens: int, num_experts: int, *, device: torch.device | str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's routing on random logits, without a correction bias: uniform expert load.

    (A random correction bias, as ``moe_core.testing.random_routing`` draws for tests, makes
    DeepSeek's grouped routing pick about 40% fewer distinct experts than the uniform load
    that BENCHMARKS.md's floors assume.)
    """
    logits = random_logits(tokens, num_experts, device=device, seed=seed)
    return select_experts(logits, routing)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(name == p or name.startswith(p + ".") for p in patterns)


def select_kernels(
    spec: MoESpec, device: torch.device, patterns: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """Names of the experts kernels (matching ``patterns``) that run ``spec`` here, and the others' reasons."""
    info = device_info(device)
    usable, refused = [], {}
    for cand in get_registry().candidates("experts", "experts", spec, info):
        if not _matches(cand.name, patterns):
            continue
        if cand.reason is None:
            usable.append(cand.name)
        else:
            refused[cand.name] = cand.reason
    return usable, refused


def _error(exc: BaseException, limit: int = 500) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


def _graph_blocker(fn: Callable[[int], object]) -> str | None:
    """Why ``fn`` cannot be captured in a CUDA graph (it synchronises with the host), or ``None``."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(0)
    except RuntimeError as exc:
        return "synchronises with the host: " + _error(exc, 200)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
    return None


def _time_into(
    result: dict,
    fn: Callable[[int], object],
    copies: int,
    iters: int,
    device: torch.device,
    graphs: bool,
    warmup: int,
) -> None:
    """Time ``fn(i)`` (input set ``i`` of ``copies``) eagerly and, if ``graphs``, from CUDA graphs.

    Writes ``us`` (eager median), ``samples_us``, ``graph_us`` and ``graph_samples_us`` (or
    ``graph_skipped`` / ``graph_error``) and ``best_us`` (the smaller) into ``result``.
    """
    call = rotating(fn, copies)
    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["us"], result["samples_us"] = median_us(call, iters, device)
    best = result["us"]
    if graphs:
        blocker = _graph_blocker(fn)
        if blocker is not None:
            result["graph_skipped"] = blocker
        else:
            try:
                result["graph_us"], result["graph_samples_us"] = graph_times(
                    [lambda i=i: fn(i) for i in range(copies)], iters
                )
                best = min(best, result["graph_us"])
            except Exception as exc:  # report, do not hide
                result["graph_error"] = _error(exc, 300)
    result["best_us"] = best


def _plan_for(spec: MoESpec, device: torch.device, name: str) -> MoEPlan:
    plan = moe_plan(spec, device, backend=name)
    if plan.kernel != name:  # a higher-priority kernel named below ``name`` (name.variant) won
        plan = MoEPlan(spec, plan.device, get_registry().get(name), plan.candidates, name)
    return plan


def _check(result: dict, got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    result["relative_error"] = relative_error(got, want)
    result["passed"] = result["relative_error"] <= bound


def run_case(
    config: BenchConfig,
    model: str,
    dtype: torch.dtype,
    quant: str | None,
    tokens: int,
    ceilings: dict[str, float],
    peers: Sequence[Peer] = (),
) -> dict[str, Any]:
    """One case: every usable kernel and peer, checked and timed (module docstring)."""
    device = config.device
    cuda = device.type == "cuda"
    preset = get_preset(model)
    spec = preset.moe_spec(dtype, quant)
    case: dict[str, Any] = {
        "model": model,
        "dtype": str(dtype).removeprefix("torch."),
        "quant": spec.quant.name if quant is None or "/" not in quant else str(spec.quant),
        "T": tokens,
        "spec": spec.describe(),
        "tolerance": tolerance(spec),
    }
    usable, refused = select_kernels(spec, device, config.kernels)
    case["floor_us"] = preset_floor_us(preset, spec, tokens, ceilings)
    case["refused"] = refused
    case["kernels"] = {}
    case["peers"] = {}
    runnable = []
    for peer in peers:
        reason = peer.supports(spec, device)
        if reason is None:
            runnable.append(peer)
        else:
            case["peers"][peer.name] = {"skipped": reason}
    if not usable and not runnable:
        return case

    weights = [random_expert_weights(spec, device=device, seed=config.seed + 1)]
    copies = 1
    if cuda:
        wbytes = sum(t.numel() * t.element_size() for t in weights[0].tensors().values())
        copies = max(2, math.ceil(L2_FLUSH_BYTES / max(wbytes, 1)))
    for i in range(1, copies):
        weights.append(random_expert_weights(spec, device=device, seed=config.seed + 1 + i))
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed + 7)
    inputs = []
    for i in range(copies):
        x = torch.randn(tokens, spec.hidden_size, generator=gen, device=device).to(dtype)
        w, ids = uniform_routing(
            preset.routing, tokens, preset.num_experts, device=device, seed=config.seed + 100 + i
        )
        inputs.append((x, w, ids))
    case["active_experts"] = statistics.mean(len(torch.unique(ids)) for _, _, ids in inputs)
    x0, w0, ids0 = inputs[0]
    want = fused_experts_reference(spec, x0, weights[0], w0, ids0, compute_dtype=torch.float64)
    bound = case["tolerance"]
    graphs = cuda and tokens <= GRAPH_MAX_T
    out = torch.empty(tokens, spec.hidden_size, dtype=dtype, device=device)

    for name in usable:
        result: dict[str, Any] = {}
        case["kernels"][name] = result
        try:
            plan = _plan_for(spec, device, name)
            prepared = [plan.prepare(w) for w in weights]
            out.fill_(float("nan"))
            moe_apply(plan, x0, prepared[0], w0, ids0, out=out)
            _check(result, out, want, bound)

            def ours(i, plan=plan, prepared=prepared):
                x, w, ids = inputs[i]
                moe_apply(plan, x, prepared[i], w, ids, out=out)

            _time_into(result, ours, copies, config.iters, device, graphs, config.warmup)
            result["time_over_floor"] = result["best_us"] / case["floor_us"]
        except Exception as exc:  # a broken kernel is reported, the run goes on
            result["error"] = _error(exc)
            result.setdefault("passed", False)
        finally:
            prepared = plan = None
        if cuda:
            torch.cuda.empty_cache()

    for peer in runnable:
        result = {}
        case["peers"][peer.name] = result
        try:
            fns = [peer.bind(spec, w) for w in weights]
            _check(result, fns[0](x0, w0, ids0), want, bound)

            def theirs(i, fns=fns):
                x, w, ids = inputs[i]
                fns[i](x, w, ids)

            _time_into(result, theirs, copies, config.iters, device, graphs and peer.graphs, config.warmup)
            result["time_over_floor"] = result["best_us"] / case["floor_us"]
        except Exception as exc:  # report, do not hide
            result["error"] = _error(exc, 300)

    for result in case["kernels"].values():
        if "best_us" not in result:
            continue
        for name, peer_result in case["peers"].items():
            if "best_us" in peer_result:
                result[f"speedup_vs_{name}"] = peer_result["best_us"] / result["best_us"]
    timed = [(r["best_us"], n) for n, r in case["kernels"].items() if r.get("passed") and "best_us" in r]
    case["fastest"] = min(timed)[1] if timed else None
    return case


def _command(argv: list[str]) -> str | None:
    """First line a command prints, or ``None`` if it fails (no git checkout, no nvidia-smi)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver, versions and git commit for the report's header."""
    cuda = device.type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name = f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        capability = None
    here = os.path.dirname(os.path.abspath(__file__))  # an editable install: the checkout it lives in
    commit = (
        os.environ.get("MOE_BENCH_COMMIT")
        or _command(["git", "rev-parse", "--verify", "HEAD"])
        or _command(["git", "-C", here, "rev-parse", "--verify", "HEAD"])
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        "capability": capability,
        "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "triton": _version("triton"),
            "flashinfer": _version("flashinfer-python"),
            "moe-core": _version("moe-core"),
            "moe-plugin-portable": _version("moe-plugin-portable"),
            "moe-plugin-nvidia": _version("moe-plugin-nvidia"),
            "moe-plugin-amd": _version("moe-plugin-amd"),
            "python": platform.python_version(),
        },
        "git_commit": commit,
    }


def _cases(config: BenchConfig) -> list[tuple[torch.dtype, str, str | None, int]]:
    return list(itertools.product(config.dtypes, config.models, config.quants, config.tokens))


def run_bench(
    config: BenchConfig,
    *,
    progress: Progress | None = None,
    on_case: Callable[[dict, dict], None] | None = None,
) -> dict[str, Any]:
    """Run every case of ``config``; returns the report. ``on_case(report, case)`` after each case."""
    for quant in config.quants:
        if quant is not None and quant.split("/")[0] not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant scheme {quant!r}; expected one of {QUANT_SCHEMES}")
    for model in config.models:
        get_preset(model)  # unknown names fail before anything runs
    device = config.device
    peers, peer_status = make_peers(config.vllm_peer) if config.peers else ([], {})
    ceilings = config.ceilings or measure_ceilings(device)
    registry = get_registry()
    report = {
        **environment(device),
        "config": config.to_json(),
        "kernels": {e.name: e.plugin for e in registry.entries("experts", "experts")},
        "peers": peer_status,
        "ceilings": ceilings,
        "cases": [],
    }
    cases = _cases(config)
    for index, (dtype, model, quant, tokens) in enumerate(cases):
        label = f"{model} {str(dtype).removeprefix('torch.')} {quant or 'unquantized'} T={tokens}"
        if progress is not None:
            progress(label, index, len(cases))
        try:
            case = run_case(config, model, dtype, quant, tokens, ceilings, peers)
        except Exception as exc:  # report, do not stop the run
            case = {
                "model": model,
                "dtype": str(dtype).removeprefix("torch."),
                "quant": quant,
                "T": tokens,
                "error": _error(exc),
            }
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["cases"].append(case)
        for peer in peers:
            if peer.describe is not None and "lookups" in peer.info:  # config files actually loaded so far
                report["peers"][peer.name]["lookups"] = peer.describe()["lookups"]
        if on_case is not None:
            on_case(report, case)
    if progress is not None:
        progress("done", len(cases), len(cases))
    return report
