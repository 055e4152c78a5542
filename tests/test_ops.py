"""csrc/ops.c (the element-wise parts of a many-token forward) against the NumPy functions of
tinyzq/model.py, on every ISA path built and supported here, and the whole forward pass with and
without them.

Tolerances: the C loops sum in 8 fp32 lanes and use their own exp (relative error < 2e-9 before
rounding), NumPy sums pairwise and uses its own exp: results agree to a few fp32 ulps (2e-6 relative
to the magnitude of the values involved).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyzq import kernels as K
from tinyzq import model as M

ISAS = K.available_isas()
SETTINGS = settings(max_examples=30, deadline=None)


def _close(a, b, rtol=2e-6):
    scale = max(1e-30, float(np.abs(b).max()))
    assert np.abs(np.asarray(a, np.float64) - b).max() <= rtol * scale


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(n=st.integers(1, 40), d=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_matches_numpy(isa, n, d, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    _close(K.Kernels(isa).rms_norm(x, w, 1e-5), M.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(n=st.integers(1, 20), f=st.integers(1, 300), scale=st.floats(0.01, 200), seed=st.integers(0, 2**31 - 1))
def test_silu_mul_matches_numpy_on_strided_views(isa, n, f, scale, seed):
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((2, n, 2 * f)) * scale).astype(np.float32)  # a fused gate/up output
    g, u = y[..., :f], y[..., f:]
    out = K.Kernels(isa).silu_mul(g, u)
    with np.errstate(over="ignore"):
        ref = (g.astype(np.float64) / (1.0 + np.exp(-g.astype(np.float64)))) * u
    assert np.all(np.abs(out - ref) <= 2e-6 * np.abs(ref) + 1e-30)  # silu(g < -87) is ~0 (< 1e-32) in both


def test_silu_extremes():
    """Finite for every finite input; ~0 far left (as NumPy's clipped formula, which is also ~0 there),
    the identity far right, exact at 0."""
    g = np.array([-1e30, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e30], np.float32)
    exact = g.astype(np.float64) / (1.0 + np.exp(np.minimum(-g.astype(np.float64), 700)))
    for isa in ISAS:
        out = K.Kernels(isa).silu_mul(g, np.ones_like(g))
        assert np.isfinite(out).all()
        left = g <= -88
        assert np.all(np.abs(out[left]) <= 1e-8)
        np.testing.assert_allclose(out[~left], exact[~left], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 17), heads=st.integers(1, 4), half=st.integers(1, 20),
       extra=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_rope_in_place_matches_numpy(isa, B, T, heads, half, extra, seed):
    rng = np.random.default_rng(seed)
    hd = 2 * half
    y = rng.standard_normal((B, T, (heads + extra) * hd)).astype(np.float32)
    ang = rng.uniform(0, 100, (T, half))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ref = M.apply_rope(y[..., :heads * hd].reshape(B, T, heads, hd).transpose(0, 2, 1, 3), cos, sin)
    rest = y[..., heads * hd:].copy()
    K.Kernels(isa).rope_(y[..., :heads * hd], heads, hd, cos, sin)
    np.testing.assert_array_equal(y.reshape(B, T, -1, hd)[:, :, :heads].transpose(0, 2, 1, 3), ref)
    np.testing.assert_array_equal(y[..., heads * hd:], rest)  # other heads untouched


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(n=st.integers(1, 12), tiles=st.lists(st.integers(1, 200), min_size=1, max_size=4),
       scale=st.floats(0.1, 60), seed=st.integers(0, 2**31 - 1))
def test_lse_update_matches_logsumexp(isa, n, tiles, scale, seed):
    rng = np.random.default_rng(seed)
    zs = [(rng.standard_normal((n, w)) * scale).astype(np.float32) for w in tiles]
    run_max, run_sum = np.full(n, -np.inf), np.zeros(n)
    for z in zs:
        K.Kernels(isa).lse_update(z, run_max, run_sum)
    allz = np.concatenate(zs, axis=1).astype(np.float64)
    m = allz.max(1)
    ref = m + np.log(np.exp(allz - m[:, None]).sum(1))
    assert np.abs(run_max + np.log(run_sum) - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())


def test_bad_arguments_are_one_line_errors():
    k = K.get()
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="shape"):
        k.rms_norm(x, np.ones(7, np.float32), 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        k.silu_mul(x, x[:, :4])
    with pytest.raises(ValueError, match="float32"):
        k.silu_mul(x.astype(np.float64), x)
    with pytest.raises(ValueError, match="unit stride"):
        k.rms_norm(x[:, ::2], np.ones(4, np.float32), 1e-5)
    with pytest.raises(ValueError, match="writeable"):
        ro = x.copy()
        ro.flags.writeable = False
        k.rope_(ro, 1, 8, np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_threads(isa):
    k = K.Kernels(isa)
    rng = np.random.default_rng(1)
    g, u = rng.standard_normal((2, 300, 700)).astype(np.float32)
    z = rng.standard_normal((300, 900)).astype(np.float32) * 10
    outs = []
    before = K.get_threads()
    try:
        for t in (1, 2, 3):
            k.set_threads(t)
            mx, sm = np.full(300, -np.inf), np.zeros(300)
            k.lse_update(z, mx, sm)
            outs.append((k.silu_mul(g, u), k.rms_norm(g, u[0], 1e-6), mx, sm))
    finally:
        k.set_threads(before)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("which", ["float", "w3"])
def test_forward_with_c_ops_matches_numpy_forward(which, tiny_hf_dir, tiny_w3, monkeypatch):
    """The many-token forward (RoPE, causal softmax over several query blocks, RMSNorm, SwiGLU) and the
    tiled cross-entropy give the NumPy path's results with the C element-wise ops."""
    from tinyzq import api

    net = api.load(tiny_hf_dir if which == "float" else tiny_w3).net
    monkeypatch.setattr(M, "ATTN_QBLOCK", 16)  # several query blocks, masks with offsets
    # fp32 linears: with int16 activations the ops' 1e-7 differences flip roundings in the prefix, and
    # the int8 decode of the continuation amplifies those to ~1e-3 (rounding, not the ops under test)
    from tinyzq.quant import packed
    monkeypatch.setattr(packed, "PREFILL", "fp32")
    toks = np.random.default_rng(0).integers(0, net.cfg.vocab_size, size=(2, 40))
    def run():
        h = net.hidden(toks)
        cache = M.KVCache(net.cfg, 2, 64)
        net.hidden(toks[:, :25], cache)
        return h, net.token_nll(h[:, :-1], toks[:, 1:], tile=100), net.hidden(toks[:, 25:], cache)  # pos0 > 0

    h_c, nll_c, hc_c = run()
    monkeypatch.setattr(M, "_kernels", lambda: None)
    h_np, nll_np, hc_np = run()
    _close(h_c, h_np, 2e-5)
    _close(hc_c, hc_np, 2e-5)
    np.testing.assert_allclose(nll_c, nll_np, rtol=2e-5, atol=2e-5)
