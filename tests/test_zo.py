"""Zeroth-order machinery: the counter-based RNG (C == NumPy reference on every ISA), the SPSA estimator,
perturb -> restore exactness, the update rule, schedules."""
import math

import numpy as np
import pytest

from tinyzq import kernels
from tinyzq.errors import TinyzqError

from rng_reference import M64, ref_bits, ref_z  # the NumPy reference of csrc/rng.c

ISAS = kernels.available_isas()


def test_rng_bits_scalar_matches_reference():
    k = kernels.get("ref")
    for seed, tid in [(0, 0), (1, 2), (2**63 + 5, 12345), (M64, M64 - 1)]:
        r = ref_bits(seed, tid, 5)
        assert [k.rng_bits(seed, tid, i) for i in range(5)] == [int(v) for v in r]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_rng_c_equals_numpy_reference(isa, dist):
    k = kernels.get(isa)
    n = 100_003  # several thread chunks and an odd tail
    for seed, tid in [(0, 0), (7, 3), (2**64 - 1, 2**40)]:
        z = k.rng_fill(n, seed, tid, dist)
        ref = ref_z(seed, tid, n, dist)
        assert np.array_equal(z, ref)  # fp32 steps without libm: the same bits everywhere
        if dist == "gaussian":  # and they are a Box-Muller Gaussian to fp32 accuracy
            r = ref_bits(seed, tid, n)
            u1 = ((r >> np.uint64(41)).astype(np.float64) * 2 + 1) / 2.0 ** 24
            u2 = (((r >> np.uint64(18)) & np.uint64(0x7FFFFF)).astype(np.float64) * 2 + 1) / 2.0 ** 24
            exact = np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)
            np.testing.assert_allclose(z, exact, rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mult", [False, True])
def test_rng_axpy_equals_numpy(isa, mult):
    k = kernels.get(isa)
    rng = np.random.default_rng(0)
    src = rng.standard_normal(50_001).astype(np.float32)
    a = np.float32(-3.7e-3)
    z = k.rng_fill(src.size, 11, 5, "gaussian")  # the C draws: the arithmetic is what is checked here
    dst = k.rng_axpy(src, np.empty_like(src), 11, 5, float(a), "gaussian", mult)
    want = src + (a * z) * src if mult else src + a * z
    assert np.array_equal(dst, want)
    inplace = src.copy()
    k.rng_axpy(inplace, inplace, 11, 5, float(a), "gaussian", mult)
    assert np.array_equal(inplace, want)


def test_rng_thread_invariance():
    k = kernels.get()
    old = kernels.get_threads()
    try:
        kernels.set_threads(1)
        a = k.rng_fill(200_000, 5, 9)
        kernels.set_threads(3)
        b = k.rng_fill(200_000, 5, 9)
    finally:
        kernels.set_threads(old)
    assert np.array_equal(a, b)


def test_rng_statistics_and_independence():
    z = kernels.rng_fill(1 << 20, 1, 0)
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    assert abs(np.mean(z ** 4) - 3) < 0.05  # Gaussian kurtosis
    w = kernels.rng_fill(1 << 20, 1, 1)  # another tensor
    v = kernels.rng_fill(1 << 20, 2, 0)  # another seed
    assert abs(np.corrcoef(z, w)[0, 1]) < 5e-3 and abs(np.corrcoef(z, v)[0, 1]) < 5e-3
    r = kernels.rng_fill(1 << 16, 1, 0, "rademacher")
    assert set(np.unique(r)) == {-1.0, 1.0} and abs(r.mean()) < 0.02


def test_rng_bad_arguments():
    with pytest.raises(kernels.KernelError):
        kernels.rng_fill(10, 1, 0, "uniform")
    with pytest.raises(kernels.KernelError):
        kernels.rng_fill(10, -1, 0)
    with pytest.raises(kernels.KernelError):
        kernels.rng_axpy(np.zeros(4, np.float32), np.zeros(5, np.float32), 0, 0, 1.0)
    with pytest.raises(kernels.KernelError):
        kernels.rng_axpy(np.zeros(4, np.float64), np.zeros(4, np.float64), 0, 0, 1.0)


# ------------------------------------------------------------------ estimator, restore, update
from tinyzq.zo import optim, params as zparams, spsa  # noqa: E402


def _quadratic(dim=12, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, dim)
    b = rng.standard_normal(dim)
    theta = rng.standard_normal(dim).astype(np.float32)
    return a, b, theta


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_estimator_expectation_matches_known_gradient(dist):
    """E[g z] = grad for f = ½ Σ a θ² + b·θ (central differences are exact on a quadratic up to fp32
    rounding of θ ± εz): average of N probes within 5 standard errors of the true gradient."""
    a, b, theta = _quadratic()
    ps = zparams.from_arrays({"theta": theta})
    grad = a * theta.astype(np.float64) + b

    def f(sign):
        t = theta.astype(np.float64)
        return float(0.5 * np.sum(a * t * t) + b @ t)

    n, eps = 4000, 1e-2
    est = np.zeros(theta.size)
    samples = []
    for t in range(1, n + 1):
        p = spsa.probe(ps, f, spsa.direction_seed(123, t), eps, dist)
        z = kernels.rng_fill(theta.size, p.seed, 0, dist).astype(np.float64)
        samples.append(p.g * z)
    samples = np.array(samples)
    est = samples.mean(axis=0)
    se = samples.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(est - grad) < 5 * se + 1e-3), (est, grad, se)
    # and the single-probe g is the directional derivative z·grad (up to fp32 rounding of θ ± εz)
    p = spsa.probe(ps, f, 99, eps, dist)
    z = kernels.rng_fill(theta.size, 99, 0, dist).astype(np.float64)
    assert abs(p.g - z @ grad) < 1e-3 * (1 + abs(z @ grad))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_forward_estimator_expectation_matches_known_gradient(dist):
    """Forward differences against one shared unperturbed pass: on a quadratic g = zᵀgrad + ε/2·zᵀAz
    (biased per direction, even in z), yet E[g z] = grad: K = 4 directions per step, the mean of all
    g·z within 5 standard errors of the true gradient; K + 1 loss calls per step; the parameters are
    back to their exact values after every step."""
    a, b, theta = _quadratic(seed=5)
    theta0 = theta.copy()
    ps = zparams.from_arrays({"theta": theta})
    grad = a * theta.astype(np.float64) + b
    calls = []

    def loss():
        t = theta.astype(np.float64)
        return float(0.5 * np.sum(a * t * t) + b @ t)

    def f(sign):
        calls.append(sign)
        return loss()

    n, k, eps = 1000, 4, 0.1  # a large ε makes the ε/2·zᵀAz term large: the test sees if it were biased
    samples, bias = [], []
    for t in range(1, n + 1):
        probes = spsa.estimate(ps, f, 456, t, eps, n_dirs=k, dist=dist, estimator="forward")
        assert len(calls) == (k + 1) * t and calls[-k - 1:] == [0] + [1] * k
        assert np.array_equal(theta, theta0)
        for p in probes:
            z = kernels.rng_fill(theta.size, p.seed, 0, dist).astype(np.float64)
            samples.append(p.g * z)
            bias.append(p.g - z @ grad)
            assert p.loss_minus is None and p.loss_center == loss() and p.g == (p.loss_plus - p.loss_center) / eps
    samples = np.array(samples)
    se = samples.std(axis=0) / math.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(axis=0) - grad) < 5 * se + 1e-3)
    # each g carries the curvature term ε/2·zᵀAz (mean ε/2·tr A): what the expectation averages away
    assert abs(np.mean(bias) - eps / 2 * a.sum()) < 0.1 * eps / 2 * a.sum()


def test_forward_estimator_directions_do_not_accumulate(tiny_w3):
    """On the tiny model the forward estimator's g_k equals (L(θ + εz_k) − L(θ))/ε computed with fresh
    perturb/restore per direction, bit for bit (each perturbation is taken from the base values), and
    tracks the central difference of the same direction."""
    import tinyzq
    from tinyzq import train as trainmod
    from tinyzq.data import windows

    m = tinyzq.load(tiny_w3)
    ps = zparams.build(m, "scales")
    tok = windows(trainmod.load_texts(m.tokenizer, None)[0], 64)[:2]
    f = lambda sign: trainmod.nll_loss(m.net, tok)  # noqa: E731
    eps = 1e-3
    probes = spsa.estimate(ps, f, 3, 1, eps, n_dirs=6, estimator="forward")
    l0 = f(0)
    for p in probes:
        ps.perturb(p.seed, eps)
        lp = f(1)
        ps.restore()
        assert p.loss_center == l0 and p.loss_plus == lp
    central = [spsa.probe(ps, f, p.seed, eps).g for p in probes]
    assert np.corrcoef([p.g for p in probes], central)[0, 1] > 0.95
    assert f(0) == l0
    with pytest.raises(ValueError, match="estimator"):
        spsa.estimate(ps, f, 3, 1, eps, estimator="backward")


def test_perturb_restore_is_exact_for_every_mode(tmp_path, tiny_w3):
    """Whatever is perturbed (all layers or a subset, any ε, any order), restore() gives the model's
    tensors back bit for bit: live values are recomputed from the untouched base copy."""
    import tinyzq

    for mode, directions in (("scales", "dense"), ("qv", "dense"), ("latent", "dense"), ("scales", "rowcol"),
                             ("latent", "rowcol")):
        m = tinyzq.load(tiny_w3)
        ps = zparams.build(m, mode, directions)
        snap = {k: (w.codes.copy(), w.scales.copy(), w.zeros.copy()) if hasattr(w, "codes") else
                np.array(getattr(w, "weight", w), copy=True) for k, w in m.weights.items()}
        tok = np.arange(40)[None] % m.cfg.vocab_size
        before = m.net.sequence_nll(tok)[0]
        ps.perturb(5, 0.3, "gaussian")
        mid = m.net.sequence_nll(tok)[0]
        ps.perturb(6, -0.01, "rademacher", layers=[1])
        ps.restore()
        assert mid != before
        for k, w in m.weights.items():
            if hasattr(w, "codes"):
                assert all(np.array_equal(x, y) for x, y in zip((w.codes, w.scales, w.zeros), snap[k])), (mode, k)
            else:
                assert np.array_equal(np.asarray(getattr(w, "weight", w)), snap[k]), (mode, k)
        assert m.net.sequence_nll(tok)[0] == before


def test_probe_restores_even_if_the_loss_raises():
    theta = np.arange(5, dtype=np.float32)
    ps = zparams.from_arrays({"t": theta})

    def boom(sign):
        raise RuntimeError("x")
    with pytest.raises(RuntimeError):
        spsa.probe(ps, boom, 1, 0.5)
    assert np.array_equal(theta, np.arange(5, dtype=np.float32))


def test_update_equals_numpy_reimplementation():
    """θ ← θ − lr·ĝ/K·z per probe (relative for 'mult' tensors), ĝ = clip(g, ±c·RMS)/RMS with the running
    RMS of all g so far; z from the NumPy reference generator."""
    rng = np.random.default_rng(1)
    s = rng.uniform(0.01, 0.1, 300).astype(np.float32)
    zz = rng.standard_normal(200).astype(np.float32)
    ps = zparams.from_arrays({"s": s, "z": zz}, mult={"s": True})
    opt = optim.ZOSGD(lr=3e-2, clip=1.5)
    ref_s, ref_z_, g2, n = s.copy(), zz.copy(), 0.0, 0
    gs = [0.7, -2.0, 0.1, 5.0, -0.3, 0.0]
    for t in range(1, 4):
        probes = [spsa.Probe(spsa.direction_seed(9, t, k), gs[2 * (t - 1) + k], 0.0, 0.0) for k in range(2)]
        opt.step(ps, probes, t)
        for p in probes:
            g2 += p.g ** 2
            n += 1
            r = math.sqrt(g2 / n)
            gh = max(-1.5 * r, min(1.5 * r, p.g)) / r
            c = np.float32(-3e-2 * gh / 2)
            z0 = ref_z(p.seed, 0, s.size, "gaussian")
            z1 = ref_z(p.seed, 1, zz.size, "gaussian")
            ref_s = ref_s + (c * z0) * ref_s
            ref_z_ = ref_z_ + c * z1
    np.testing.assert_allclose(s, ref_s, rtol=1e-6, atol=0)
    np.testing.assert_allclose(zz, ref_z_, rtol=1e-6, atol=1e-9)
    assert opt.state()["g_count"] == 6


def test_gains_scale_perturbation_and_update_of_their_part_only():
    """--gain PART=X: perturbation and update of that part's tensors use X·z (the NumPy reference z),
    the other parts are untouched by the gain, restore stays exact."""
    rng = np.random.default_rng(3)
    arrays = {"model.layers.0.mlp.up_proj.weight.scales": rng.uniform(0.01, 0.1, 128).astype(np.float32),
              "model.layers.0.mlp.up_proj.weight.zeros": rng.uniform(0, 7, 128).astype(np.float32),
              "model.norm.weight": rng.uniform(0.5, 2, 64).astype(np.float32)}
    mult = {k: not k.endswith("zeros") for k in arrays}
    base = {k: v.copy() for k, v in arrays.items()}
    ps = zparams.from_arrays(arrays, mult, gains={"final_norm": 4.0, "zeros": 0.5})
    assert [e.gain for e in ps.entries] == [1.0, 0.5, 4.0]
    ps.perturb(77, 1e-2)
    for tid, (k, v) in enumerate(arrays.items()):
        az = np.float32(1e-2 * ps.entries[tid].gain) * ref_z(77, tid, v.size, "gaussian")
        want = base[k] + az * base[k] if mult[k] else base[k] + az
        np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)
    ps.restore()
    assert all(np.array_equal(v, base[k]) for k, v in arrays.items())
    ps.update(78, -3e-3)
    for tid, (k, v) in enumerate(arrays.items()):
        az = np.float32(-3e-3 * ps.entries[tid].gain) * ref_z(78, tid, v.size, "gaussian")
        want = base[k] + az * base[k] if mult[k] else base[k] + az
        np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gains, msg", [({"bias": 2.0}, "unknown part"), ({"norms": 0.0}, "positive"),
                                        ({"norms": float("nan")}, "positive"), ({"norms": "x"}, "not a number")])
def test_bad_gains(gains, msg):
    with pytest.raises(TinyzqError, match=msg):
        zparams.check_gains(gains)


def test_gains_precondition_the_expectation():
    """With gains c the forward estimator's expected update direction is diag(c²)·grad (a quadratic,
    K = 4 directions per step, within 5 standard errors)."""
    a, b, theta = _quadratic(seed=8)
    n1 = theta.size // 2
    t1, t2 = theta[:n1].copy(), theta[n1:].copy()
    ps = zparams.from_arrays({"x.scales": t1, "x.zeros": t2}, gains={"zeros": 3.0})
    grad = a * theta.astype(np.float64) + b

    def f(sign):
        t = np.concatenate([t1, t2]).astype(np.float64)
        return float(0.5 * np.sum(a * t * t) + b @ t)

    n, k, eps = 1000, 4, 1e-3
    samples = []
    for t in range(1, n + 1):
        for p in spsa.estimate(ps, f, 321, t, eps, n_dirs=k, estimator="forward"):
            z = np.concatenate([ref_z(p.seed, 0, n1, "gaussian"), 3.0 * ref_z(p.seed, 1, theta.size - n1, "gaussian")])
            samples.append(p.g * z.astype(np.float64))
    samples = np.array(samples)
    se = samples.std(axis=0) / math.sqrt(len(samples))
    want = grad * np.r_[np.ones(n1), 9.0 * np.ones(theta.size - n1)]
    assert np.all(np.abs(samples.mean(axis=0) - want) < 5 * se + 1e-3)
    assert np.mean(np.abs(samples.mean(axis=0)[n1:])) > 3 * np.mean(np.abs(grad[n1:]))  # the gain shows


def _rowcol_ref(seed, tid, shape, dist="gaussian"):
    """z of a `rowcol` direction from the NumPy reference generator: (a[r] + b[c]) / √2."""
    a = ref_z(seed, zparams._ROW_STREAM + tid, shape[0], dist)
    b = ref_z(seed, zparams._COL_STREAM + tid, shape[1], dist)
    return (a[:, None] + b[None, :]) * np.float32(math.sqrt(0.5))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_rowcol_estimator_expectation_is_the_projected_gradient(dist):
    """With rowcol directions, Cov(z) = C with C[(r,c),(r',c')] = (δrr' + δcc')/2, so E[g z] = C·grad
    (on a quadratic g = zᵀgrad): the mean of N probes is within 5 standard errors of C·grad."""
    R, Cn = 4, 3
    a, b, theta = _quadratic(R * Cn, seed=3)
    theta = theta.reshape(R, Cn)
    ps = zparams.from_arrays({"theta": theta}, directions="rowcol")
    grad = (a * theta.reshape(-1).astype(np.float64) + b)

    def f(sign):
        t = theta.reshape(-1).astype(np.float64)
        return float(0.5 * np.sum(a * t * t) + b @ t)

    r, c = np.divmod(np.arange(R * Cn), Cn)
    cov = 0.5 * ((r[:, None] == r[None, :]).astype(float) + (c[:, None] == c[None, :]))
    n, eps = 4000, 1e-2
    samples = []
    for t in range(1, n + 1):
        p = spsa.probe(ps, f, spsa.direction_seed(321, t), eps, dist)
        samples.append(p.g * _rowcol_ref(p.seed, 0, (R, Cn), dist).reshape(-1).astype(np.float64))
    samples = np.array(samples)
    se = samples.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(samples.mean(axis=0) - cov @ grad) < 5 * se + 1e-3)
    assert not np.allclose(cov @ grad, grad, atol=0.3)  # the test tells the two apart


def test_rowcol_update_equals_numpy_reimplementation():
    """rowcol: live = base ± ε·z and base += c·z (relative for mult tensors) with z = (a[r] + b[c])/√2;
    1-D tensors (norms) keep dense directions; restore is exact."""
    rng = np.random.default_rng(4)
    s = rng.uniform(0.01, 0.1, (6, 5)).astype(np.float32)
    zz = rng.standard_normal((6, 5)).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, 7).astype(np.float32)
    s0, zz0, nw0 = s.copy(), zz.copy(), nw.copy()
    ps = zparams.from_arrays({"s": s, "z": zz, "n": nw}, mult={"s": True, "n": True}, directions="rowcol")
    ps.perturb(11, 0.25)
    np.testing.assert_array_equal(s, s0 + (np.float32(0.25) * _rowcol_ref(11, 0, s.shape)) * s0)
    np.testing.assert_array_equal(zz, zz0 + np.float32(0.25) * _rowcol_ref(11, 1, zz.shape))
    np.testing.assert_array_equal(nw, nw0 + (np.float32(0.25) * ref_z(11, 2, nw.size, "gaussian")) * nw0)
    ps.restore()
    assert np.array_equal(s, s0) and np.array_equal(zz, zz0) and np.array_equal(nw, nw0)
    ps.update(12, -0.125)
    np.testing.assert_array_equal(s, s0 + (np.float32(-0.125) * _rowcol_ref(12, 0, s.shape)) * s0)
    np.testing.assert_array_equal(zz, zz0 + np.float32(-0.125) * _rowcol_ref(12, 1, zz.shape))
    with pytest.raises(TinyzqError, match="--directions"):
        zparams.from_arrays({"s": s}, directions="lowrank")


def test_update_bitexact_with_rademacher():
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    ps = zparams.from_arrays({"x": x})
    want = x + np.float32(-0.125) * ref_z(77, 0, x.size, "rademacher")
    ps.update(77, -0.125, "rademacher")
    assert np.array_equal(x, want)


def test_schedules():
    assert optim.lr_at(1, 1.0) == 1.0
    assert optim.lr_at(5, 1.0, "constant", warmup=10) == 0.5
    # decays start at the peak on the first step after warm-up and reach 0 one step after the last
    assert abs(optim.lr_at(10, 1.0, "linear", total=10) - 0.1) < 1e-12
    assert optim.lr_at(1, 1.0, "linear", total=11) == 1.0 and optim.lr_at(1, 1.0, "cosine", total=1) == 1.0
    assert abs(optim.lr_at(6, 1.0, "cosine", total=10) - 0.5) < 1e-12
    assert abs(optim.lr_at(13, 1.0, "linear", warmup=2, total=22) - 0.5) < 1e-12
    assert optim.lr_at(2, 1.0, "cosine", warmup=2, total=22) == 1.0  # warm-up ends at the peak
    assert optim.lr_at(1, 1.0, "cosine") == 1.0  # length not known yet (a time budget's first steps): the peak
    with pytest.raises(TinyzqError):
        optim.lr_at(1, 1.0, "step")


def test_raw_gradient_clipping():
    opt = optim.ZOSGD(1.0, normalize=False, clip=0.2)
    assert opt.project(5.0) == 0.2 and opt.project(-0.1) == -0.1
    assert optim.ZOSGD(1.0, normalize=False, clip=None).project(7.0) == 7.0
