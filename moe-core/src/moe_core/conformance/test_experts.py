"""Conformance of ``experts`` kernels: ``moe_apply`` through the kernel, against the float64 reference.

Cases come from what the kernel's :class:`~moe_core.KernelEntry` declares:
every declared quant scheme (all activation modes and weight scales; every
scheme the reference supports when it declares none), every declared
activation, each optional feature (bias, expert parallelism by rank and by
an explicit map, router weight on the input), one token, int64 ids, strided
inputs, and high-precision weights for quantized schemes (``prepare`` quantizes them).
Each case asks ``entry.refusal(spec, device)`` first and is skipped, with the
kernel's reason, when refused. Shapes are small and odd (E=7, k=3, H=72,
I=40; the fp4 schemes need H, I multiples of their scale group) so that a
kernel in Triton's CPU interpreter finishes in about a minute.

The contract checked beyond accuracy: ``T = 0`` returns ``[0, H]`` and launches
nothing; every row of ``out=`` is written (it is pre-filled with NaN), tokens
with no local expert included; bad inputs raise :class:`MoEInputError`
before the kernel is called; ``prepare`` is deterministic and leaves the
canonical weights alone, and ``apply`` writes none of its inputs; ids
outside ``[0, E)`` are skipped; on CUDA, graph capture and replay equal eager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from .. import quant as q
from ..device import DeviceInfo, device_info
from ..errors import MoEInputError
from ..planner import MoEPlan, PreparedWeights, moe_apply, moe_plan
from ..reference import fused_experts_reference
from ..registry import KernelEntry, get_registry
from ..routing import RoutingSpec, select_experts_reference
from ..spec import ACTIVATION_MODES, ACTIVATIONS, QUANT_SCHEMES, ExpertWeights, MoESpec, QuantScheme
from ..testing import random_expert_weights, random_logits, relative_error, tolerance
from ._kit import (
    Case,
    Skip,
    assert_unchanged,
    cases,
    generator,
    parametrize,
    same_bits,
    snapshot,
    spy_on,
    strided,
)

NUM_EXPERTS, TOP_K, TOKENS = 7, 3, 9
#: (H, I) per scheme: odd multiples of 8 by default, multiples of the fp4 scale group otherwise
SIZES = {"mxfp4": (96, 32), "nvfp4": (80, 48)}
DEFAULT_SIZES = (72, 40)
#: 4 of 7 experts on this rank, numbered out of order
EXPERT_MAP = (2, -1, 0, -1, -1, 1, 3)
UNQUANTIZED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class ExpertsCase(Case):
    """A layer and a batch: ``spec``, ``tokens``, the ids' dtype and the inputs' form."""

    spec: MoESpec
    tokens: int = TOKENS
    ids_dtype: torch.dtype = torch.int32
    strided: bool = False  # hidden_states a strided view (kernels with needs_contiguous=False)
    strided_topk: bool = False  # topk_weights and topk_ids strided views (the core accepts them)
    quantize: bool = True  # False: high-precision weights for a quantized scheme; prepare quantizes
    bad: str | None = None  # the bad-input class (test_bad_input_raises_before_launch)


# ----------------------------------------------------------------------------- cases


def scheme_variants(names: frozenset[str]) -> list[QuantScheme]:
    """Every activation mode and weight scale of each scheme in ``names``, unquantized ones first."""
    variants = []
    for name in QUANT_SCHEMES:
        if name not in names:
            continue
        scales = ("per_channel", "per_tensor") if name == "fp8" else (None,)
        for weight_scale in scales:
            for mode in ACTIVATION_MODES[name]:
                variants.append(QuantScheme(name, activation=mode, weight_scale=weight_scale))
    return variants


def make_spec(scheme: QuantScheme, activation: str = "silu", **changes: Any) -> MoESpec:
    hidden, inter = SIZES.get(scheme.name, DEFAULT_SIZES)
    dtype = UNQUANTIZED.get(scheme.name, torch.bfloat16)
    return MoESpec(
        NUM_EXPERTS, TOP_K, hidden, inter, activation=activation, quant=scheme, dtype=dtype, **changes
    )


def scheme_label(scheme: QuantScheme) -> str:
    return str(scheme).replace("/", ",").replace(":", "=")


def reference_schemes() -> frozenset[str]:
    """The schemes the reference backend supports (what an entry declaring none is tried on)."""
    try:
        return get_registry().get("reference.torch.experts").quant or frozenset(QUANT_SCHEMES)
    except KeyError:
        return frozenset(QUANT_SCHEMES)


#: Kinds of cases that run on the kernel's base spec only.
BASE_KINDS = ("poison", "empty", "prepare", "out_of_range", "cuda_graph", "bad_input")


def build_cases(
    entry: KernelEntry, device: torch.device, info: DeviceInfo
) -> Iterator[tuple[str, ExpertsCase | Skip]]:
    schemes = scheme_variants(entry.quant or reference_schemes())
    acts = [a for a in ACTIVATIONS if not entry.activations or a in entry.activations]

    def case(label: str, spec: MoESpec, **kw: Any) -> ExpertsCase:
        return ExpertsCase(entry=entry, label=label, spec=spec, refusal=entry.refusal(spec, info), **kw)

    # the base spec: the first (scheme, activation) the kernel accepts, unquantized and silu first
    tried = [make_spec(s, a) for s in schemes for a in acts]
    base = next((spec for spec in tried if entry.refusal(spec, info) is None), None)
    fallback = tried[0] if tried else make_spec(QuantScheme("bf16"))
    spec0 = base or fallback
    act0 = spec0.activation

    for scheme in schemes:
        yield "accuracy", case(f"quant={scheme_label(scheme)}", make_spec(scheme, act0))
    for act in acts:
        if act != act0:
            yield "accuracy", case(f"activation={act}", make_spec(spec0.quant, act))
    yield "accuracy", case("bias", spec0.replace(has_bias=True))
    yield "accuracy", case("expert_parallel,ep_size=2,ep_rank=1", spec0.replace(ep_size=2, ep_rank=1))
    yield "accuracy", case("expert_parallel,expert_map", spec0.replace(expert_map=EXPERT_MAP))
    yield (
        "accuracy",
        case("router_weight_on_input,top_k=1", spec0.replace(top_k=1, apply_router_weight_on_input=True)),
    )
    yield "accuracy", case("tokens=1", spec0, tokens=1)
    yield "accuracy", case("topk_ids=int64", spec0, ids_dtype=torch.int64)
    if not entry.needs_contiguous:
        yield "accuracy", case("strided_hidden_states", spec0, strided=True)
    yield "accuracy", case("strided_topk", spec0, strided_topk=True)
    for name in sorted({s.name for s in schemes if s.is_quantized}, key=QUANT_SCHEMES.index):
        yield (
            "accuracy",
            case(f"prepare_quantizes={name}", make_spec(QuantScheme(name), act0), quantize=False),
        )

    if base is None:
        reason = (
            f"{entry.name} accepts none of the {len(tried)} quant x activation combinations tried "
            f"(e.g. {fallback.describe()}: {entry.refusal(fallback, info)})"
        )
        for kind in BASE_KINDS:
            yield kind, Skip(kind, reason)
        return
    yield "poison", case("poisoned_out", base)
    yield "poison", case("poisoned_out,expert_parallel", base.replace(ep_size=2, ep_rank=1))
    yield "empty", case("tokens=0", base, tokens=0)
    yield "prepare", case("prepare", base)
    quantized = next(
        (spec for spec in tried if spec.quant.is_quantized and entry.refusal(spec, info) is None), None
    )
    if quantized is not None:
        yield "prepare", case(f"prepare,quant={scheme_label(quantized.quant)}", quantized)
    yield "out_of_range", case("out_of_range_ids", base)
    if device.type == "cuda":
        yield "cuda_graph", case("cuda_graph", base)
    else:
        yield (
            "cuda_graph",
            Skip("cuda_graph", f"CUDA graphs need a CUDA device (--moe-device cuda), not {device}"),
        )
    for bad in BAD_INPUTS:
        if bad == "hidden_states_noncontiguous" and not entry.needs_contiguous:
            reason = f"{entry.name} takes non-contiguous hidden_states (needs_contiguous=False)"
            yield "bad_input", Skip(f"bad_input={bad}", reason)
        else:
            yield "bad_input", case(f"bad_input={bad}", base, bad=bad)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "experts", build_cases)


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    hidden_states: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


def make_weights(case: ExpertsCase, device: torch.device) -> ExpertWeights:
    return random_expert_weights(case.spec, device=device, seed=case.seed, quantize=case.quantize)


def make_batch(case: ExpertsCase, device: torch.device, salt: int = 0) -> Batch:
    """Random ``hidden_states`` N(0, 1) and reference routing of random logits."""
    spec, T, seed = case.spec, case.tokens, case.seed + 1000 * salt
    width = 2 * spec.hidden_size if case.strided else spec.hidden_size
    x = torch.randn(T, width, generator=generator(seed + 1)).to(spec.dtype).to(device)
    if case.strided:
        x = x[:, ::2]
    method = "sigmoid" if spec.apply_router_weight_on_input else "softmax"
    routing = RoutingSpec(method, top_k=spec.top_k, renormalize=method == "softmax")
    logits = random_logits(T, spec.num_experts, seed=seed + 2).to(device)
    weights, ids = select_experts_reference(logits, routing)
    ids = ids.to(case.ids_dtype)
    if case.strided_topk:
        weights, ids = strided(weights), strided(ids)
    return Batch(x, weights, ids)


def expected_output(
    spec: MoESpec, weights: ExpertWeights, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The float64 reference; high-precision weights of a quantized scheme are quantized first."""
    if spec.quant.is_quantized and q.is_high_precision(weights.w13):
        weights = q.quantize_weights(weights, spec.quant)
    return fused_experts_reference(spec, x, weights, topk_weights, topk_ids, compute_dtype=torch.float64)


def plan_for(case: ExpertsCase, device: torch.device) -> MoEPlan:
    plan = moe_plan(case.spec, device_info(device), backend=case.entry.name)
    assert plan.kernel == case.entry.name, f"moe_plan(backend={case.entry.name!r}) chose {plan.kernel}"
    return plan


def check_output(case: ExpertsCase, result: Any, expected: torch.Tensor, what: str = "output") -> None:
    spec, name = case.spec, case.entry.name
    assert isinstance(result, torch.Tensor), f"{what} is a {type(result).__name__}, not a tensor"
    assert tuple(result.shape) == tuple(expected.shape), f"{what} has shape {list(result.shape)}"
    assert result.dtype == spec.dtype, f"{what} has dtype {result.dtype}, spec.dtype is {spec.dtype}"
    assert result.device == expected.device, f"{what} is on {result.device}, not {expected.device}"
    bad_rows = (~torch.isfinite(result.float())).any(dim=-1).nonzero().flatten()
    assert not bad_rows.numel(), (
        f"{name}: {what} has NaN/inf in rows {bad_rows[:8].tolist()} of {result.shape[0]} "
        "(every row must be written; zeros for tokens with no local expert)"
    )
    err, bound = relative_error(result, expected), tolerance(spec)
    if err > bound:
        diff = (result.double() - expected).abs()
        row = int(diff.amax(dim=-1).argmax())
        raise AssertionError(
            f"{name} on {spec.describe()}, T={result.shape[0]}: relative error {err:.3g} "
            f"vs the float64 reference exceeds {bound:.3g} (worst row {row}: max abs error "
            f"{diff[row].max().item():.3g}, |expected| max {expected[row].abs().max().item():.3g})"
        )


# ----------------------------------------------------------------------------- tests


@cases("accuracy")
def test_matches_reference(case: ExpertsCase, moe_device: torch.device) -> None:
    """Output within ``tolerance(spec)`` of the float64 reference; inputs left untouched."""
    weights, batch = make_weights(case, moe_device), make_batch(case, moe_device)
    inputs = {
        "hidden_states": batch.hidden_states,
        "topk_weights": batch.topk_weights,
        "topk_ids": batch.topk_ids,
        **weights.tensors(),
    }
    before = snapshot(inputs)
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(weights)
    result = moe_apply(plan, batch.hidden_states, prepared, batch.topk_weights, batch.topk_ids)
    assert_unchanged(inputs, before, f"{case.entry.name} (prepare + apply)")
    want = expected_output(case.spec, weights, batch.hidden_states, batch.topk_weights, batch.topk_ids)
    check_output(case, result, want)


@cases("poison")
def test_writes_every_row_of_out(case: ExpertsCase, moe_device: torch.device) -> None:
    """``out=`` pre-filled with NaN is returned fully written (token 0 has no local expert under EP)."""
    spec = case.spec
    weights, batch = make_weights(case, moe_device), make_batch(case, moe_device)
    if spec.is_expert_parallel:
        remote = [e for e, local in enumerate(spec.global_to_local()) if local < 0][: spec.top_k]
        batch.topk_ids[0] = torch.tensor(remote, dtype=batch.topk_ids.dtype)
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(weights)
    out = torch.full((case.tokens, spec.hidden_size), float("nan"), dtype=spec.dtype, device=moe_device)
    result = moe_apply(plan, batch.hidden_states, prepared, batch.topk_weights, batch.topk_ids, out=out)
    assert result is out, "moe_apply(..., out=out) must return out itself"
    want = expected_output(spec, weights, batch.hidden_states, batch.topk_weights, batch.topk_ids)
    check_output(case, out, want, "out")


@cases("empty")
def test_empty_batch_launches_nothing(case: ExpertsCase, moe_device: torch.device) -> None:
    """``T = 0``: an empty ``[0, H]`` result (or the given ``out``) and no kernel call."""
    spec = case.spec
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(make_weights(case, moe_device))
    spy = spy_on(plan)
    batch = make_batch(case, moe_device)
    result = moe_apply(plan, batch.hidden_states, prepared, batch.topk_weights, batch.topk_ids)
    assert tuple(result.shape) == (0, spec.hidden_size) and result.dtype == spec.dtype
    assert result.device.type == moe_device.type
    out = torch.empty(0, spec.hidden_size, dtype=spec.dtype, device=moe_device)
    again = moe_apply(plan, batch.hidden_states, prepared, batch.topk_weights, batch.topk_ids, out=out)
    assert again is out
    assert spy.calls == 0, f"{case.entry.name}.apply was called {spy.calls} time(s) for T = 0"


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype != torch.float32 else torch.bfloat16


def _set_id(ids: torch.Tensor, value: int) -> torch.Tensor:
    ids = ids.clone()
    ids[0, 0] = value
    return ids


#: Bad-input classes: each maps the valid ``moe_apply`` keyword arguments and the
#: spec to the arguments to replace.
BAD_INPUTS: dict[str, Callable[[dict[str, Any], MoESpec], dict[str, Any]]] = {
    "hidden_states_dtype": lambda kw, spec: {
        "hidden_states": kw["hidden_states"].to(_other_dtype(spec.dtype))
    },
    "hidden_states_width": lambda kw, spec: {"hidden_states": kw["hidden_states"][:, :-1].contiguous()},
    "hidden_states_3d": lambda kw, spec: {"hidden_states": kw["hidden_states"][None]},
    "hidden_states_noncontiguous": lambda kw, spec: {
        "hidden_states": kw["hidden_states"].repeat(1, 2)[:, ::2]
    },
    "top_k_mismatch": lambda kw, spec: {
        "topk_weights": kw["topk_weights"][:, :-1].contiguous(),
        "topk_ids": kw["topk_ids"][:, :-1].contiguous(),
    },
    "topk_rows_mismatch": lambda kw, spec: {
        "topk_weights": kw["topk_weights"][:-1],
        "topk_ids": kw["topk_ids"][:-1],
    },
    "topk_ids_int16": lambda kw, spec: {"topk_ids": kw["topk_ids"].to(torch.int16)},
    "topk_ids_float": lambda kw, spec: {"topk_ids": kw["topk_ids"].to(torch.float32)},
    "topk_weights_int": lambda kw, spec: {"topk_weights": kw["topk_weights"].to(torch.int32)},
    "topk_ids_too_large": lambda kw, spec: {"topk_ids": _set_id(kw["topk_ids"], spec.num_experts)},
    "topk_ids_negative": lambda kw, spec: {"topk_ids": _set_id(kw["topk_ids"], -1)},
    "out_shape": lambda kw, spec: {
        "out": kw["hidden_states"].new_empty(kw["hidden_states"].shape[0], spec.hidden_size + 1)
    },
    "out_dtype": lambda kw, spec: {
        "out": torch.empty_like(kw["hidden_states"], dtype=_other_dtype(spec.dtype))
    },
    "out_noncontiguous": lambda kw, spec: {
        "out": kw["hidden_states"].new_empty(spec.hidden_size, kw["hidden_states"].shape[0]).t()
    },
    "prepared_for_another_kernel": lambda kw, spec: {
        "prepared": PreparedWeights("conformance.other.kernel", dict(kw["prepared"].tensors))
    },
}


@cases("bad_input")
def test_bad_input_raises_before_launch(
    case: ExpertsCase, moe_device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bad-input class raises :class:`MoEInputError` and the kernel is never called."""
    monkeypatch.setenv("MOE_CHECK_INPUTS", "1")  # id values are checked on GPUs only when asked
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(make_weights(case, moe_device))
    batch = make_batch(case, moe_device)
    spy = spy_on(plan)
    kwargs: dict[str, Any] = {
        "hidden_states": batch.hidden_states,
        "prepared": prepared,
        "topk_weights": batch.topk_weights,
        "topk_ids": batch.topk_ids,
        "out": None,
    }
    kwargs.update(BAD_INPUTS[case.bad](kwargs, case.spec))
    with pytest.raises(MoEInputError):
        moe_apply(plan, **kwargs)
    assert spy.calls == 0, f"{case.entry.name}.apply was called before the bad input ({case.bad}) was refused"


@cases("prepare")
def test_prepare_is_idempotent(case: ExpertsCase, moe_device: torch.device) -> None:
    """Preparing the same weights twice gives equal tensors and outputs; canonical weights stay as given."""
    name = case.entry.name
    weights, batch = make_weights(case, moe_device), make_batch(case, moe_device)
    canonical = weights.tensors()
    before = snapshot(canonical)
    plan = plan_for(case, moe_device)
    first, second = plan.prepare(weights), plan.prepare(weights)
    assert_unchanged(canonical, before, f"{name}.prepare")
    assert isinstance(first, PreparedWeights) and first.kernel == name
    assert sorted(first.tensors) == sorted(second.tensors), "prepare returned different tensor names"
    for key, tensor in first.tensors.items():
        assert isinstance(tensor, torch.Tensor), f"prepared[{key!r}] is not a tensor"
        assert same_bits(tensor, second.tensors[key]), f"{name}.prepare is not deterministic: {key!r} differs"
    assert first.meta == second.meta, f"{name}.prepare is not deterministic: meta differs"
    args = (batch.hidden_states, batch.topk_weights, batch.topk_ids)
    out1 = moe_apply(plan, args[0], first, *args[1:])
    out2 = moe_apply(plan, args[0], second, *args[1:])
    assert_unchanged(canonical, before, f"{name}.apply")
    if not same_bits(out1, out2):
        again = moe_apply(plan, args[0], first, *args[1:])
        assert not same_bits(out1, again), "outputs differ between two preparations of the same weights"
        # a kernel that is not bitwise reproducible run to run: equal within the bound
        assert relative_error(out2, out1.double()) <= tolerance(case.spec)
    check_output(case, out1, expected_output(case.spec, weights, *args))


@cases("out_of_range")
def test_out_of_range_ids_are_skipped(case: ExpertsCase, moe_device: torch.device) -> None:
    """Called directly (no value checks, as on a GPU), ``apply`` skips ids outside ``[0, E)``."""
    spec, entry = case.spec, case.entry
    weights, batch = make_weights(case, moe_device), make_batch(case, moe_device)
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(weights)
    E, T = spec.num_experts, case.tokens
    ids = batch.topk_ids.clone()
    ids[0, 0], ids[T // 2, 1], ids[T - 1, spec.top_k - 1] = -1, E, E + 100
    valid = (ids >= 0) & (ids < E)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=moe_device)
    try:
        plan.entry.apply(spec, batch.hidden_states, prepared, batch.topk_weights, ids, out)
    except MoEInputError as exc:
        if moe_device.type != "cpu":
            raise
        pytest.skip(
            f"{entry.name} checks id values itself on the CPU ({exc}); run on a GPU to check skipping"
        )
    zero_w = torch.where(valid, batch.topk_weights, torch.zeros_like(batch.topk_weights))
    want = expected_output(spec, weights, batch.hidden_states, zero_w, torch.where(valid, ids, 0))
    check_output(case, out, want, "out with out-of-range ids")


@cases("cuda_graph")
def test_cuda_graph_replay_matches_eager(case: ExpertsCase, moe_device: torch.device) -> None:
    """Captured once, replayed on new inputs copied into the captured buffers: equal to eager."""
    if case.entry.plugin == "reference":
        pytest.skip("the reference backend reads expert counts on the host by design (not graph-safe)")
    weights = make_weights(case, moe_device)
    first, second = make_batch(case, moe_device), make_batch(case, moe_device, salt=1)
    plan = plan_for(case, moe_device)
    prepared = plan.prepare(weights)
    x, tw, ti = first.hidden_states.clone(), first.topk_weights.clone(), first.topk_ids.clone()
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile, autotune, allocate outside the capture
            moe_apply(plan, x, prepared, tw, ti, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_apply(plan, x, prepared, tw, ti, out=out)
    x.copy_(second.hidden_states)
    tw.copy_(second.topk_weights)
    ti.copy_(second.topk_ids)
    graph.replay()
    torch.cuda.synchronize()
    eager = moe_apply(plan, second.hidden_states, prepared, second.topk_weights, second.topk_ids)
    err = relative_error(out, eager.double())
    assert same_bits(out, eager) or err <= tolerance(case.spec), (
        f"graph replay differs from eager ({err:.3g})"
    )
    want = expected_output(case.spec, weights, second.hidden_states, second.topk_weights, second.topk_ids)
    check_output(case, out, want, "graph replay output")
