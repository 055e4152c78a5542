"""Group-wise quantizer (tinyzq.quant.quantizer): RTN bounds, dequantization formula, clip/scale search."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyzq.errors import TinyzqError
from tinyzq.quant import quantizer as Q

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------ independent references
def ref_dequantize(q, scales, zeros, group):
    """W[o, j] = scales[o, j // group] * (q[o, j] - zeros[o, j // group]), one element at a time."""
    out_f, in_f = q.shape
    w = np.empty((out_f, in_f), np.float64)
    for o in range(out_f):
        for j in range(in_f):
            w[o, j] = float(scales[o, j // group]) * (float(q[o, j]) - float(zeros[o, j // group]))
    return w


def group_err(w, q, s, z, group, a=None):
    """Per-group (optionally activation-weighted) squared reconstruction error, in float64."""
    d = Q.dequantize(q, s, z, group).astype(np.float64) - w.astype(np.float64)
    d2 = d * d if a is None else d * d * a.astype(np.float64)
    return d2.reshape(w.shape[0], -1, group).sum(-1)


# ------------------------------------------------------------------------------ weight generator
KINDS = ["normal", "laplace", "student_t", "constant_groups", "all_negative", "all_positive", "zeros_and_values",
         "mixed_magnitudes", "few_levels"]


@st.composite
def weights(draw):
    out_f = draw(st.integers(1, 6))
    group = draw(st.sampled_from([32, 64, 96, 128]))
    ng = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(KINDS))
    scale = draw(st.sampled_from([1e-20, 1e-6, 0.02, 1.0, 1e3, 1e20]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (out_f, ng * group)
    if kind == "normal":
        w = rng.standard_normal(shape)
    elif kind == "laplace":
        w = rng.laplace(size=shape)
    elif kind == "student_t":
        w = rng.standard_t(2.5, size=shape)
    elif kind == "constant_groups":
        w = np.repeat(rng.standard_normal((out_f, ng, 1)), group, axis=2).reshape(shape)
        w[0, :group] = 0.0  # and one all-zero group
    elif kind == "all_negative":
        w = -1.0 - rng.random(shape)
    elif kind == "all_positive":
        w = 3.0 + rng.random(shape)
    elif kind == "zeros_and_values":
        w = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    elif kind == "mixed_magnitudes":  # every group at its own magnitude
        w = rng.standard_normal((out_f, ng, group)) * 10.0 ** rng.integers(-4, 4, (out_f, ng, 1))
        w = w.reshape(shape)
    else:  # few distinct values
        w = rng.integers(-3, 4, shape).astype(np.float64)
    return (w * scale).astype(np.float32), group


def stats_for(w, rng):
    a = rng.lognormal(0.0, 1.0, w.shape[1]).astype(np.float32)
    a[rng.random(w.shape[1]) < 0.05] = 0.0  # dead input channels
    return a


# ------------------------------------------------------------------------------ RTN
@SETTINGS
@given(wg=weights(), bits=st.sampled_from([2, 3, 4, 8]))
def test_rtn_codes_range_and_error_bound(wg, bits):
    w, group = wg
    maxq = 2**bits - 1
    q, s, z = Q.quantize_rtn(w, bits, group)
    ng = w.shape[1] // group
    assert q.dtype == np.uint8 and q.shape == w.shape
    assert s.dtype == np.float32 and z.dtype == np.float32 and s.shape == z.shape == (w.shape[0], ng)
    assert q.max() <= maxq
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert np.all(z == np.rint(z)) and z.min() >= 0 and z.max() <= maxq  # RTN zero points are integers
    err = np.abs(Q.dequantize(q, s, z, group).astype(np.float64) - w)
    s_el = np.repeat(s.astype(np.float64), group, axis=1)
    gmax = np.repeat(np.abs(w).reshape(w.shape[0], ng, group).max(-1).astype(np.float64), group, axis=1)
    # every element lies within the group's range (0 is inside it), so it is within s/2 of the grid
    assert np.all(err <= s_el / 2 * (1 + 1e-5) + 8 * F32_EPS * gmax)


@SETTINGS
@given(wg=weights(), bits=st.sampled_from([2, 3, 4, 8]))
def test_dequantize_matches_per_element_reference(wg, bits):
    w, group = wg
    q, s, z = Q.quantize_rtn(w, bits, group)
    np.testing.assert_allclose(Q.dequantize(q, s, z, group), ref_dequantize(q, s, z, group), rtol=1e-6, atol=0)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([32, 64]),
       ng=st.integers(1, 3), out_f=st.integers(1, 4))
def test_dequantize_real_zero_points(seed, bits, group, ng, out_f):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, (out_f, ng * group)).astype(np.uint8)
    s = rng.lognormal(-4, 2, (out_f, ng)).astype(np.float32)
    z = (rng.random((out_f, ng)) * (2**bits + 2) - 1).astype(np.float32)  # real, may lie outside [0, maxq]
    np.testing.assert_allclose(Q.dequantize(q, s, z, group), ref_dequantize(q, s, z, group), rtol=1e-6, atol=0)


def test_constant_and_zero_groups():
    w = np.concatenate([np.zeros((2, 32)), np.full((2, 32), 0.37), np.full((2, 32), -5e-3),
                        np.full((2, 32), 1e12)], axis=1).astype(np.float32)
    for bits in (2, 3, 4, 8):
        for method in ("rtn", "search"):
            q, s, z = Q.quantize(w, bits, 32, method=method)
            wh = Q.dequantize(q, s, z, 32)
            assert np.all(wh[:, :32] == 0)  # all-zero group: exactly zero
            np.testing.assert_allclose(wh, w, rtol=4 * F32_EPS, atol=0)
            assert np.all(s > 0) and np.all(s[:, 0].astype(np.float16) > 0)  # all-zero group's scale survives fp16


def test_rtn_known_values():
    # range [-1, 2] at 2 bits: s = 1, z = 1; grid {-1, 0, 1, 2}
    w = np.tile(np.array([-1.0, -0.4, 0.6, 2.0], np.float32), 8)[None, :]
    q, s, z = Q.quantize_rtn(w, 2, 32)
    assert s[0, 0] == 1.0 and z[0, 0] == 1.0
    assert q[0, :4].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ search
@SETTINGS
@given(wg=weights(), bits=st.sampled_from([2, 3, 4, 8]), weighted=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_search_never_worse_than_rtn_per_group(wg, bits, weighted, seed):
    w, group = wg
    a = stats_for(w, np.random.default_rng(seed)) if weighted else None
    q0, s0, z0 = Q.quantize_rtn(w, bits, group)
    q1, s1, z1 = Q.quantize_search(w, bits, group, x_stats=a)
    assert q1.dtype == np.uint8 and q1.max() <= 2**bits - 1
    assert np.all(np.isfinite(s1)) and np.all(s1 > 0) and np.all(np.isfinite(z1))
    e0, e1 = group_err(w, q0, s0, z0, group, a), group_err(w, q1, s1, z1, group, a)
    atol = 1e-12 * float(np.abs(w).max()) ** 2  # groups RTN reproduces exactly
    assert np.all(e1 <= e0 * (1 + 1e-5) + atol), (e1 / np.maximum(e0, 1e-300)).max()


@pytest.mark.parametrize("dist", ["laplace", "student_t"])
@pytest.mark.parametrize("bits", [2, 3])
def test_search_strictly_better_on_heavy_tails(dist, bits):
    rng = np.random.default_rng(bits)
    w = (rng.laplace(size=(64, 256)) if dist == "laplace" else rng.standard_t(3, size=(64, 256))).astype(np.float32)
    e_rtn = group_err(w, *Q.quantize_rtn(w, bits, 64), 64)
    e_s = group_err(w, *Q.quantize_search(w, bits, 64), 64)
    assert e_s.sum() < 0.9 * e_rtn.sum()
    assert np.all(e_s <= e_rtn * (1 + 1e-5))
    # the grid alone (integer zero points) already helps; refinement helps further
    e_grid = group_err(w, *Q.quantize_search(w, bits, 64, refine=0), 64)
    assert e_s.sum() < e_grid.sum() < e_rtn.sum()


def test_search_weighted_targets_weighted_error():
    rng = np.random.default_rng(0)
    w = rng.laplace(size=(64, 256)).astype(np.float32)
    a = rng.lognormal(0, 1.5, 256).astype(np.float32)
    e_plain = group_err(w, *Q.quantize_search(w, 3, 64), 64, a).sum()
    e_weighted = group_err(w, *Q.quantize_search(w, 3, 64, x_stats=a), 64, a).sum()
    e_rtn = group_err(w, *Q.quantize_rtn(w, 3, 64), 64, a).sum()
    assert e_weighted < e_plain < e_rtn


def test_search_refine0_keeps_integer_zero_points():
    w = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    q, s, z = Q.quantize_search(w, 3, 64, refine=0)
    assert np.all(z == np.rint(z)) and z.min() >= 0 and z.max() <= 7


def test_grid_1_refine_0_is_rtn():
    w = np.random.default_rng(2).standard_t(3, size=(16, 192)).astype(np.float32)
    for got, want in zip(Q.quantize_search(w, 2, 64, grid=1, refine=0), Q.quantize_rtn(w, 2, 64)):
        np.testing.assert_array_equal(got, want)


def test_chunking_and_threads_do_not_change_results(monkeypatch):
    w = np.random.default_rng(3).laplace(size=(50, 192)).astype(np.float32)
    a = np.random.default_rng(4).random(192).astype(np.float32)
    for method in ("rtn", "search"):
        ref = Q.quantize(w, 3, 64, method=method, x_stats=a, threads=1)
        monkeypatch.setattr(Q, "CHUNK_ELEMS", 7 * 192)  # 7 rows per chunk, a ragged last chunk
        for threads in (1, 3):
            for got, want in zip(Q.quantize(w, 3, 64, method=method, x_stats=a, threads=threads), ref):
                np.testing.assert_array_equal(got, want)
        monkeypatch.undo()


def test_accepts_other_float_dtypes_and_noncontiguous():
    w = np.random.default_rng(5).standard_normal((64, 16)).T  # float64, not contiguous
    q, s, z = Q.quantize_search(w, 4, 32)
    q2, s2, z2 = Q.quantize_search(np.ascontiguousarray(w, dtype=np.float32), 4, 32)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(s, s2)


# ------------------------------------------------------------------------------ errors
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_check_group_lists_sizes_that_work():
    with pytest.raises(TinyzqError) as e:
        Q.check_group(576, 128, "model.layers.0.mlp.up_proj")
    assert one_line(e) == ("group size 128 does not divide the input width 576 of model.layers.0.mlp.up_proj; "
                           "sizes that work: 32, 64, 96, 192, 288, 576")
    with pytest.raises(TinyzqError) as e:
        Q.check_group(1536, 48)
    assert "multiple of 32" in one_line(e) and "32, 64, 96, 128, 192, 256, 384, 512, 768, 1536" in one_line(e)
    with pytest.raises(TinyzqError) as e:
        Q.check_group(100, 32, "x")
    assert "100" in one_line(e) and "x" in one_line(e)
    for g in (32, 64, 96, 192, 288, 576):
        Q.check_group(576, g)


def test_quantize_errors_are_one_line():
    w = np.zeros((4, 576), np.float32)
    with pytest.raises(TinyzqError) as e:
        Q.quantize(w, 4, 128, name="blk.0.ffn_up")
    assert "sizes that work: 32, 64, 96, 192, 288, 576" in one_line(e)
    with pytest.raises(TinyzqError) as e:
        Q.quantize(w, 4, 64, method="gptq")
    assert "rtn" in one_line(e) and "search" in one_line(e)
    assert set(Q.METHODS) == {"rtn", "search"}
    with pytest.raises(TinyzqError) as e:
        Q.quantize(w, 5, 64)
    assert "2, 3, 4, 8" in one_line(e)
    with pytest.raises(TinyzqError) as e:
        Q.quantize(w, 4, 64, method="search", x_stats=np.ones(575, np.float32))
    one_line(e)
    with pytest.raises(TinyzqError) as e:
        Q.quantize(w, 4, 64, method="search", x_stats=-np.ones(576, np.float32))
    one_line(e)
    bad = w.copy()
    bad[1, 3] = np.nan
    for method in Q.METHODS:
        with pytest.raises(TinyzqError) as e:
            Q.quantize(bad, 4, 64, method=method, name="blk.0.attn_q")
        assert "blk.0.attn_q" in one_line(e)
    with pytest.raises(TinyzqError) as e:
        Q.quantize(np.zeros(576, np.float32), 4, 64)
    one_line(e)


def test_xstats_is_mean_square_per_input():
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((2, 5, 64)).astype(np.float32), rng.standard_normal((7, 64)).astype(np.float32)]
    st_ = Q.XStats(64)
    for x in xs:
        st_.update(x)
    allx = np.concatenate([x.reshape(-1, 64) for x in xs]).astype(np.float64)
    np.testing.assert_allclose(st_.value, (allx ** 2).mean(0), rtol=1e-6)
    assert st_.value.dtype == np.float32 and st_.count == 17
    with pytest.raises(TinyzqError) as e:
        _ = Q.XStats(64).value
    one_line(e)
