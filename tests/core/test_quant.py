"""Reference quantizers (moe_core.quant): codes, layouts, error bounds, idempotence, schemes.

Error bounds used below, derived from the formats (all checked per element,
in float64, against the element's own group scale ``s``):

- fp8 e4m3 has 3 mantissa bits: rounding ``x / s`` to the grid is off by at
  most half an ulp, ``2**-4 * |x / s|`` for normal values (``>= 2**-6``) and
  half the subnormal spacing ``2**-10`` below; so ``|deq - x| <= 2**-4 |x| +
  2**-10 s``, plus float32 slop (the divide and multiply, and the scale being
  ``amax / 448`` trimmed by < 2**-20, which may clamp the max by that much).
- e2m1 spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: rounding ``v = x / d``
  errs by at most ``max(|v|, 1) / 4``; above 6 it saturates to exactly ±6 d.
  mxfp4 has ``d = 2**e`` (exact arithmetic); nvfp4 ``d = float(scale) *
  global_scale`` (float32 slop added).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import ExpertWeights, MoEInputError, QuantScheme
from moe_core import quant as q
from moe_core.spec import QUANT_SCHEMES

# a few extra non-default variants next to every scheme's default
SCHEMES = [QuantScheme(name) for name in QUANT_SCHEMES] + [
    QuantScheme("fp8", weight_scale="per_tensor"),
    QuantScheme("fp8", activation="fp8_per_tensor"),
    QuantScheme("fp8_block", block_shape=(64, 32)),
    QuantScheme("mxfp4", activation="fp8_per_tensor"),
    QuantScheme("nvfp4", activation="none"),
]
ACT_SCHEMES = {
    "none": QuantScheme("bf16"),
    "fp8_per_token": QuantScheme("fp8"),
    "fp8_per_tensor": QuantScheme("fp8", activation="fp8_per_tensor"),
    "fp8_group": QuantScheme("fp8_block"),
    "nvfp4": QuantScheme("nvfp4"),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wide(*shape: int, seed: int, span: int = 8) -> torch.Tensor:
    """randn with every row scaled by 2**U{-span..span}: values over many binades."""
    gen = _gen(seed)
    rows = 2.0 ** torch.randint(-span, span + 1, (*shape[:-1], 1), generator=gen)
    return torch.randn(*shape, generator=gen) * rows


def _weights(seed: int, E: int = 3, H: int = 96, inter: int = 160) -> ExpertWeights:
    """High-precision canonical weights; H, I multiples of 32 but not of 128 (partial fp8 blocks)."""
    gen = _gen(seed + 1000)
    return ExpertWeights(
        w13=_wide(E, 2 * inter, H, seed=seed, span=3),
        w2=_wide(E, H, inter, seed=seed + 1, span=3),
        b13=torch.randn(E, 2 * inter, generator=gen).bfloat16(),
        b2=torch.randn(E, H, generator=gen),
    )


def _check_fp8_bound(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> None:
    """``s`` broadcast to x's shape; the fp8 bound of the module docstring, and that it is tight."""
    x, y, s = x.double(), y.double(), s.double().expand_as(x)
    bound = (2**-4 * x.abs() + 2**-10 * s) * (1 + 2**-16) + 448 * s * 2**-20
    err = (y - x).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    assert (err / bound).max() > 0.5  # really rounded to a 4-bit significand


def _check_fp8_scale(scale: torch.Tensor, amax: torch.Tensor) -> None:
    want = amax.double() / 448
    s = scale.double()
    nonzero = amax > 0
    assert (s[nonzero] <= want[nonzero]).all()
    assert (s[nonzero] >= want[nonzero] * (1 - 2**-20)).all()
    assert (s[~nonzero] == 1).all()


# -- e2m1 codes --------------------------------------------------------------------------------


def test_e2m1_table_decodes_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    want = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    got = q.e2m1_to_float(codes)
    assert got.dtype == torch.float32 and got.tolist() == want
    assert torch.signbit(got[8])  # code 8 is -0
    assert q.E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert (6.0, 448.0, torch.float8_e4m3fn) == (q.FP4_MAX, q.FP8_MAX, q.FP8_DTYPE)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0.0, 0),
        (0.25, 0),  # tie 0 | 0.5 -> even code 0
        (0.2500001, 1),
        (0.75, 2),  # tie 0.5 | 1 -> code 2
        (1.25, 2),  # tie 1 | 1.5 -> code 2
        (1.75, 4),  # tie 1.5 | 2 -> code 4
        (2.5, 4),  # tie 2 | 3 -> code 4
        (3.5, 6),  # tie 3 | 4 -> code 6
        (5.0, 6),  # tie 4 | 6 -> code 6
        (5.0001, 7),
        (6.0, 7),
        (7.0, 7),  # saturates
        (1e30, 7),
        (1.4, 3),
        (2.6, 5),
        (-0.75, 0x8 | 2),
        (-5.0, 0x8 | 6),
        (-7.0, 0x8 | 7),
        (-0.1, 0x8),  # rounds to -0, the sign is kept
        (-0.0, 0x8),
    ],
)
def test_float_to_e2m1_rounds_to_nearest_even(value, code):
    got = q.float_to_e2m1(torch.tensor([value]))
    assert got.dtype == torch.uint8 and got.item() == code


def test_float_to_e2m1_is_nearest_on_random_values():
    x = torch.randn(20_000, generator=_gen(1)) * 4
    got = q.e2m1_to_float(q.float_to_e2m1(x))
    grid = q.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    best = (x[:, None] - grid[None, :]).abs().min(dim=1).values
    inside = x.abs() <= 6
    assert torch.equal((got - x).abs()[inside], best[inside])
    assert (got[~inside] == 6 * x[~inside].sign()).all()
    assert torch.equal(torch.signbit(got), torch.signbit(x))
    # every representable value maps to itself
    assert torch.equal(q.float_to_e2m1(grid), torch.arange(16, dtype=torch.uint8))


def test_pack_e2m1_low_nibble_is_even_element():
    codes = torch.tensor([[0x1, 0x2, 0x3, 0x4, 0xF, 0x0], [0x8, 0x7, 0x0, 0xA, 0x5, 0x5]], dtype=torch.uint8)
    packed = q.pack_e2m1(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert packed.tolist() == [[0x21, 0x43, 0x0F], [0x78, 0xA0, 0x55]]
    assert torch.equal(q.unpack_e2m1(packed), codes)
    random = torch.randint(0, 16, (5, 7, 64), generator=_gen(2), dtype=torch.uint8)
    assert torch.equal(q.unpack_e2m1(q.pack_e2m1(random)), random)


# -- fp8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_fp8_weights_round_trip_bound(granularity):
    w = _wide(3, 40, 72, seed=3)
    qw, scale = q.quantize_fp8(w, granularity)
    assert qw.dtype == torch.float8_e4m3fn and qw.shape == w.shape and scale.dtype == torch.float32
    if granularity == "per_channel":
        assert scale.shape == (3, 40)
        _check_fp8_scale(scale, w.abs().amax(-1))
        s = scale[..., None]
    else:
        assert scale.shape == (3,)
        _check_fp8_scale(scale, w.abs().amax((-2, -1)))
        s = scale[:, None, None]
    assert torch.equal(qw, (w / s).clamp(-448, 448).to(torch.float8_e4m3fn))
    y = q.dequantize_fp8(qw, scale)
    assert y.dtype == torch.float32 and torch.equal(y, qw.float() * s)
    _check_fp8_bound(w, y, s)
    # one expert alone: a 2-D weight (0-d per-tensor scale) quantizes like its slice
    q2, s2 = q.quantize_fp8(w[1], granularity)
    assert s2.shape == scale.shape[1:] and torch.equal(s2, scale[1]) and torch.equal(q2, qw[1])


def test_fp8_block_odd_sizes():
    w = _wide(2, 200, 300, seed=4)
    qw, scale = q.quantize_fp8_block(w)
    assert qw.dtype == torch.float8_e4m3fn and qw.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 2, 3)
    # the block amaxes, with explicit slicing (partial edge blocks)
    for i in range(2):
        for j in range(3):
            tile = w[:, 128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            _check_fp8_scale(scale[:, i, j], tile.abs().amax((-2, -1)))
    s = scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :300]
    y = q.dequantize_fp8_block(qw, scale)
    assert y.dtype == torch.float32 and torch.equal(y, qw.float() * s)
    _check_fp8_bound(w, y, s)
    # a non-square block
    qb, sb = q.quantize_fp8_block(w, (64, 32))
    assert sb.shape == (2, 4, 10)
    _check_fp8_bound(
        w,
        q.dequantize_fp8_block(qb, sb, (64, 32)),
        sb.repeat_interleave(64, 1).repeat_interleave(32, 2)[:, :200, :300],
    )


def test_fp8_activation_quantizers():
    x = _wide(33, 300, seed=5)
    qx, scale = q.quantize_fp8_per_token(x)
    assert qx.dtype == torch.float8_e4m3fn and qx.shape == (33, 300) and scale.shape == (33, 1)
    _check_fp8_scale(scale, x.abs().amax(-1, keepdim=True))
    _check_fp8_bound(x, q.dequantize_fp8(qx, scale), scale)

    qg, sg = q.quantize_fp8_group(x, 128)
    assert qg.dtype == torch.float8_e4m3fn and qg.shape == (33, 300) and sg.shape == (33, 3)
    want = torch.stack([x[:, 128 * j : 128 * (j + 1)].abs().amax(-1) for j in range(3)], -1)
    _check_fp8_scale(sg, want)
    s = sg.repeat_interleave(128, -1)[:, :300]
    _check_fp8_bound(x, q.dequantize_fp8_group(qg, sg, 128), s)

    static = torch.tensor(0.01)
    qs = q.quantize_fp8_per_tensor(x, static)
    assert qs.dtype == torch.float8_e4m3fn and qs.shape == x.shape
    assert torch.equal(qs, (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn))
    assert torch.equal(q.quantize_fp8_per_tensor(x, static.reshape(1)), qs)
    y = q.dequantize_fp8(qs, static)
    assert y.abs().max() <= 4.48 * (1 + 2**-20)  # saturated at 448 * scale
    assert torch.equal(q.dequantize_fp8(qs, static.reshape(1)), y)


def test_fp8_representable_tensor_quantizes_to_itself():
    gen = _gen(6)
    grid = torch.randn(8, 64, generator=gen).clamp(-448, 448).to(torch.float8_e4m3fn)
    grid[:, 0] = 448.0  # the row max hits the top of the range
    scale = 2.0 ** torch.randint(-10, 10, (8,), generator=gen).float()
    qw, s = q.quantize_fp8(grid.float() * scale[:, None])
    assert torch.equal(s, scale)
    assert torch.equal(qw.view(torch.uint8), grid.view(torch.uint8))


# -- mxfp4 -------------------------------------------------------------------------------------


def test_mxfp4_hand_example():
    w = torch.zeros(1, 128)
    w[0, :4] = torch.tensor([5.0, -1.0, 0.3, 2.5])  # amax 5: exponent floor(log2 5) - 2 = 0
    w[0, 32:35] = torch.tensor([0.75, 0.1, -0.0625])  # amax 0.75: exponent -1 - 2 = -3
    # block 2 all zero; block 3 amax 2**-140: exponent clamped to -127
    w[0, 96] = 2.0**-140
    packed, scale = q.quantize_mxfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 64)
    assert scale.dtype == torch.uint8 and scale.shape == (1, 4)
    assert scale.tolist() == [[127, 124, 0, 0]]
    # 5 -> 4 (tie to even, code 6), -1 -> 0xA, 0.3 -> 0.5 (code 1), 2.5 -> 2 (tie, code 4)
    assert packed[0, :2].tolist() == [0x6 | 0xA << 4, 0x1 | 0x4 << 4]
    # 0.75 * 8 = 6 (code 7), 0.1 * 8 = 0.8 -> 1 (code 2), -0.0625 * 8 = -0.5 (code 9)
    assert packed[0, 16:18].tolist() == [0x7 | 0x2 << 4, 0x9]
    assert (packed[0, 32:] == 0).all()
    y = q.dequantize_mxfp4(packed, scale)
    assert y.dtype == torch.float32 and y.shape == (1, 128)
    assert y[0, :4].tolist() == [4.0, -1.0, 0.5, 2.0]
    assert y[0, 32:35].tolist() == [0.75, 0.125, -0.0625]
    assert (y[0, 64:] == 0).all()
    decoded = q.e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert decoded[:6].tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    assert math.isnan(decoded[6].item())


def test_mxfp4_round_trip_bound():
    w = _wide(3, 50, 320, seed=7)
    packed, scale = q.quantize_mxfp4(w)
    assert packed.shape == (3, 50, 160) and scale.shape == (3, 50, 10)
    blocks = w.double().unflatten(-1, (10, 32))
    amax = blocks.abs().amax(-1)
    assert torch.equal(scale.long() - 127, (torch.floor(torch.log2(amax)) - 2).long())
    d = (2.0 ** (scale.double() - 127))[..., None]
    y = q.dequantize_mxfp4(packed, scale).double().unflatten(-1, (10, 32))
    v = blocks / d
    sat = v.abs() > 6
    assert sat.any() and (y[sat] == 6 * d.expand_as(y)[sat] * v[sat].sign()).all()
    err, bound = (y - blocks).abs(), torch.maximum(v.abs(), torch.ones_like(v)) * d / 4
    assert (err[~sat] <= bound[~sat]).all()
    assert (err / bound).max() > 0.5


# -- nvfp4 -------------------------------------------------------------------------------------


def test_nvfp4_hand_example_and_global_scale_convention():
    v0 = [6.0, -3.0, 1.5, 0.5, -1.0, 4.0, 2.0]  # block 0, block scale 2.0
    v1 = [6.0, 3.0, -0.5]  # block 1, block scale 0.75
    g = 0.25
    w = torch.zeros(1, 1, 32)
    w[0, 0, : len(v0)] = torch.tensor(v0) * 2.0 * g
    w[0, 0, 16 : 16 + len(v1)] = torch.tensor(v1) * 0.75 * g
    packed, scale, gs = q.quantize_nvfp4(w, torch.tensor([g]))
    assert packed.dtype == torch.uint8 and packed.shape == (1, 1, 16)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (1, 1, 2)
    assert gs.dtype == torch.float32 and gs.shape == (1,) and gs.item() == g
    assert scale.float().tolist() == [[[2.0, 0.75]]]
    assert packed[0, 0, :4].tolist() == [0x7 | 0xD << 4, 0x3 | 0x1 << 4, 0xA | 0x6 << 4, 0x4]
    assert packed[0, 0, 8:10].tolist() == [0x7 | 0x5 << 4, 0x9]
    # our convention: dequantized = e2m1 * scale * global_scale (FlashInfer's global_sf = 1 / g)
    y = q.dequantize_nvfp4(packed, scale, gs)
    assert y.dtype == torch.float32 and torch.equal(y, w)
    # default global scale: amax / (448 * 6); the block holding the amax gets scale 448
    packed, scale, gs = q.quantize_nvfp4(w)
    assert 3.0 / 2688 * (1 - 2**-18) <= gs.item() <= 3.0 / 2688
    assert scale[0, 0, 0].float().item() == 448.0
    assert torch.equal(q.dequantize_nvfp4(packed, scale, gs)[0, 0, 0], torch.tensor(6 * 448.0) * gs[0])


def test_nvfp4_round_trip_bound():
    w = _wide(3, 40, 160, seed=8)
    packed, scale, gs = q.quantize_nvfp4(w)
    assert packed.shape == (3, 40, 80) and scale.shape == (3, 40, 10) and gs.shape == (3,)
    amax = w.abs().amax((-2, -1)).double()
    assert (gs <= amax / 2688).all() and (gs >= amax / 2688 * (1 - 2**-18)).all()
    blocks = w.double().unflatten(-1, (10, 16))
    t = (blocks.abs().amax(-1) / 6 / gs.double()[:, None, None]).clamp(max=448)
    assert ((scale.double() - t).abs() <= 2**-4 * t + 2**-10).all()  # e4m3 rounding of the block scale
    d = (scale.float() * gs[:, None, None]).double()[..., None]
    y = q.dequantize_nvfp4(packed, scale, gs).double().unflatten(-1, (10, 16))
    v = blocks / d
    sat = v.abs() > 6 * (1 + 2**-20)
    assert sat.any()
    want_sat = ((6 * scale.float()) * gs[:, None, None]).double()[..., None].expand_as(y)
    assert (y[sat] == want_sat[sat] * v[sat].sign()).all()
    err = (y - blocks).abs()
    bound = torch.maximum(v.abs(), torch.ones_like(v)) * d / 4 * (1 + 2**-20)
    assert (err[~sat] <= bound[~sat]).all()
    assert (err / bound).max() > 0.5


def test_nvfp4_activation_global_scale():
    x = _wide(7, 64, seed=9, span=3)
    packed, scale, gs = q.quantize_nvfp4_activation(x)
    assert packed.shape == (7, 32) and scale.shape == (7, 4) and scale.dtype == torch.float8_e4m3fn
    assert gs.shape == () and gs.dtype == torch.float32
    assert x.abs().max() / 2688 * (1 - 2**-18) <= gs <= x.abs().max() / 2688
    static = torch.tensor([0.003])
    p2, s2, g2 = q.quantize_nvfp4_activation(x, static)
    assert g2.shape == () and g2.item() == static.item()
    w_p, w_s, _ = q.quantize_nvfp4(x, static)  # same math as a weight with a given global scale
    assert torch.equal(p2, w_p) and torch.equal(s2.view(torch.uint8), w_s.view(torch.uint8))


# -- idempotence -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_dequantized_weights_quantize_to_themselves(scheme):
    """dequantize(quantize(x)) is a fixed point for every scheme (bit-exact)."""
    w = _wide(3, 200, 320, seed=10, span=5)  # nvfp4 needs normal block scales (see quant docs)
    qw, s, g = q.quantize_tensor(w, scheme)
    y = q.dequantize_tensor(qw, s, g, scheme)
    if scheme.name == "nvfp4":
        assert (s.float()[s.float() > 0] >= 2**-6).all()
    q2, s2, g2 = q.quantize_tensor(y, scheme)
    assert torch.equal(q.dequantize_tensor(q2, s2, g2, scheme), y)
    if scheme.is_quantized:
        assert torch.equal(q2.view(torch.uint8), qw.view(torch.uint8))
        assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))
        if scheme.name in ("fp8", "fp8_block"):
            # the stored scales are also what a plain amax / 448 gives
            assert torch.equal(s2, s)


def test_fp8_scale_is_fixed_point_of_plain_amax_over_448():
    w = _wide(5, 64, 100, seed=11)
    y = q.dequantize_fp8(*q.quantize_fp8(w))
    _, scale = q.quantize_fp8(w)
    assert torch.equal(y.abs().amax(-1) / 448, scale)


@pytest.mark.parametrize("mode", sorted(ACT_SCHEMES))
def test_fake_quantize_activation_is_idempotent(mode):
    x = _wide(17, 256, seed=12, span=3)
    static = torch.tensor(0.02)
    once = q.fake_quantize_activation(x, ACT_SCHEMES[mode], static)
    assert torch.equal(q.fake_quantize_activation(once, ACT_SCHEMES[mode], static), once)
    if mode == "nvfp4":  # dynamic global scale too
        once = q.fake_quantize_activation(x, ACT_SCHEMES[mode])
        assert torch.equal(q.fake_quantize_activation(once, ACT_SCHEMES[mode]), once)


# -- zeros -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_all_zero_weights_dequantize_to_exact_zeros(scheme):
    w = torch.zeros(2, 64, 96)
    w[1, 3, 5] = 1.5  # one expert nonzero, many zero rows and blocks
    qw, s, g = q.quantize_tensor(w, scheme)
    y = q.dequantize_tensor(qw, s, g, scheme)
    assert torch.isfinite(y).all() and torch.equal(y[w == 0], w[w == 0])
    assert abs(y[1, 3, 5].item() - 1.5) <= 1.5 * 2**-4  # off by the trimmed scale at most
    if scheme.name in ("fp8", "fp8_block"):
        assert s[0].eq(1).all()  # documented: zero groups get scale 1
    elif scheme.name == "mxfp4":
        assert s[0].eq(0).all()  # smallest exponent, 2**-127
    elif scheme.name == "nvfp4":
        assert g[0] == 1 and s[0].float().eq(0).all()


# -- schemes -----------------------------------------------------------------------------------


def _standalone(w: torch.Tensor, scheme: QuantScheme):
    """(q, scale, global_scale) from the format functions directly."""
    if not scheme.is_quantized:
        return w.to(scheme.weight_dtype), None, None
    if scheme.name == "fp8":
        return (*q.quantize_fp8(w, scheme.weight_scale), None)
    if scheme.name == "fp8_block":
        return (*q.quantize_fp8_block(w, scheme.block_shape), None)
    if scheme.name == "mxfp4":
        return (*q.quantize_mxfp4(w), None)
    return q.quantize_nvfp4(w)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _scale_shapes(scheme: QuantScheme, E: int, N: int, K: int):
    """(weight dtype, weight shape, scale dtype, scale shape, global shape) per the ExpertWeights docs."""
    if not scheme.is_quantized:
        return scheme.weight_dtype, (E, N, K), None, None, None
    if scheme.name == "fp8":
        shape = (E,) if scheme.weight_scale == "per_tensor" else (E, N)
        return torch.float8_e4m3fn, (E, N, K), torch.float32, shape, None
    if scheme.name == "fp8_block":
        bn, bk = scheme.block_shape
        return torch.float8_e4m3fn, (E, N, K), torch.float32, (E, -(-N // bn), -(-K // bk)), None
    if scheme.name == "mxfp4":
        return torch.uint8, (E, N, K // 2), torch.uint8, (E, N, K // 32), None
    return torch.uint8, (E, N, K // 2), torch.float8_e4m3fn, (E, N, K // 16), (E,)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantize_weights_matches_standalone(scheme):
    weights = _weights(seed=13)
    a13 = torch.tensor(0.01) if scheme.static_activation_scale else None
    weights.a13_scale = a13
    out = q.quantize_weights(weights, scheme)
    assert out.b13 is weights.b13 and out.b2 is weights.b2  # biases kept as given
    assert out.a13_scale is a13 and out.a2_scale is None  # activation scales never invented
    for name in ("w13", "w2"):
        w = getattr(weights, name)
        want = _standalone(w, scheme)
        got = (getattr(out, name), getattr(out, f"{name}_scale"), getattr(out, f"{name}_global_scale"))
        assert all(_same(a, b) for a, b in zip(got, want))
        wdtype, wshape, sdtype, sshape, gshape = _scale_shapes(scheme, *w.shape)
        assert got[0].dtype == wdtype == scheme.weight_dtype and got[0].shape == wshape
        assert (got[1] is None) if sdtype is None else (got[1].dtype == sdtype and got[1].shape == sshape)
        assert (
            (got[2] is None) if gshape is None else (got[2].dtype == torch.float32 and got[2].shape == gshape)
        )
    assert weights.w13.dtype == torch.float32  # the input is untouched

    deq = q.dequantize_weights(out, scheme)
    assert deq.w13.dtype == deq.w2.dtype == deq.b13.dtype == deq.b2.dtype == torch.float32
    assert deq.w13_scale is deq.w2_scale is deq.w13_global_scale is deq.w2_global_scale is None
    assert deq.a13_scale is a13
    assert torch.equal(deq.b13, weights.b13.float())
    for name in ("w13", "w2"):
        got = getattr(deq, name)
        qw, s, g = _standalone(getattr(weights, name), scheme)
        if scheme.name == "fp8":
            want = q.dequantize_fp8(qw, s)
        elif scheme.name == "fp8_block":
            want = q.dequantize_fp8_block(qw, s, scheme.block_shape)
        elif scheme.name == "mxfp4":
            want = q.dequantize_mxfp4(qw, s)
        elif scheme.name == "nvfp4":
            want = q.dequantize_nvfp4(qw, s, g)
        else:
            want = qw.float()
        assert torch.equal(got, want)
        # and one expert at a time, from the slices (0-d scale for fp8 per-tensor)
        for e in range(got.shape[0]):
            s_e = getattr(out, f"{name}_scale")
            g_e = getattr(out, f"{name}_global_scale")
            one = q.dequantize_tensor(
                getattr(out, name)[e],
                s_e[e] if s_e is not None else None,
                g_e[e] if g_e is not None else None,
                scheme,
            )
            assert torch.equal(one, got[e])


def test_quantize_weights_accepts_scheme_names():
    weights = _weights(seed=14)
    by_name = q.quantize_weights(weights, "mxfp4")
    by_scheme = q.quantize_weights(weights, QuantScheme("mxfp4"))
    assert torch.equal(by_name.w13, by_scheme.w13) and torch.equal(by_name.w2_scale, by_scheme.w2_scale)


def test_is_high_precision():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert q.is_high_precision(torch.zeros(2, dtype=dtype))
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int32, torch.bool):
        assert not q.is_high_precision(torch.zeros(2, dtype=dtype))


# -- activations -------------------------------------------------------------------------------


def test_fake_quantize_activation_modes():
    x = _wide(9, 256, seed=15, span=3).bfloat16()
    x32 = x.float()
    none = q.fake_quantize_activation(x, ACT_SCHEMES["none"])
    assert none.dtype == torch.float32 and torch.equal(none, x32)

    got = q.fake_quantize_activation(x, ACT_SCHEMES["fp8_per_token"])
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, q.dequantize_fp8(*q.quantize_fp8_per_token(x32)))
    assert not torch.equal(got, x32)

    static = torch.tensor([0.005])
    got = q.fake_quantize_activation(x, ACT_SCHEMES["fp8_per_tensor"], static)
    assert torch.equal(got, q.quantize_fp8_per_tensor(x32, static).float() * 0.005)
    with pytest.raises(MoEInputError, match="static activation scale"):
        q.fake_quantize_activation(x, ACT_SCHEMES["fp8_per_tensor"])
    with pytest.raises(MoEInputError):
        q.fake_quantize_activation(x, QuantScheme("mxfp4", activation="fp8_per_tensor"))

    got = q.fake_quantize_activation(x, ACT_SCHEMES["fp8_group"])
    assert torch.equal(got, q.dequantize_fp8_group(*q.quantize_fp8_group(x32, 128), 128))
    narrow = q.fake_quantize_activation(x, QuantScheme("fp8_block", block_shape=(128, 64)))
    assert torch.equal(narrow, q.dequantize_fp8_group(*q.quantize_fp8_group(x32, 64), 64))
    assert not torch.equal(narrow, got)

    got = q.fake_quantize_activation(x, ACT_SCHEMES["nvfp4"])
    assert torch.equal(got, q.dequantize_nvfp4(*q.quantize_nvfp4_activation(x32)))
    gs = torch.tensor(0.002)
    got = q.fake_quantize_activation(x, ACT_SCHEMES["nvfp4"], gs)
    assert torch.equal(got, q.dequantize_nvfp4(*q.quantize_nvfp4_activation(x32, gs)))
    assert not torch.equal(got, q.fake_quantize_activation(x, ACT_SCHEMES["nvfp4"]))
    # W4A16 nvfp4 leaves activations alone
    assert torch.equal(q.fake_quantize_activation(x, QuantScheme("nvfp4", activation="none")), x32)


def test_fake_quantize_activation_float64_and_empty():
    x = torch.randn(4, 64, generator=_gen(16), dtype=torch.float64)
    for scheme in ACT_SCHEMES.values():
        out = q.fake_quantize_activation(x, scheme, torch.tensor(0.01))
        assert out.dtype == torch.float32 and out.shape == x.shape
        empty = q.fake_quantize_activation(x[:0], scheme, torch.tensor(0.01))
        assert empty.shape == (0, 64) and empty.dtype == torch.float32
    assert q.fake_quantize_activation(x[:0], ACT_SCHEMES["nvfp4"]).shape == (0, 64)


# -- bad inputs --------------------------------------------------------------------------------

_F8 = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
_U8 = torch.zeros(4, 32, dtype=torch.uint8)

BAD = {
    "mxfp4 K % 32": lambda: q.quantize_mxfp4(torch.randn(4, 48)),
    "nvfp4 K % 16": lambda: q.quantize_nvfp4(torch.randn(2, 4, 24)),
    "nvfp4 act K % 16": lambda: q.quantize_nvfp4_activation(torch.randn(4, 40)),
    "nvfp4 1-D weight": lambda: q.quantize_nvfp4(torch.randn(32)),
    "nvfp4 global shape": lambda: q.quantize_nvfp4(torch.randn(3, 4, 32), torch.ones(2)),
    "nvfp4 act global shape": lambda: q.quantize_nvfp4_activation(torch.randn(4, 32), torch.ones(2)),
    "fp8 granularity": lambda: q.quantize_fp8(torch.randn(2, 4, 8), "per_block"),
    "fp8 int input": lambda: q.quantize_fp8(torch.ones(2, 4, 8, dtype=torch.int32)),
    "fp8 1-D weight": lambda: q.quantize_fp8(torch.randn(8)),
    "fp8 block shape": lambda: q.quantize_fp8_block(torch.randn(4, 8), (0, 128)),
    "fp8 deq dtype": lambda: q.dequantize_fp8(torch.zeros(4, 64), torch.ones(4)),
    "fp8 deq scale shape": lambda: q.dequantize_fp8(_F8, torch.ones(3)),
    "fp8 block deq scale shape": lambda: q.dequantize_fp8_block(_F8, torch.ones(1, 3), (128, 32)),
    "fp8 group deq scale shape": lambda: q.dequantize_fp8_group(_F8, torch.ones(4, 2), 16),
    "fp8 static scale shape": lambda: q.quantize_fp8_per_tensor(torch.randn(4, 8), torch.ones(2)),
    "fp8 static scale type": lambda: q.quantize_fp8_per_tensor(torch.randn(4, 8), 0.5),
    "mxfp4 deq scale shape": lambda: q.dequantize_mxfp4(_U8, torch.zeros(4, 1, dtype=torch.uint8)),
    "mxfp4 deq scale dtype": lambda: q.dequantize_mxfp4(_U8, torch.zeros(4, 2)),
    "mxfp4 deq K % 32": lambda: q.dequantize_mxfp4(_U8[:, :24], torch.zeros(4, 1, dtype=torch.uint8)),
    "nvfp4 deq scale dtype": lambda: q.dequantize_nvfp4(
        _U8, torch.zeros(4, 4, dtype=torch.uint8), torch.ones(())
    ),
    "nvfp4 deq scale shape": lambda: q.dequantize_nvfp4(_U8, _F8[:, :3], torch.ones(())),
    "nvfp4 deq global shape": lambda: q.dequantize_nvfp4(_U8, _F8[:, :4], torch.ones(4)),
    "pack odd": lambda: q.pack_e2m1(torch.zeros(3, dtype=torch.uint8)),
    "pack dtype": lambda: q.pack_e2m1(torch.zeros(4, dtype=torch.int32)),
    "unpack dtype": lambda: q.unpack_e2m1(torch.zeros(4)),
    "decode dtype": lambda: q.e2m1_to_float(torch.zeros(4, dtype=torch.int64)),
    "encode int": lambda: q.float_to_e2m1(torch.zeros(4, dtype=torch.int64)),
    "requantize": lambda: q.quantize_weights(q.quantize_weights(_weights(seed=0), "fp8"), "fp8"),
    "deq wrong dtype": lambda: q.dequantize_tensor(_U8, torch.ones(4), None, QuantScheme("fp8")),
    "deq hp as quantized": lambda: q.dequantize_tensor(torch.randn(4, 64), torch.ones(4), None, "fp8"),
    "deq fp8 as bf16": lambda: q.dequantize_tensor(_F8, None, None, QuantScheme("bf16")),
    "deq no scale": lambda: q.dequantize_tensor(_F8, None, None, QuantScheme("fp8")),
    "deq no global": lambda: q.dequantize_tensor(_U8, _F8[:, :4], None, QuantScheme("nvfp4")),
    "bad scheme": lambda: q.quantize_tensor(torch.randn(4, 32), 3),
    "unknown scheme": lambda: q.quantize_tensor(torch.randn(4, 32), "int4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise(case):
    with pytest.raises(MoEInputError):
        BAD[case]()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_gpu_matches_cpu_bit_for_bit(scheme):
    """Same codes and scales on the GPU (CUDA divides by a Python scalar via its reciprocal)."""
    w = _wide(3, 200, 320, seed=17)
    w[0, :5] = 0
    cpu = q.quantize_tensor(w, scheme)
    gpu = q.quantize_tensor(w.cuda(), scheme)
    assert all(_same(a, None if b is None else b.cpu()) for a, b in zip(cpu, gpu))
    assert torch.equal(q.dequantize_tensor(*gpu, scheme).cpu(), q.dequantize_tensor(*cpu, scheme))
    x = _wide(33, 320, seed=18)
    static = torch.tensor(0.01)
    want = q.fake_quantize_activation(x, scheme, static)
    assert torch.equal(q.fake_quantize_activation(x.cuda(), scheme, static).cpu(), want)


@pytest.mark.parametrize("name", ["mxfp4", "fp8_block"])
def test_quantize_tensor_in_expert_chunks_is_exact(name, monkeypatch):
    """Large block-scaled weights are quantized a few experts at a time: same bits as in one go."""
    w = torch.randn(5, 128, 256) * torch.logspace(-3, 1, 5)[:, None, None]
    whole = q.quantize_tensor(w, name)
    for chunk in (2 * 128 * 256, 1000):  # two experts per chunk; one expert over the bound: one each
        monkeypatch.setattr(q, "_CHUNK_ELEMENTS", chunk)
        chunked = q.quantize_tensor(w, name)
        for a, b in zip(whole[:2], chunked[:2]):
            assert torch.equal(a, b)
