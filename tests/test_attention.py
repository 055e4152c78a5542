"""csrc/attn_prefill.c (causal grouped-query attention of many new positions) against a float64 NumPy
reference and against tinyzq/model.py's NumPy path, on every ISA path built and supported here.

The variants compute each dot product in the same order (plain multiply then add, no contraction), so
they agree bit for bit with the reference build; against float64 they agree to fp32 rounding.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyzq import kernels as K
from tinyzq import model as M

from attn_reference import reference

ISAS = K.available_isas()


def inputs(rng, B, nkv, g, T, hd, pos0, cache_extra=None, scale=1.0):
    q = (rng.standard_normal((B, nkv, g, T, hd)) * scale / np.sqrt(hd)).astype(np.float32)
    S = pos0 + T
    if cache_extra is None:
        k = rng.standard_normal((B, nkv, S, hd)).astype(np.float32)
        v = rng.standard_normal((B, nkv, S, hd)).astype(np.float32)
        return q, k, v
    kc = rng.standard_normal((B, nkv, S + cache_extra, hd)).astype(np.float32)  # a KV cache, prefix in use
    vc = rng.standard_normal((B, nkv, S + cache_extra, hd)).astype(np.float32)
    return q, kc[:, :, :S], vc[:, :, :S]


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), nkv=st.integers(1, 3), g=st.integers(1, 4), T=st.integers(1, 70),
       hd=st.integers(1, 80), pos0=st.integers(0, 40), cache_extra=st.one_of(st.none(), st.integers(0, 9)),
       scale=st.floats(0.1, 30), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(isa, B, nkv, g, T, hd, pos0, cache_extra, scale, seed):
    q, k, v = inputs(np.random.default_rng(seed), B, nkv, g, T, hd, pos0, cache_extra, scale)
    out = K.Kernels(isa).attn_prefill(q, k, v, pos0)
    ref, smax = reference(q, k, v, pos0)
    assert out.shape == q.shape and out.dtype == np.float32
    # fp32 scores carry a rounding error ~ 6e-8 |s|, which the softmax passes on to the weights
    assert np.abs(out - ref).max() <= 2e-7 * (8 + smax) * max(1.0, np.abs(v).max())


@pytest.mark.parametrize("isa", ISAS)
def test_matches_the_numpy_path_on_smollm2_shapes(isa):
    """SmolLM2's attention (3 KV heads of 64, 3 query heads each) over 2 x 300 positions, fresh and after
    a cached prefix: the C kernel against model.py's blocked NumPy/BLAS path."""
    rng = np.random.default_rng(7)
    for pos0 in (0, 45):
        q, k, v = inputs(rng, 2, 3, 3, 300, 64, pos0, 5)
        ours = K.Kernels(isa).attn_prefill(q, k, v, pos0)
        numpy_path = M._causal_gqa(q, k, v, pos0, None)
        assert np.abs(ours - numpy_path).max() <= 2e-6 * np.abs(v).max()


def test_variants_agree_bit_for_bit_with_the_reference_build():
    rng = np.random.default_rng(3)
    for shape, pos0 in (((2, 3, 3, 100, 64), 0), ((1, 2, 2, 37, 40), 11), ((1, 1, 5, 9, 7), 3)):
        q, k, v = inputs(rng, *shape, pos0, 3)
        ref = K.Kernels("ref").attn_prefill(q, k, v, pos0)
        for isa in ISAS:
            np.testing.assert_array_equal(K.Kernels(isa).attn_prefill(q, k, v, pos0), ref, err_msg=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_threads(isa):
    q, k, v = inputs(np.random.default_rng(4), 2, 3, 3, 150, 64, 20)
    kern, before, outs = K.Kernels(isa), K.get_threads(), []
    try:
        for t in (1, 2, 3):
            kern.set_threads(t)
            outs.append(kern.attn_prefill(q, k, v, 20))
    finally:
        kern.set_threads(before)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("isa", ISAS)
def test_future_keys_and_values_are_never_read(isa):
    """Causality: a query's output is bit-for-bit the same whatever the keys and values after it hold."""
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng, 1, 2, 3, 80, 64, 10)
    kern = K.Kernels(isa)
    out = kern.attn_prefill(q, k, v, 10)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 50:] = rng.standard_normal(k2[:, :, 50:].shape) * 1e3
    v2[:, :, 50:] = rng.standard_normal(v2[:, :, 50:].shape) * 1e3
    out2 = kern.attn_prefill(q, k2, v2, 10)
    np.testing.assert_array_equal(out2[:, :, :, :40], out[:, :, :, :40])  # positions 10 .. 49
    assert not np.array_equal(out2[:, :, :, 40:], out[:, :, :, 40:])


def test_bad_arguments_are_one_line_errors():
    kern = K.get()
    q, k, v = inputs(np.random.default_rng(6), 1, 2, 2, 8, 16, 0)
    with pytest.raises(ValueError, match=r"k must be float32 \[1, 2, 8, 16\]"):
        kern.attn_prefill(q, k[:, :, :7], v)
    with pytest.raises(ValueError, match="v must be float32"):
        kern.attn_prefill(q, k, v.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        kern.attn_prefill(q[..., ::-1], k, v)
    with pytest.raises(ValueError, match="contiguous rows"):
        kern.attn_prefill(q, k, np.concatenate([v, v], axis=-1)[..., :16])  # rows 32 floats apart
    with pytest.raises(ValueError, match="out must have shape"):
        kern.attn_prefill(q, k, v, out=np.empty((1, 2, 2, 8, 15), np.float32))
