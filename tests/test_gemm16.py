"""The int16-activation product (csrc/gemm16.c, kernels.gemm16) and its use for many-row products.

- NumPy reference (tinyzq/quant/packing.py gemm16_ref) == C reference == every ISA module built and
  supported here, bit for bit (the integer sums are exact and the float steps are in one order).
- Its error against the exact product is the activation rounding: at most half a step a = max|x|/32767
  per input, weighted by |W|.
- The overflow guard, bad inputs and thread-count independence.
- The model uses it where it is fast (TINYZQ_PREFILL=auto), the forward is the same bits on every
  module when forced (int16), and the ZO signal survives it: the projected gradients of the same
  directions correlate > 0.99 with the fp32 forward's (int8 activations would not, README).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyzq import kernels as K
from tinyzq.quant import packed
from tinyzq.quant import packing as P

SETTINGS = settings(max_examples=40, deadline=None)
ISAS = K.available_isas()


@st.composite
def cases(draw):
    bits = draw(st.sampled_from((2, 3, 4, 8)))
    nblocks = draw(st.integers(1, 12))
    bpg = draw(st.sampled_from([k for k in range(1, nblocks + 1) if nblocks % k == 0]))
    return bits, draw(st.integers(1, 40)), draw(st.integers(1, 37)), 32 * nblocks, 32 * bpg


def make(rng, bits, rows, cols, group, n):
    q = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    g = cols // group
    s = (rng.uniform(0.001, 0.05, (rows, g)) * rng.choice([-1, 1], (rows, g))).astype(np.float32)
    z = rng.uniform(-1, 1 << bits, (rows, g)).astype(np.float32)
    # heavy-tailed columns, like a transformer's activations (a few channels 10-100x the rest)
    x = (rng.standard_normal((n, cols)) * rng.exponential(1.0, (1, cols)) ** 2).astype(np.float32)
    return x, q, P.pack(q, bits), s, z


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_every_module_equals_the_numpy_reference_bit_for_bit(case, seed):
    bits, n, rows, cols, group = case
    x, q, codes, s, z = make(np.random.default_rng(seed), bits, rows, cols, group, n)
    want = P.gemm16_ref(x, codes, s, z, bits, group)
    for name in ISAS:
        got = K.Kernels(name).gemm16(x, codes, s, z, bits, group)
        assert got.dtype == np.float32 and got.shape == (n, rows)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("n, rows, cols, bits, group", [(300, 70, 576, 3, 64), (129, 16, 1536, 4, 64),
                                                         (17, 200, 192, 2, 96), (8, 33, 64, 8, 32)])
def test_tiles_and_tails_equal_the_reference(n, rows, cols, bits, group):
    """Several 128-row activation tiles, row counts that are not multiples of 16 or 8."""
    x, q, codes, s, z = make(np.random.default_rng(n * rows), bits, rows, cols, group, n)
    want = P.gemm16_ref(x, codes, s, z, bits, group)
    for name in ISAS:
        np.testing.assert_array_equal(K.Kernels(name).gemm16(x, codes, s, z, bits, group), want, err_msg=name)


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_error_is_the_activation_rounding(case, seed):
    bits, n, rows, cols, group = case
    x, q, codes, s, z = make(np.random.default_rng(seed), bits, rows, cols, group, n)
    W = P.dequantize(codes, s, z, bits, group).astype(np.float64)
    exact = x.astype(np.float64) @ W.T
    got = K.gemm16(x, codes, s, z, bits, group).astype(np.float64)
    xq, a = P.quantize_activations16(x, group)
    # |x - a xq| <= a/2 per input; fp32 steps add ~1e-6 of the terms' magnitude
    half = np.repeat(a, group, axis=1).astype(np.float64) * 0.505
    bound = half @ np.abs(W).T + 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(W).T) + 1e-30
    assert np.all(np.abs(got - exact) <= bound)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from([32, 64, 96]), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_activation_quantizer(n, ngroups, group, seed, scale):
    x = (np.random.default_rng(seed).standard_normal((n, ngroups * group)) * scale).astype(np.float32)
    x[0, :group] = 0.0  # an all-zero group: a = 0, codes 0
    xq, a = P.quantize_activations16(x, group)
    assert xq.dtype == np.int16 and np.abs(xq.astype(np.int32)).max() <= 32767
    assert a[0, 0] == 0 and not xq[0, :group].any()
    xg, qg = x.reshape(n, ngroups, group), xq.reshape(n, ngroups, group).astype(np.float64)
    # half a step, plus the fp32 rounding of x * (1/a) (~32767 * 2^-23 of a step)
    assert np.all(np.abs(xg - a[..., None] * qg) <= a[..., None] * 0.505 + 1e-45)
    live = a > 0
    assert np.all(np.abs(qg).max(-1)[live] == 32767)  # the largest input maps to the end of the range


def test_zero_inputs_and_empty_shapes():
    rng = np.random.default_rng(0)
    x, q, codes, s, z = make(rng, 3, 7, 128, 64, 9)
    x[:] = 0
    for name in ISAS:
        assert not K.Kernels(name).gemm16(x, codes, s, z, 3, 64).any()
        assert K.Kernels(name).gemm16(x[:0], codes, s, z, 3, 64).shape == (0, 7)


def test_overflow_guard_and_bad_inputs_are_one_line_errors():
    assert K.gemm16_fits(3, 64) and K.gemm16_fits(4, 4096) and K.gemm16_fits(8, 512) and not K.gemm16_fits(8, 1024)
    rng = np.random.default_rng(1)
    x, q, codes, s, z = make(rng, 8, 3, 1024, 1024, 4)
    with pytest.raises(K.KernelError, match="overflow") as e:
        K.gemm16(x, codes, s, z, 8, 1024)
    assert "\n" not in str(e.value)
    k = K.get()  # the C entry point refuses it too
    fb = k.ffi.from_buffer
    y = np.empty((4, 3), np.float32)
    assert k.lib.tzq_gemm16(fb("float[]", x), 4, fb("uint8_t[]", codes), fb("float[]", s), fb("float[]", z),
                            3, 1024, 8, 1024, fb("float[]", y)) == -1
    x, q, codes, s, z = make(rng, 4, 3, 64, 32, 4)
    with pytest.raises(K.KernelError, match="columns"):
        K.gemm16(np.ascontiguousarray(x[:, :32]), codes, s, z, 4, 32)
    with pytest.raises(K.KernelError):
        K.gemm16(x.astype(np.float64), codes, s, z, 4, 32)


@pytest.mark.parametrize("name", ISAS)
def test_results_do_not_depend_on_threads(name):
    x, q, codes, s, z = make(np.random.default_rng(2), 3, 90, 576, 64, 260)
    k = K.Kernels(name)
    old = K.get_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            k.set_threads(t)
            outs.append(k.gemm16(x, codes, s, z, 3, 64))
    finally:
        k.set_threads(old)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


# ------------------------------------------------------------------------------- in the model

def _nll(net, tok, mode):
    old = packed.PREFILL
    packed.PREFILL = mode
    try:
        return net.sequence_nll(tok)[0]
    finally:
        packed.PREFILL = old


def test_model_uses_gemm16_where_it_is_fast(monkeypatch):
    calls = []
    real = K.Kernels.gemm16
    monkeypatch.setattr(K.Kernels, "gemm16", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    x, q, codes, s, z = make(np.random.default_rng(3), 4, 16, 64, 32, 40)
    lin = packed.PackedLinear(codes, s, z, 4, 32, 64)
    monkeypatch.setattr(packed, "PREFILL", "auto")
    y = lin(x)
    assert bool(calls) == K.get().gemm16_fast
    want = P.gemm16_ref(x, codes, s, z, 4, 32) if calls else x @ P.dequantize(codes, s, z, 4, 32).T
    np.testing.assert_array_equal(y, want)
    calls.clear()
    monkeypatch.setattr(packed, "PREFILL", "fp32")
    np.testing.assert_array_equal(lin(x), x @ P.dequantize(codes, s, z, 4, 32).T)
    assert not calls
    monkeypatch.setattr(packed, "PREFILL", "int16")
    np.testing.assert_array_equal(lin(x), P.gemm16_ref(x, codes, s, z, 4, 32))
    lin(x[:packed.DECODE_MAX_ROWS])  # few rows: the int8 decode kernel, not gemm16
    assert len(calls) == 1
    monkeypatch.setattr(packed, "PREFILL", "bogus")
    with pytest.raises(K.KernelError, match="TINYZQ_PREFILL"):
        lin(x)


def test_bad_prefill_setting_is_a_one_line_cli_error():
    env = dict(os.environ, TINYZQ_PREFILL="bogus")
    r = subprocess.run([sys.executable, "-m", "tinyzq", "info"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: TINYZQ_PREFILL must be one of")


def _windows(m, n=4, ctx=64):
    from tinyzq.data import default_text
    ids = np.asarray(m.tokenizer.encode(default_text()[:20000]), dtype=np.int64)
    return ids[:n * ctx].reshape(n, ctx)


def test_forced_int16_forward_is_the_same_bits_on_every_module(tiny_w3):
    import tinyzq
    m = tinyzq.load(tiny_w3)
    tok = _windows(m)
    got = {}
    for name in ISAS:
        with K.use(name):
            got[name] = _nll(m.net, tok, "int16")
    assert len(set(got.values())) == 1, got
    fp32 = _nll(m.net, tok, "fp32")
    assert abs(got["ref"] - fp32) <= 1e-4 * abs(fp32)


def test_zo_signal_survives_the_int16_product(tiny_w3):
    """The same directions on the same batch: projected gradients with the int16 product track the
    fp32 forward's (rounding noise << signal). README: 0.9998 on SmolLM2 W3g64, 0.26 with int8."""
    import tinyzq
    from tinyzq.zo import params as zp, spsa
    m = tinyzq.load(tiny_w3)
    tok = _windows(m)
    P_ = zp.build(m, "scales")
    g = {mode: np.array([spsa.probe(P_, lambda sign: _nll(m.net, tok, mode), 100 + k, 1e-3).g for k in range(12)])
         for mode in ("fp32", "int16")}
    assert np.corrcoef(g["fp32"], g["int16"])[0, 1] > 0.99
    assert np.sqrt(np.mean((g["fp32"] - g["int16"]) ** 2)) < 0.1 * np.sqrt(np.mean(g["fp32"] ** 2))
