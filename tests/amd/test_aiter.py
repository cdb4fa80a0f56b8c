"""The aiter/CK fallbacks: refusals without aiter, and the calls we make checked against aiter's real source.

aiter only runs on ROCm, so the calls are not executed here. Instead the
``amd-aiter`` wheel is downloaded once per session (``pip download --no-deps
--pre amd-aiter``, kept in ``$MOE_AITER_WHEEL_CACHE``, default
``~/.cache/moe-kernels/aiter-wheel``; the tests skip with the reason when it
cannot be had) and its source is read with ``ast``:

- ``aiter.fused_moe.fused_moe`` and ``aiter.moe_sorting_fwd``: every keyword
  we pass is a parameter, positional arguments are in the parameters' order,
  every required parameter is given, enum members exist (``aiter_enum.h``);
- layouts: the shape comments on ``fused_moe``'s parameters (``w1 [expert,
  inter_dim*2, dim]``...), the way aiter's torch reference consumes the scales
  and splits gate/up, the fp8 dtype per arch, the output sizes ``moe_sorting``
  allocates, CK's padding value and its fp32-weights / int32-ids checks;
- ``aiter.ops.shuffle.shuffle_weight`` itself (pure torch) re-lays out our weights.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from moe_core import DeviceInfo, MoESpec, QuantScheme, moe_plan
from moe_core.cli import main
from moe_core.sorting import SortingRequest, max_num_blocks, moe_sorting_reference
from moe_core.testing import check_sorted_tokens, random_expert_weights
from moe_plugin_amd import aiter_kernels as ak

WHEEL_CACHE = Path(
    os.environ.get("MOE_AITER_WHEEL_CACHE") or Path.home() / ".cache" / "moe-kernels" / "aiter-wheel"
)
SOURCES = {
    "fused_moe": "aiter/fused_moe.py",
    "moe_sorting": "aiter/ops/moe_sorting.py",
    "moe_op": "aiter/ops/moe_op.py",
    "shuffle": "aiter/ops/shuffle.py",
    "quant": "aiter/ops/quant.py",
    "dtypes": "aiter/utility/dtypes.py",
    "enum_h": "aiter_meta/csrc/include/aiter_enum.h",
    "sorting_cu": "aiter_meta/csrc/py_itfs_ck/moe_sorting_kernels.cu",
    "sorting_api": "aiter_meta/3rdparty/composable_kernel/example/ck_tile/13_moe_sorting/moe_sorting_api.cpp",
    "sorting_kernel": "aiter_meta/3rdparty/composable_kernel/include/ck_tile/ops/fused_moe/kernel/"
    "moe_sorting_kernel.hpp",
    "ck_config": "aiter_meta/3rdparty/composable_kernel/include/ck_tile/core/config.hpp",
}


# ----------------------------------------------------------------------------- the wheel's source


@pytest.fixture(scope="session")
def aiter_src() -> dict[str, str]:
    """The text of the aiter files we check against, from the newest cached or downloaded wheel."""
    wheels = sorted(WHEEL_CACHE.glob("amd_aiter-*.whl"))
    if not wheels:
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--pre",
            "amd-aiter",
            "-d",
            str(WHEEL_CACHE),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"could not download the amd-aiter wheel ({' '.join(cmd[2:])}): {exc}")
        wheels = sorted(WHEEL_CACHE.glob("amd_aiter-*.whl"))
        if done.returncode or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"could not download the amd-aiter wheel ({' '.join(cmd[2:])}): {' / '.join(tail)}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        names = set(wheel.namelist())
        missing = [path for path in SOURCES.values() if path not in names]
        assert not missing, f"{wheels[-1].name} lacks {missing}: aiter's layout changed, update the fallbacks"
        return {key: wheel.read(path).decode() for key, path in SOURCES.items()}


def _function(source: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"aiter defines no function {name}")


def _params(fn: ast.FunctionDef) -> tuple[list[str], set[str]]:
    """Parameter names in order, and the required ones (no default)."""
    args = [*fn.args.posonlyargs, *fn.args.args]
    names = [a.arg for a in args] + [a.arg for a in fn.args.kwonlyargs]
    required = {a.arg for a in args[: len(args) - len(fn.args.defaults)]}
    required |= {a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is None}
    return names, required


def check_call(call: ak.AiterCall, fn: ast.FunctionDef, enums: dict[str, set[str]]) -> None:
    """``call`` binds to ``fn``'s signature: order, names, required parameters, enum members."""
    names, required = _params(fn)
    positional = [name for name, _ in call.args]
    assert positional == names[: len(positional)], f"positional order {positional} vs aiter's {names}"
    unknown = set(call.kwargs) - set(names)
    assert not unknown, f"{fn.name} has no parameter {sorted(unknown)}"
    assert not set(positional) & set(call.kwargs), "a parameter passed twice"
    missing = required - set(positional) - set(call.kwargs)
    assert not missing, f"{fn.name} requires {sorted(missing)}"
    for value in [v for _, v in call.args] + list(call.kwargs.values()):
        if isinstance(value, ak.AiterEnum):
            assert value.member in enums[value.type], f"aiter's {value.type} has no member {value.member}"


def parse_enums(header: str) -> dict[str, set[str]]:
    enums = {}
    for name, body in re.findall(r"enum class (\w+)\s*:\s*\w+\s*\{([^}]*)\}", header):
        enums[name] = {m.split("=")[0].strip() for m in body.split(",") if m.strip()}
    return enums


def param_comments(source: str, fn: ast.FunctionDef) -> dict[str, str]:
    """The shape comment on each parameter's line (``w1,  # [expert(local_expert:EP), inter_dim*2, dim]``)."""
    lines = source.splitlines()
    found = {}
    for arg in [*fn.args.args, *fn.args.kwonlyargs]:
        m = re.search(r"#\s*(\[[^\]]*\])", lines[arg.lineno - 1])
        if m:
            found[arg.arg] = m.group(1)
    return found


def comment_shape(comment: str, sizes: dict[str, int]) -> list[int | None]:
    """``[expert(local_expert:EP), inter_dim*2, dim]`` -> sizes (``None`` for a dim not understood)."""
    dims = []
    for token in comment.strip("[]").split(","):
        token = re.sub(r"\(.*?\)", "", token).strip()
        try:
            dims.append(eval(token, {"__builtins__": {}}, dict(sizes)))  # names and * only
        except Exception:
            dims.append(None)
    return dims


def shuffle_weight(aiter_src: dict[str, str]):
    """aiter's own ``shuffle_weight`` (the file imports torch only), run here."""
    module = types.ModuleType("aiter_shuffle")
    exec(compile(aiter_src["shuffle"], SOURCES["shuffle"], "exec"), module.__dict__)
    return module.shuffle_weight


# ----------------------------------------------------------------------------- fused_moe: the call

L, H, INTER, K, E = 4, 256, 128, 2, 4
QUANTS = {
    "bf16": QuantScheme("bf16"),
    "fp8-per-token": QuantScheme("fp8"),
    "fp8-per-tensor-weights-dynamic-tokens": QuantScheme("fp8", weight_scale="per_tensor"),
    "fp8-per-tensor-static": QuantScheme("fp8", activation="fp8_per_tensor", weight_scale="per_tensor"),
    "fp8-block": QuantScheme("fp8_block"),
}
QUANT_TYPES = {
    "bf16": "No",
    "fp8-per-token": "per_Token",
    "fp8-per-tensor-weights-dynamic-tokens": "per_Token",
    "fp8-per-tensor-static": "per_Tensor",
    "fp8-block": "per_128x128",
}


def _spec(quant: str, **kw) -> MoESpec:
    return MoESpec(E, K, H, INTER, quant=QUANTS[quant], dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("arch", ["gfx950", "gfx942"])
@pytest.mark.parametrize("quantized", [True, False], ids=["stored", "high-precision"])
@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_fused_moe_call_binds_to_aiter(aiter_src, quant, quantized, arch):
    src = aiter_src["fused_moe"]
    fn = _function(src, "fused_moe")
    spec = _spec(quant)
    weights = random_expert_weights(spec, seed=1, quantize=quantized)
    tensors = ak.aiter_layout(spec, weights, arch, shuffle_weight(aiter_src))
    T = 5
    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 4 + 2]], dtype=torch.int64)  # last: out of range
    call = ak.fused_moe_call(spec, tensors, x, torch.rand(T, K), ids)
    assert call.function == "aiter.fused_moe.fused_moe"
    check_call(call, fn, parse_enums(aiter_src["enum_h"]))
    kw = call.kwargs
    assert kw["quant_type"].member == QUANT_TYPES[quant] and kw["activation"].member == "Silu"
    assert kw["doweight_stage1"] is spec.apply_router_weight_on_input and kw["dtype"] == torch.bfloat16
    args = dict(call.args)
    assert args["topk_ids"].dtype == torch.int32 and args["topk_weight"].dtype == torch.float32
    assert args["topk_ids"][4, 1] == E, "an out-of-range id goes to the masked extra expert E"
    mask = kw["expert_mask"]
    assert mask.dtype == torch.int32 and mask.tolist() == [1] * E + [0]

    # the shapes documented on fused_moe's parameters
    comments = param_comments(src, fn)
    sizes = {"inter_dim": INTER, "dim": H, "model_dim": H}
    for name, tensor in (("w1", args["w1"]), ("w2", args["w2"])):
        want = comment_shape(comments[name], sizes)
        assert want[1:] == list(tensor.shape[1:]) and tensor.shape[0] == L, (name, comments[name])
    fp8 = {"gfx950": torch.float8_e4m3fn, "gfx942": torch.float8_e4m3fnuz}[arch]
    assert args["w1"].dtype == (torch.bfloat16 if quant == "bf16" else fp8)
    if quant.startswith("fp8") and quant != "fp8-block":
        for name, rows in (("w1_scale", 2 * INTER), ("w2_scale", H)):
            doc = comment_shape(comments[name], sizes)  # [expert, inter_dim / model_dim, 1]
            scale = kw[name]
            assert scale.dim() == len(doc) == 3 and scale.shape[0] == L and doc[-1] == scale.shape[-1] == 1
            assert scale.shape[1] in (rows, 1) and scale.dtype == torch.float32
    if quant == "fp8-per-tensor-static":
        assert kw["a1_scale"].shape == kw["a2_scale"].shape == (1,)
    else:
        assert "a1_scale" not in kw and "a2_scale" not in kw  # aiter quantizes dynamically
    if quant == "fp8-block":
        assert kw["w1_scale"].shape == (L, 2 * INTER // 128, H // 128)
        assert kw["w2_scale"].shape == (L, H // 128, INTER // 128)


def test_router_weight_on_input_is_doweight_stage1(aiter_src):
    spec = MoESpec(E, 1, H, INTER, dtype=torch.bfloat16, apply_router_weight_on_input=True)
    tensors = ak.aiter_layout(spec, random_expert_weights(spec), "gfx950", shuffle_weight(aiter_src))
    x, ids = torch.randn(3, H, dtype=torch.bfloat16), torch.tensor([[0], [3], [1]])
    call = ak.fused_moe_call(spec, tensors, x, torch.rand(3, 1), ids)
    check_call(call, _function(aiter_src["fused_moe"], "fused_moe"), parse_enums(aiter_src["enum_h"]))
    assert call.kwargs["doweight_stage1"] is True
    # aiter applies sorted_weights in stage 1 then, and not in stage 2
    body = ast.unparse(_function(aiter_src["fused_moe"], "fused_moe_2stages"))
    assert "sorted_weights=sorted_weights if doweight_stage1 else None" in body
    assert "sorted_weights=sorted_weights if not doweight_stage1 else None" in body


def test_layout_conventions_in_aiter_reference(aiter_src):
    """What the pass-through relies on, as aiter's torch reference (torch_moe_stage1/2) states it."""
    src = aiter_src["fused_moe"]
    stage1 = ast.unparse(_function(src, "torch_moe_stage1"))
    stage2 = ast.unparse(_function(src, "torch_moe_stage2"))
    # w1 rows: gate then up, act(gate) * up (our w13 is gate rows then up rows)
    assert "gate, up = out.split([inter_dim, inter_dim], dim=-1)" in stage1
    assert "out = torch_act(gate) * up" in stage1
    # per-token / per-tensor: one scale per w1 row (or per expert), broadcast over K
    assert "w1 = w1 * w1_scale.view(w1_scale.shape[0], -1, 1)" in stage1
    assert "w2 = w2 * w2_scale.view(w2_scale.shape[0], -1, 1)" in stage2
    # block scales [E, N/128, K/128], row-major
    assert "w1_scale.view(w1_scale.shape[0], w1.shape[1] // 128, 1, w1.shape[2] // 128, 1)" in stage1
    # per_128x128 is run as per_1x128
    assert "quant_remap = {QuantType.per_128x128: QuantType.per_1x128}" in ast.unparse(ast.parse(src))
    # static per-tensor activation scale: one float32 value
    quant = ast.unparse(_function(aiter_src["quant"], "per_tensor_quant_hip"))
    assert "static_per_tensor_quant(y, x, scale)" in quant and "scale.view(1)" in quant


def test_fp8_dtypes_per_arch(aiter_src):
    tree = ast.parse(aiter_src["dtypes"])
    table = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "defaultDtypes"
    )
    found = {ast.literal_eval(k): ast.unparse(v.values[0]) for k, v in zip(table.keys, table.values)}
    assert found == {arch: str(dtype) for arch, dtype in ak.FP8_DTYPES.items()}


def test_shuffle_constraints_match_supports(aiter_src, monkeypatch):
    """Shapes supports() accepts shuffle with aiter's own shuffle_weight; one it refuses would assert."""
    monkeypatch.setattr(ak, "aiter_refusal", lambda device: None)
    shuffle = shuffle_weight(aiter_src)
    fn = ak.kernel_entries()[0].supports
    dev = DeviceInfo.parse("gfx950")
    assert fn(MoESpec(4, 2, 96, 160, dtype=torch.bfloat16), dev) is None
    shuffle(torch.zeros(4, 320, 96, dtype=torch.bfloat16), layout=ak.SHUFFLE_LAYOUT)
    shuffle(torch.zeros(4, 96, 160, dtype=torch.float8_e4m3fn), layout=ak.SHUFFLE_LAYOUT)
    assert "multiples of 32" in fn(MoESpec(4, 2, 48, 160, dtype=torch.bfloat16), dev)
    with pytest.raises(AssertionError):
        shuffle(torch.zeros(4, 320, 48, dtype=torch.bfloat16), layout=ak.SHUFFLE_LAYOUT)


# ----------------------------------------------------------------------------- moe_sorting_fwd


@pytest.mark.parametrize(("T", "k", "E_", "unit"), [(1, 9, 257, 32), (37, 4, 8, 16), (5, 8, 3, 128)])
def test_moe_sorting_call_binds_to_aiter(aiter_src, T, k, E_, unit):
    for masked in (False, True):
        ids = torch.randint(-2, E_ + 2, (T, k), dtype=torch.int64)
        mask = (torch.arange(E_) % 2 == 0) if masked else None
        call, _ = ak.moe_sorting_call(
            ids, torch.rand(T, k, dtype=torch.bfloat16), num_experts=E_, unit_size=unit, expert_mask=mask
        )
        assert call.function == "aiter.moe_sorting_fwd" and not call.kwargs
        check_call(call, _function(aiter_src["moe_sorting"], "moe_sorting_fwd"), {})
        args = dict(call.args)
        # aiter.fused_moe.moe_sorting's own buffer sizes, evaluated from its source
        sizing = _function(aiter_src["fused_moe"], "moe_sorting")
        env = {"topk_ids": args["topk_ids"], "num_experts": args["num_experts"], "block_size": unit,
               "topk": k, "int": int}  # fmt: skip
        for node in sizing.body:
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) in (
                "max_num_tokens_padded",
                "max_num_m_blocks",
            ):
                env[ast.unparse(node.targets[0])] = eval(
                    compile(ast.Expression(node.value), "aiter", "eval"), env
                )
        assert args["sorted_token_ids"].numel() >= env["max_num_tokens_padded"]
        assert args["sorted_weights"].numel() >= env["max_num_tokens_padded"]
        assert args["sorted_expert_ids"].numel() >= env["max_num_m_blocks"]
        assert args["sorted_token_ids"].numel() >= max_num_blocks(T * k, E_, unit) * unit
        assert args["num_valid_ids"].shape == (2,)
        # CK's checks: fp32 weights, int32 ids and mask, moe_buf rows a multiple of 16 bytes
        assert "topk_weights must be FP32" in aiter_src["sorting_cu"]
        assert args["topk_weights"].dtype == torch.float32
        assert 't.index_type == "int32"' in aiter_src["sorting_api"]
        assert args["topk_ids"].dtype == args["local_expert_mask"].dtype == torch.int32
        assert "must be multiple of 16" in aiter_src["sorting_api"]
        buf = args["moe_buf"]
        assert buf.shape[0] == T and buf.shape[1] * buf.element_size() % 16 == 0
        # out-of-range ids go to the extra expert E, which the mask leaves out
        kept = (ids >= 0) & (ids < E_)
        assert torch.equal(args["topk_ids"], torch.where(kept, ids, E_).to(torch.int32))
        assert args["num_experts"] == E_ + 1 and args["local_expert_mask"][E_] == 0
        want = [1] * E_ if mask is None else mask.int().tolist()
        assert args["local_expert_mask"][:E_].tolist() == want


def test_ck_padding_is_what_we_rewrite(aiter_src):
    """CK pads with MOE_SORTING_MOCK_ID(tokens, topk) = (topk << 24) | T, enabled by default."""
    assert re.search(r"#define CK_TILE_REFERENCE_MOE_SORTING_MOCK_ID 1", aiter_src["ck_config"])
    kernel = aiter_src["sorting_kernel"]
    assert re.search(r"\(\(token_id_\) & 0x00ffffff\) \| \(\(\(topk_id_\) & 0xff\) << 24\)", kernel)
    assert "MOE_SORTING_MOCK_ID(tokens, topk)" in kernel


@pytest.mark.parametrize("masked", [False, True])
def test_ck_output_made_contract_exact(masked):
    """CK-style output (padding (k << 24) | T, garbage tails, any order within an expert) -> the contract."""
    T, k, E_, unit = 23, 4, 9, 16
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, E_, (T, k), generator=gen)
    w = torch.rand(T, k, generator=gen)
    mask = (torch.arange(E_) % 3 != 0) if masked else None
    ref = moe_sorting_reference(ids, w, num_experts=E_, unit_size=unit, expert_mask=mask)
    used = int(ref.num_valid_ids[0])
    length = ref.sorted_ids.numel() + 3 * unit  # CK's buffers are longer
    sorted_ids = torch.full((length,), 0x5A5A5A5A, dtype=torch.int32)
    sorted_w = torch.full((length,), float("nan"))
    units = torch.full((length // unit,), 77, dtype=torch.int32)
    pad = (ref.sorted_ids == T)[:used]
    ck_ids = torch.where(pad, torch.tensor((k << 24) | T, dtype=torch.int32), ref.sorted_ids[:used])
    order = torch.arange(used)
    expert_of = ref.sorted_expert_ids.repeat_interleave(unit)[:used]
    for e in expert_of.unique().tolist():  # reverse each expert's entries: CK need not be stable
        where = ((expert_of == e) & ~pad).nonzero().flatten()
        order[where] = where.flip(0)
    sorted_ids[:used], sorted_w[:used] = ck_ids[order], ref.sorted_weights[:used][order]
    units[: used // unit] = ref.sorted_expert_ids[: used // unit]
    buffers = {
        "sorted_token_ids": sorted_ids,
        "sorted_weights": sorted_w,
        "sorted_expert_ids": units,
        "num_valid_ids": torch.tensor([used, T], dtype=torch.int32),
    }
    got = ak._to_contract(buffers, T, k, E_, unit)
    check_sorted_tokens(got, ids, w, num_experts=E_, unit_size=unit, expert_mask=mask)
    assert torch.equal(got.sorted_expert_ids, ref.sorted_expert_ids)


# ----------------------------------------------------------------------------- refusals (no aiter here)


def test_explain_says_aiter_is_not_installed():
    if ak.aiter_version() is not None:
        pytest.skip("aiter is installed here")
    plan = moe_plan(MoESpec(8, 2, 256, 128, dtype=torch.bfloat16), "gfx950")
    line = next(line for line in plan.explain().splitlines() if "amd.aiter.fused_moe" in line)
    assert "refused: aiter is not installed" in line
    request = SortingRequest("moe_sorting", 257, 9, 32, torch.int32)
    from moe_core.registry import get_registry

    reason = get_registry().get("amd.aiter.moe_sorting").refusal(request, DeviceInfo.parse("gfx950"))
    assert reason.startswith("aiter is not installed")
    assert "needs an amd device" in get_registry().get("amd.aiter.moe_sorting").refusal(
        request, DeviceInfo.parse("sm_90")
    )


def test_refusals_when_aiter_is_there(monkeypatch):
    """With aiter taken as present, what it cannot run is refused with the reason."""
    monkeypatch.setattr(ak, "aiter_refusal", lambda device: None)
    supports = ak._supports
    dev = DeviceInfo.parse("gfx950")
    assert supports(_spec("bf16"), dev) is None
    assert supports(_spec("fp8-block", ep_size=2, ep_rank=1), dev) is None
    assert "bf16 or fp16" in supports(MoESpec(4, 2, 256, 128, dtype=torch.float32), dev)
    static = QuantScheme("fp8", activation="fp8_per_tensor")  # per-channel weights
    assert "no mode for per-channel fp8 weights" in supports(MoESpec(4, 2, 256, 128, quant=static), dev)
    blocks = QuantScheme("fp8_block", block_shape=(64, 64))
    assert "128x128 blocks" in supports(MoESpec(4, 2, 256, 128, quant=blocks), dev)
    assert "multiples of 128" in supports(MoESpec(4, 2, 256, 96, quant="fp8_block"), dev)
    shuffled_map = MoESpec(4, 2, 256, 128, expert_map=(1, 0, -1, -1))
    assert "expert_map must be increasing" in supports(shuffled_map, dev)


def test_cli_plan_shows_amd_refusals(capsys):
    """moe plan on a simulated gfx950: the AMD kernels' refusals, one line each."""
    assert main(["plan", "--device", "gfx950", "--model", "gpt-oss-120b", "--quant", "mxfp4"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if "amd.aiter.fused_moe" in line)
    assert "refused: quant mxfp4 not supported (has bf16, fp16, fp8, fp8_block)" in line
    assert main(["plan", "--device", "gfx950", "--model", "deepseek-v3-tp8", "--quant", "fp8_block"]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if "amd.aiter.fused_moe" in line)
    if ak.aiter_version() is None:
        assert "refused: aiter is not installed" in line
