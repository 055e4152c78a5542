"""The NumPy reference of the packed format (tinyzq/quant/packing.py) against docs/FORMAT.md.

These tests check the executable spec itself: the byte layout written out by hand from the
FORMAT.md table, round trips, the dequantization formula, the activation quantizer's rounding
rules, and the int8-activation product against the exact product within FORMAT.md's bound.
The C kernels are compared with this reference in test_kernels.py.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinyzq.quant import packing as P

SETTINGS = settings(max_examples=50, deadline=None)
BITS = (2, 3, 4, 8)


@st.composite
def layouts(draw, max_blocks=12):
    """(bits, rows, cols, group) with cols % 32 == 0 and group | cols, group % 32 == 0."""
    bits = draw(st.sampled_from(BITS))
    nblocks = draw(st.integers(1, max_blocks))
    cols = 32 * nblocks
    bpg = draw(st.sampled_from([k for k in range(1, nblocks + 1) if nblocks % k == 0]))
    rows = draw(st.integers(1, 12))
    return bits, rows, cols, 32 * bpg


def random_codes(rng, rows, cols, bits):
    return rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)


# ------------------------------------------------------------------ layout, written out by hand

def test_layout_4bit_low_nibble_first():
    q = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    c = P.pack(q, 4)
    assert c.shape == (1, 16)
    for k in range(16):
        assert c[0, k] == (q[0, 2 * k] | (q[0, 2 * k + 1] << 4))
    assert c[0, 0] == 0x10 and c[0, 1] == 0x32


def test_layout_2bit():
    q = (np.arange(64, dtype=np.uint8) % 4).reshape(1, 64)
    c = P.pack(q, 2)
    assert c.shape == (1, 16)
    # q = 0,1,2,3 repeating -> every byte is 0 | 1<<2 | 2<<4 | 3<<6 = 0b11100100
    assert np.all(c == 0b11100100)
    q2 = np.zeros((1, 32), dtype=np.uint8)
    q2[0, 5] = 3  # byte 1, position 1
    assert P.pack(q2, 2)[0].tolist() == [0, 3 << 2] + [0] * 6


def test_layout_3bit_planes():
    cols = 64
    q = np.zeros((1, cols), dtype=np.uint8)
    q[0, 0] = 7    # low bits 3 in byte 0, bit 2 in plane byte 0 bit 0
    q[0, 9] = 4    # low bits 0, bit 2 in plane byte 1 bit 1
    q[0, 62] = 5   # low bits 1 at byte 15 position 2, bit 2 in plane byte 7 bit 6
    c = P.pack(q, 3)
    assert c.shape == (1, cols * 3 // 8)
    low, plane = c[0, : cols // 4], c[0, cols // 4:]
    assert low[0] == 3 and low[2] == 0 and low[15] == 1 << 4
    assert plane.tolist() == [1, 2, 0, 0, 0, 0, 0, 1 << 6]
    assert np.array_equal(P.unpack(c, 3, cols), q)


def test_layout_8bit_is_identity():
    q = np.arange(64, dtype=np.uint8).reshape(2, 32) * 3
    assert np.array_equal(P.pack(q, 8), q)


@SETTINGS
@given(layouts(), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(layout, seed):
    bits, rows, cols, _ = layout
    q = random_codes(np.random.default_rng(seed), rows, cols, bits)
    c = P.pack(q, bits)
    assert c.dtype == np.uint8 and c.shape == (rows, cols * bits // 8)
    assert np.array_equal(P.unpack(c, bits, cols), q)
    # rows are independent and contiguous: packing a row alone gives the same bytes
    assert np.array_equal(P.pack(q[-1:], bits), c[-1:])


@SETTINGS
@given(layouts(), st.integers(0, 2**32 - 1))
def test_dequantize_formula(layout, seed):
    bits, rows, cols, group = layout
    rng = np.random.default_rng(seed)
    q = random_codes(rng, rows, cols, bits)
    s = rng.uniform(-0.2, 0.2, (rows, cols // group)).astype(np.float32)
    z = rng.uniform(0, (1 << bits) - 1, (rows, cols // group)).astype(np.float32)
    W = P.dequantize(P.pack(q, bits), s, z, bits, group)
    assert W.dtype == np.float32 and W.shape == (rows, cols)
    for o in range(rows):
        for j in range(0, cols, 7):
            expect = np.float32(s[o, j // group]) * (np.float32(q[o, j]) - np.float32(z[o, j // group]))
            assert W[o, j] == expect


# ------------------------------------------------------------------ activation quantizer

def test_quantize_activations_rounds_half_away_from_zero():
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 127.0  # d = 1, 1/d = 1: x * (1/d) is exact
    halves = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, -126.5]
    x[0, 1:1 + len(halves)] = halves
    xi, d = P.quantize_activations(x)
    assert d[0, 0] == np.float32(1)
    assert xi[0, :1 + len(halves)].tolist() == [127, 1, -1, 2, -2, 3, -3, 0, 0, 127, -127]


def test_quantize_activations_zero_and_subnormal_blocks():
    x = np.zeros((2, 64), dtype=np.float32)
    x[0, 32] = 1e-40           # subnormal max: d is subnormal and 1/d overflows to inf
    x[0, 33] = -1e-40
    x[1, :32] = np.float32(3.0)  # constant block
    xi, d = P.quantize_activations(x)
    assert d[0, 0] == 0 and np.all(xi[0, :32] == 0)
    assert np.all(xi[0, 34:] == 0) and xi[0, 32] == 127 and xi[0, 33] == -127
    assert np.all(xi[1, :32] == 127) and d[1, 0] == np.float32(3.0) / np.float32(127)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**32 - 1), st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_quantize_activations_properties(n, nblocks, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 32 * nblocks)) * scale).astype(np.float32)
    xi, d = P.quantize_activations(x)
    assert xi.dtype == np.int8 and d.dtype == np.float32 and d.shape == (n, nblocks)
    assert xi.min() >= -127 and xi.max() <= 127
    xb = x.reshape(n, nblocks, 32)
    assert np.array_equal(d, np.abs(xb).max(-1) / np.float32(127))
    # the largest element of every nonzero block maps to +-127, and |x - d*xi| <= d/2 (+ rounding)
    err = np.abs(xb.astype(np.float64) - d[..., None].astype(np.float64) * xi.reshape(n, nblocks, 32))
    assert np.all(err <= d[..., None] * (0.5 + 1e-5))
    assert np.all(np.abs(xi.reshape(n, nblocks, 32)).max(-1)[d > 0] == 127)


# ------------------------------------------------------------------ the int8-activation product

def _case(rng, bits, rows, cols, group, n):
    q = random_codes(rng, rows, cols, bits)
    s = rng.uniform(0.001, 0.05, (rows, cols // group)).astype(np.float32) * rng.choice([-1, 1], (rows, cols // group)).astype(np.float32)
    z = rng.uniform(0, (1 << bits) - 1, (rows, cols // group)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32) * rng.uniform(0.1, 10, (n, 1)).astype(np.float32)
    return q, P.pack(q, bits), s, z, x


@SETTINGS
@given(layouts(), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_qmatmul_ref_within_format_bound(layout, n, seed):
    """|qmatmul - x @ W.T| <= sum_b (d_b/2) sum_{j in b} |W[o,j]| (FORMAT.md), plus fp32 rounding."""
    bits, rows, cols, group = layout
    rng = np.random.default_rng(seed)
    q, c, s, z, x = _case(rng, bits, rows, cols, group, n)
    W = P.dequantize(c, s, z, bits, group)
    y = P.qmatmul_ref(x, c, s, z, bits, group)
    assert y.dtype == np.float32 and y.shape == (n, rows)
    exact = x.astype(np.float64) @ W.astype(np.float64).T
    bound = P.error_bound(x, W)
    mag = np.abs(x).astype(np.float64) @ np.abs(W).astype(np.float64).T
    sz = (np.abs(s).repeat(group, 1) * (q + np.abs(z).repeat(group, 1))).astype(np.float64)
    slack = 1e-5 * (np.abs(x).astype(np.float64) @ sz.T) + 1e-6 * mag
    assert np.all(np.abs(y - exact) <= bound + slack)


def test_qmatmul_ref_exact_when_activations_are_on_the_grid():
    """If x is already d*xi for integer xi, rounding is exact and only fp32 accumulation remains."""
    rng = np.random.default_rng(1)
    bits, rows, cols, group, n = 4, 16, 128, 64, 3
    q, c, s, z, _ = _case(rng, bits, rows, cols, group, n)
    xi = rng.integers(-127, 128, (n, cols)).astype(np.float32)
    xi[:, ::32] = 127  # every block's max is 127 -> d = 1/8 exactly below
    x = xi * np.float32(0.125)
    W = P.dequantize(c, s, z, bits, group)
    y = P.qmatmul_ref(x, c, s, z, bits, group)
    exact = x.astype(np.float64) @ W.astype(np.float64).T
    mag = np.abs(x).astype(np.float64) @ (np.abs(s).repeat(group, 1) * (q + np.abs(z).repeat(group, 1))).T
    assert np.all(np.abs(y - exact) <= 1e-5 * mag)


def test_error_bound_is_attained_in_order_of_magnitude():
    """The bound is not vacuous: random activations typically use a sizeable fraction of it."""
    rng = np.random.default_rng(2)
    q, c, s, z, x = _case(rng, 2, 64, 256, 64, 4)
    W = P.dequantize(c, s, z, 2, 64)
    err = np.abs(P.qmatmul_ref(x, c, s, z, 2, 64) - x.astype(np.float64) @ W.astype(np.float64).T)
    assert err.max() > 1e-3 * P.error_bound(x, W).max()


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("call, match", [
    (lambda: P.pack(np.zeros((2, 32), np.uint8), 5), "bits"),
    (lambda: P.pack(np.zeros((2, 48), np.uint8), 4), "multiple of 32"),
    (lambda: P.pack(np.full((2, 32), 16, np.uint8), 4), "2\\*\\*4"),
    (lambda: P.pack(np.zeros((2, 32), np.int32), 4), "uint8"),
    (lambda: P.unpack(np.zeros((2, 15), np.uint8), 4, 32), "bytes per row"),
    (lambda: P.dequantize(np.zeros((2, 48), np.uint8), np.zeros((2, 1), np.float32),
                          np.zeros((2, 1), np.float32), 4, 64), "does not divide"),
    (lambda: P.dequantize(np.zeros((2, 48), np.uint8), np.zeros((2, 2), np.float32),
                          np.zeros((2, 2), np.float32), 4, 48), "multiple of 32"),
    (lambda: P.dequantize(np.zeros((2, 16), np.uint8), np.zeros((2, 2), np.float32),
                          np.zeros((2, 1), np.float32), 4, 32), "shape"),
    (lambda: P.quantize_activations(np.zeros((2, 32), np.float64)), "float32"),
])
def test_reference_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
