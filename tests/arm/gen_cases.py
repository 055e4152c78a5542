"""Golden cases for the cross-compiled C harness (tests/arm/harness.c), from the NumPy reference.

Every expected value comes from tinyzq/quant/packing.py (the executable form of docs/FORMAT.md),
never from the C code under test. The file is a sequence of little-endian records:

  weight record: int64[8] {MAGIC_W, bits, rows, cols, group, a, b, k}
                 q       uint8   [rows, cols]        codes before packing
                 codes   uint8   [rows, cols*bits/8] pack(q)
                 scales  float32 [rows, cols/group]
                 zeros   float32 [rows, cols/group]
                 W       float32 [rows, cols]        dequantize(...)   (exact in every variant)
                 ids     int64   [k]                 rows for gather_rows (W[ids] expected)
                 int64   nx                          activation sets that follow
  activation set: int64 n
                 x       float32 [n, cols]
                 xi      int8    [n, cols]           quantize_activations(x)  (exact)
                 d       float32 [n, cols/32]
                 y       float32 [n, rows]           qmatmul_ref(...)  (the C reference: exact)
                 tol     float32 [n, rows]           allowed |y - y_ref| of the SIMD variants
  rng record:    int64[5] {MAGIC_R, seed, tensor_id, n, dist}   (seed, tensor_id: uint64 bits)
                 z       float32 [n]   the random direction (tests/rng_reference.py, the NumPy reference of csrc/rng.c)
                 src     float32 [n]
                 add     float32 [n]   src + a z          (a = RNG_A, fp32)
                 mult    float32 [n]   src + (a z) src    (all bit for bit: rng.c uses no libm)
  attention record: int64[8] {MAGIC_A, B, nkv, g, T, hd, pos0, kvs}   (tzq_attn_prefill's arguments)
                 q       float32 [B, nkv, g, T, hd]   queries at positions pos0 .. pos0+T-1 (scaled)
                 k       float32 [B*nkv*kvs]          group (b, kh) at (b*nkv + kh)*kvs: rows 0 .. pos0+T-1
                 v       float32 [B*nkv*kvs]            of hd floats, then unused cache space (NaN)
                 out     float32 [B, nkv, g, T, hd]   float64 causal softmax(q.K^T) V, rounded to fp32
                 tol     float32                      allowed |out - out_ref| of every variant
  end: int64 MAGIC_END

`a, b` is a row range for dequantize(row_start=a, row_stop=b). The SIMD tolerance is the one of
tests/test_kernels.py: 1e-5 * sum_j |s| (|q| + |z|) |x_j| (the SIMD kernels reorder fp32
additions only); it is 0 for the "extremes" weights, where every path must be exact.

The attention records are KV-cache layouts: kvs >= (pos0+T)*hd, and whatever lies past position
pos0+T-1 in a group (unused cache rows, and a few floats more when kvs is not a multiple of hd) is
NaN, so reading it poisons the output. `out` is the float64 reference of tests/test_attention.py
(written again here, independently of the C code), and `tol` its tolerance: 2e-7 (8 + smax)
max(1, max|v|), smax = max |q.k| over the visible keys. The variants themselves must agree bit for
bit (the harness prints attn_hash, a hash of their outputs, for tests/test_arm_qemu.py to compare).

Usage: python tests/arm/gen_cases.py OUT.bin [--quick]
"""
from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tinyzq.quant import packing as P  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))  # tests/: the NumPy reference of csrc/rng.c
from rng_reference import ref_z  # noqa: E402
from attn_reference import reference as attention_reference  # noqa: E402

MAGIC_W = 0x575A5A54  # "TZZW"
MAGIC_END = 0x444E4554  # "TEND"
MAGIC_R = 0x52475A54  # "TZGR"
MAGIC_A = 0x4E545441  # "ATTN"
RNG_A = np.float32(-3.7e-3)  # harness.c uses the same literal
BITS = (2, 3, 4, 8)
# (cols, group, rows): 4-bit steps of 64, 2/3-bit steps of 128 inputs, the NEON step of 128 (so
# 576 = 4.5 steps has a padded tail), groups that straddle steps (32, 64, 96, 192), groups that
# hold whole steps (128, 384), odd row counts, and 301-row weights large enough that 3 threads
# split them into chunks whose sizes are not multiples of the 4-row tiles.
SHAPES = [(576, 64, 37), (576, 96, 13), (576, 192, 21), (576, 32, 9), (1536, 64, 11), (160, 32, 23),
          (96, 96, 7), (224, 32, 5), (512, 128, 6), (768, 384, 3), (32, 32, 4), (576, 64, 301),
          (160, 32, 301)]
QUICK_SHAPES = [(576, 96, 13), (160, 32, 23), (512, 128, 6)]
# attention: (B, nkv, g, T, hd, pos0, unused floats past pos0+T rows per group, query scale):
# SmolLM2's heads (3 KV heads of 64, 3 query heads each) over 70 fresh positions (3 tiles of 32),
# a prefix already in a cache (pos0 > 0), an odd head size (a head-dimension tail in every variant)
# with 5 heads per group and a group stride that is not a multiple of hd, and one decode-like step
ATTN_CASES = [(2, 3, 3, 70, 64, 0, 0, 1.0), (1, 2, 2, 37, 40, 11, 5 * 40, 4.0), (1, 1, 5, 9, 7, 3, 2 * 7 + 3, 30.0),
              (2, 3, 3, 1, 64, 20, 4 * 64, 8.0)]
QUICK_ATTN_CASES = [(1, 2, 2, 37, 40, 11, 5 * 40, 4.0), (1, 1, 5, 9, 7, 3, 2 * 7 + 3, 30.0)]


def make_weight(rng, bits, rows, cols, group):
    """Same distribution as tests/test_kernels.py: random codes, signed scales, real zeros."""
    q = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    g = cols // group
    s = (rng.uniform(0.001, 0.05, (rows, g)) * rng.choice([-1, 1], (rows, g))).astype(np.float32)
    z = rng.uniform(-1, (1 << bits), (rows, g)).astype(np.float32)
    return q, s, z


def magnitude(x, q, s, z, group):
    w = np.abs(s).repeat(group, 1).astype(np.float64) * (q + np.abs(z).repeat(group, 1))
    return np.abs(x).astype(np.float64) @ w.T


def _i64(f, *vals):
    f.write(np.asarray(vals, dtype="<i8").tobytes())


def _arr(f, a, dtype):
    a = np.ascontiguousarray(a, dtype=dtype)
    f.write(a.tobytes())


class Writer:
    """Writes records and remembers where each array of each record starts (for tests that
    corrupt one golden value on purpose)."""

    def __init__(self, f):
        self.f = f
        self.offsets = []  # one dict per record: name -> byte offset

    def _mark(self, rec, name):
        rec[name] = self.f.tell()

    def weight(self, q, s, z, bits, group, xs, tols=None, rng=None):
        f = self.f
        rows, cols = q.shape
        codes = P.pack(q, bits)
        W = P.dequantize(codes, s, z, bits, group)
        rng = rng or np.random.default_rng(rows * 7 + cols)
        a, b = sorted(int(v) for v in rng.integers(0, rows + 1, 2))
        ids = rng.integers(0, rows, size=7).astype(np.int64)
        rec = {}
        _i64(f, MAGIC_W, bits, rows, cols, group, a, b, len(ids))
        self._mark(rec, "q"); _arr(f, q, np.uint8)
        self._mark(rec, "codes"); _arr(f, codes, np.uint8)
        _arr(f, s, "<f4")
        _arr(f, z, "<f4")
        self._mark(rec, "W"); _arr(f, W, "<f4")
        _arr(f, ids, "<i8")
        _i64(f, len(xs))
        for i, x in enumerate(xs):
            xi, d = P.quantize_activations(x)
            y = P.qmatmul_ref(x, codes, s, z, bits, group)
            tol = (1e-5 * magnitude(x, q, s, z, group) + 1e-30) if tols is None else tols[i]
            _i64(f, x.shape[0])
            _arr(f, x, "<f4")
            self._mark(rec, f"xi{i}"); _arr(f, xi, np.int8)
            self._mark(rec, f"d{i}"); _arr(f, d, "<f4")
            self._mark(rec, f"y{i}"); _arr(f, y, "<f4")
            _arr(f, np.asarray(tol, np.float64).astype(np.float32), "<f4")
        self.offsets.append(rec)

    def rng(self, seed, tid, n, dist, rng):
        z = ref_z(seed, tid, n, "gaussian" if dist == 0 else "rademacher")
        src = rng.standard_normal(n).astype(np.float32)
        _i64(self.f, MAGIC_R, *np.array([seed, tid], np.uint64).view(np.int64), n, dist)
        rec = {}
        for name, a in (("z", z), ("src", src), ("add", src + RNG_A * z), ("mult", src + (RNG_A * z) * src)):
            self._mark(rec, name)
            _arr(self.f, a, "<f4")
        self.offsets.append(rec)

    def attention(self, q, kc, vc, pos0, kvs):
        """q [B, nkv, g, T, hd]; kc, vc [B, nkv, kvs] (flat groups, keys as rows of hd from the start)."""
        B, nkv, g, T, hd = q.shape
        S = pos0 + T
        k = kc[:, :, :S * hd].reshape(B, nkv, S, hd)
        v = vc[:, :, :S * hd].reshape(B, nkv, S, hd)
        out, smax = attention_reference(q, k, v, pos0)
        tol = 2e-7 * (8 + smax) * max(1.0, float(np.abs(v).max()))
        rec = {}
        _i64(self.f, MAGIC_A, B, nkv, g, T, hd, pos0, kvs)
        for name, a in (("attn_q", q), ("attn_k", kc), ("attn_v", vc), ("attn_out", out), ("attn_tol", tol)):
            self._mark(rec, name)
            _arr(self.f, a, "<f4")
        self.offsets.append(rec)

    def end(self):
        _i64(self.f, MAGIC_END)


def activations(rng, n, cols, variant):
    x = (rng.standard_normal((n, cols)) * rng.uniform(0.01, 100, (n, 1))).astype(np.float32)
    if variant % 3 == 0 and cols > 32:
        x[0, :32] = 0  # an all-zero block: d_b = 0
    if variant % 4 == 1:
        x[:, rng.integers(0, cols, 3)] = 0
    if variant % 5 == 2:
        x[-1] *= np.float32(1e-39 / 100)  # subnormal block maxima: 1/d overflows
    return x


def attention_inputs(rng, B, nkv, g, T, hd, pos0, extra, scale):
    """q and KV-cache buffers [B, nkv, kvs] with kvs = (pos0+T)*hd + extra; the unused tail is NaN."""
    S = pos0 + T
    kvs = S * hd + extra
    q = (rng.standard_normal((B, nkv, g, T, hd)) * scale / np.sqrt(hd)).astype(np.float32)
    kc = np.full((B, nkv, kvs), np.nan, np.float32)
    vc = np.full((B, nkv, kvs), np.nan, np.float32)
    kc[:, :, :S * hd] = rng.standard_normal((B, nkv, S * hd))
    vc[:, :, :S * hd] = rng.standard_normal((B, nkv, S * hd)) * 3
    return q, kc, vc, kvs


def write_cases(path, seed=0, quick=False):
    """Write the golden file; returns the per-record offsets (see Writer)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        w = Writer(f)
        for bits in BITS:
            for cols, group, rows in (QUICK_SHAPES if quick else SHAPES):
                q, s, z = make_weight(rng, bits, rows, cols, group)
                ns = range(1, 10) if rows < 100 else (1, 3, 8)
                xs = [activations(rng, n, cols, n + cols) for n in ns]
                w.weight(q, s, z, bits, group, xs, rng=rng)
        # extremes: every code at the top of its range, activations +-2 (int8 +-127): the
        # int16 partial sums of the vmull path are at their largest; the result is exact
        for bits in BITS:
            cols, group, rows = 256, 64, 8
            q = np.full((rows, cols), (1 << bits) - 1, np.uint8)
            s = np.ones((rows, cols // group), np.float32)
            z = np.zeros((rows, cols // group), np.float32)
            xs = [np.full((3, cols), sign * 2.0, np.float32) for sign in (1, -1)]
            w.weight(q, s, z, bits, group, xs, tols=[np.zeros((3, rows))] * 2, rng=rng)
        # 8-bit codes at the bottom (q - 128 = -128 against xi = -127): the other int16 extreme
        cols, group, rows = 128, 32, 5
        q = np.zeros((rows, cols), np.uint8)
        q[:, ::2] = 255
        s = np.ones((rows, cols // group), np.float32)
        z = np.zeros((rows, cols // group), np.float32)
        x = np.full((2, cols), -127.0, np.float32)  # d_b = 1: every float step is exact
        x[1, 1::2] = 127.0
        w.weight(q, s, z, 8, group, [x], tols=[np.zeros((2, rows))], rng=rng)
        # random directions: several thread chunks (grain 16384) and an odd tail, both distributions
        for seed, tid, dist in [(0, 0, 0), (2**64 - 1, 2**40, 0), (7, 3, 1)]:
            w.rng(seed, tid, 40_003, dist, rng)
        # causal grouped-query attention (tzq_attn_prefill)
        for B, nkv, g, T, hd, pos0, extra, scale in (QUICK_ATTN_CASES if quick else ATTN_CASES):
            q, kc, vc, kvs = attention_inputs(rng, B, nkv, g, T, hd, pos0, extra, scale)
            w.attention(q, kc, vc, pos0, kvs)
        w.end()
    return w.offsets


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/arm/gen_cases.py OUT.bin [--quick]")
    offs = write_cases(sys.argv[1], quick="--quick" in sys.argv)
    print(f"wrote {len(offs)} records to {sys.argv[1]} ({os.path.getsize(sys.argv[1])} bytes)")
