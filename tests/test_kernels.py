"""The C kernels (tinyzq.kernels) against the NumPy reference (tinyzq/quant/packing.py).

- C reference module == NumPy reference exactly: pack, unpack, dequantize, gather, activation
  quantization, and the int8-activation product (same fp32 operations in the same order).
- Every ISA path built and supported here == the C reference: bit for bit for everything but the
  product, whose SIMD variants reorder float additions (tolerance 1e-5 of the magnitude
  sum_j |s| (|q| + |z|) |x_j| of the terms they add).
- Dispatch: TINYZQ_ISA forces a path (checked in a subprocess), bogus or unsupported values give
  a one-line ValueError; results do not depend on the thread count; bad inputs -> ValueError.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyzq
from tinyzq import kernels as K
from tinyzq.quant import packing as P

SETTINGS = settings(max_examples=50, deadline=None)
BITS = (2, 3, 4, 8)
ISAS = K.available_isas()
SIMD = [i for i in ISAS if i != "ref"]
REF = K.Kernels("ref")


@st.composite
def layouts(draw, max_blocks=20, max_rows=24):
    bits = draw(st.sampled_from(BITS))
    nblocks = draw(st.integers(1, max_blocks))
    bpg = draw(st.sampled_from([k for k in range(1, nblocks + 1) if nblocks % k == 0]))
    rows = draw(st.integers(1, max_rows))
    return bits, rows, 32 * nblocks, 32 * bpg


def make_weight(rng, bits, rows, cols, group):
    q = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    g = cols // group
    s = (rng.uniform(0.001, 0.05, (rows, g)) * rng.choice([-1, 1], (rows, g))).astype(np.float32)
    z = rng.uniform(-1, (1 << bits), (rows, g)).astype(np.float32)
    return q, P.pack(q, bits), s, z


def magnitude(x, q, s, z, group):
    """sum_j |s| (|q| + |z|) |x_j|: the size of the terms the product adds up, [n, rows]."""
    w = np.abs(s).repeat(group, 1).astype(np.float64) * (q + np.abs(z).repeat(group, 1))
    return np.abs(x).astype(np.float64) @ w.T


# ------------------------------------------------------------------ dispatch and environment

def test_default_isa_is_best_available():
    assert ISAS[-1] == "ref"
    assert K.isa() in ISAS
    if not os.environ.get("TINYZQ_ISA"):
        assert K.isa() == ISAS[0]
    for name in ISAS:
        assert K.Kernels(name).name == name
        assert K.get(name).ffi.string(K.get(name).lib.tzq_isa_name()).decode() == name


def test_requirements_table_matches_c():
    feats = K.cpu_features()
    bits = REF.lib.tzq_cpu_features()
    assert isinstance(feats, dict) and all(isinstance(v, bool) for v in feats.values())
    for name in ISAS:
        req = K.get(name).lib.tzq_isa_requires()
        assert req == sum(K._FEATURE_BITS[f] for f in K._REQUIRES[name])
        assert bits & req == req


@pytest.mark.skipif(not sys.platform.startswith("linux") or K.cpu_features().get("sse2") is None,
                    reason="x86 Linux only")
def test_cpu_features_agree_with_proc_cpuinfo():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    feats = K.cpu_features()
    for ours, linux in [("sse2", "sse2"), ("ssse3", "ssse3"), ("sse4_1", "sse4_1"), ("avx", "avx"),
                        ("avx2", "avx2"), ("fma", "fma"), ("f16c", "f16c"), ("avx512f", "avx512f"),
                        ("avx512bw", "avx512bw"), ("avx512vl", "avx512vl"), ("avx512vnni", "avx512_vnni")]:
        assert feats[ours] == (linux in flags), ours


def test_unsupported_isas_are_refused_cleanly():
    for name in K.ALL_ISAS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="valid choices here"):
                K.Kernels(name)
    with pytest.raises(ValueError, match="valid choices here"):
        K.Kernels("sse9")


def _run(code, **env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(tinyzq.__file__)))
    e = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_forced_isa_in_subprocess():
    code = "import tinyzq.kernels as k; print(k.isa())"
    for name in ISAS:
        r = _run(code, TINYZQ_ISA=name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name
    r = _run(code, TINYZQ_ISA="bogus")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "ValueError" in last or "KernelError" in last
    assert "TINYZQ_ISA='bogus'" in last and "valid choices here: " + ", ".join(ISAS) in last
    for name in K.ALL_ISAS:
        if name not in ISAS:
            r = _run(code, TINYZQ_ISA=name)
            assert r.returncode != 0 and "not available" in r.stderr.strip().splitlines()[-1]


def test_threads_env_in_subprocess():
    r = _run("import tinyzq.kernels as k; print(k.get_threads())", TINYZQ_THREADS="3")
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    for bad in ("0", "zero"):
        r = _run("import tinyzq.kernels as k; print(k.get_threads())", TINYZQ_THREADS=bad)
        assert r.returncode != 0 and "TINYZQ_THREADS" in r.stderr.strip().splitlines()[-1]


def test_use_context_manager():
    before = K.isa()
    with K.use("ref") as k:
        assert K.isa() == "ref" and k.name == "ref"
    assert K.isa() == before


# ------------------------------------------------------------------ C reference == NumPy reference (exact)

@SETTINGS
@given(layouts(), st.integers(0, 2**32 - 1))
def test_pack_unpack_match_numpy(layout, seed):
    bits, rows, cols, _ = layout
    q = np.random.default_rng(seed).integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    c = P.pack(q, bits)
    for name in ISAS:
        k = K.get(name)
        assert np.array_equal(k.pack(q, bits), c)
        assert np.array_equal(k.unpack(c, bits, cols), q)


@SETTINGS
@given(layouts(), st.integers(0, 2**32 - 1))
def test_dequantize_and_gather_match_numpy_exactly(layout, seed):
    bits, rows, cols, group = layout
    rng = np.random.default_rng(seed)
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    W = P.dequantize(c, s, z, bits, group)
    a, b = sorted(rng.integers(0, rows + 1, 2))
    ids = rng.integers(0, rows, size=7)
    for name in ISAS:  # the ref and every SIMD path: bit for bit (no FMA in dequantization)
        k = K.get(name)
        assert np.array_equal(k.dequantize(c, s, z, bits, group), W), name
        assert np.array_equal(k.dequantize(c, s, z, bits, group, a, b), W[a:b]), name
        assert np.array_equal(k.gather_rows(c, s, z, bits, group, ids), W[ids]), name


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-39, 1e-20, 1e-3, 1.0, 1e3, 1e30]))
def test_quantize_activations_match_numpy_exactly(n, nblocks, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 32 * nblocks)) * scale).astype(np.float32)
    x[:, rng.integers(0, 32 * nblocks, 3)] = 0
    if nblocks > 1:
        x[0, :32] = 0  # an all-zero block
    xi, d = P.quantize_activations(x)
    for name in ISAS:
        xi2, d2 = K.get(name).quantize_activations(x)
        assert np.array_equal(xi2, xi) and np.array_equal(d2, d), name


def test_quantize_activations_special_values_match_numpy():
    x = np.zeros((3, 64), dtype=np.float32)
    x[0, 0] = 127
    x[0, 1:11] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, -126.5]
    x[1, 32:34] = [1e-40, -1e-40]  # subnormal block max: 1/d overflows
    x[2, :32] = 3.0
    xi, d = P.quantize_activations(x)
    for name in ISAS:
        xi2, d2 = K.get(name).quantize_activations(x)
        assert np.array_equal(xi2, xi) and np.array_equal(d2, d), name


def test_quantize_activations_simd_equals_c_reference_on_ties_and_non_finite():
    """The SIMD activation quantizers (qgemm_x86.c) are bit-identical to the scalar C reference, also
    on exact .5 ties after scaling, +-0, infinities and NaN (which the reference skips in the block max)."""
    rng = np.random.default_rng(7)
    x = (rng.integers(-254, 255, size=(4, 32 * 9)) / 2).astype(np.float32)
    x[:, ::32] = 127.0  # d = 1: every half-integer is a tie
    x[1, 40:48] = [np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-40, -1e-40, 3e38]
    x[2, 64:96] = np.nan
    x[3, 96:128] = rng.standard_normal(32).astype(np.float32) * np.float32(1e-39)
    ref = K.get("ref").quantize_activations(x)
    for name in ISAS:
        xi, d = K.get(name).quantize_activations(x)
        assert np.array_equal(xi, ref[0]) and np.array_equal(d, ref[1], equal_nan=True), name


@SETTINGS
@given(layouts(), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_qmatmul_c_ref_matches_numpy_ref_exactly(layout, n, seed):
    bits, rows, cols, group = layout
    rng = np.random.default_rng(seed)
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    assert np.array_equal(REF.qmatmul(x, c, s, z, bits, group), P.qmatmul_ref(x, c, s, z, bits, group))


# ------------------------------------------------------------------ every ISA path == C reference

@pytest.mark.skipif(not SIMD, reason="no SIMD path on this CPU/build")
@SETTINGS
@given(layouts(), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_qmatmul_simd_matches_ref(layout, n, seed):
    bits, rows, cols, group = layout
    rng = np.random.default_rng(seed)
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    x = (rng.standard_normal((n, cols)) * rng.uniform(0.01, 100, (n, 1))).astype(np.float32)
    y_ref = REF.qmatmul(x, c, s, z, bits, group)
    tol = 1e-5 * magnitude(x, q, s, z, group) + 1e-30
    for name in SIMD:
        y = K.get(name).qmatmul(x, c, s, z, bits, group)
        assert y.dtype == np.float32 and y.shape == (n, rows)
        assert np.all(np.abs(y - y_ref) <= tol), name


# Shapes that exercise the SIMD steps: 4-bit steps are 64 inputs, 2/3-bit steps 128 (so 576 =
# 4.5 steps has a padded tail), groups that straddle steps (96, 192, 32), n tiles of 4.
SHAPES = [(bits, cols, group) for bits in BITS for cols, group in
          [(576, 64), (576, 96), (576, 192), (576, 32), (1536, 64), (160, 32), (96, 96), (224, 32)]]


@pytest.mark.parametrize("bits, cols, group", SHAPES)
def test_qmatmul_all_paths_model_shapes(bits, cols, group):
    rng = np.random.default_rng(bits * 1000 + cols + group)
    rows = 70
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    W = P.dequantize(c, s, z, bits, group)
    for n in (1, 4, 7):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        y_np = P.qmatmul_ref(x, c, s, z, bits, group)
        exact = x.astype(np.float64) @ W.astype(np.float64).T
        bound = P.error_bound(x, W)
        tol = 1e-5 * magnitude(x, q, s, z, group)
        for name in ISAS:
            y = K.get(name).qmatmul(x, c, s, z, bits, group)
            if name == "ref":
                assert np.array_equal(y, y_np)
            assert np.all(np.abs(y - y_np) <= tol), name
            # FORMAT.md: the error vs the fp32 product is bounded by the activation rounding
            assert np.all(np.abs(y - exact) <= bound + tol), name


@pytest.mark.parametrize("name", ISAS)
def test_qmatmul_extremes(name):
    """All codes at the top of the range, int8 activations at +-127: no int16 saturation."""
    k = K.get(name)
    for bits in BITS:
        cols, group, rows = 256, 64, 8
        q = np.full((rows, cols), (1 << bits) - 1, dtype=np.uint8)
        c = P.pack(q, bits)
        s = np.ones((rows, cols // group), np.float32)
        z = np.zeros((rows, cols // group), np.float32)
        for sign in (1, -1):
            x = np.full((3, cols), sign * 2.0, np.float32)
            y = k.qmatmul(x, c, s, z, bits, group)
            assert np.all(y == np.float32(sign * 2.0 * ((1 << bits) - 1) * cols)), (bits, sign)


@pytest.mark.parametrize("name", ISAS)
def test_results_do_not_depend_on_threads(name):
    k = K.get(name)
    rng = np.random.default_rng(5)
    try:
        # 2/3-bit, 576 columns: the last half step is done two rows at a time or alone (odd rows,
        # thread chunk edges), decode (n = 1) and prefill tiles
        for bits, rows, n in ((4, 1500, 3), (3, 1501, 1), (2, 1501, 1), (3, 1501, 3), (2, 1499, 2)):
            cols, group = 576, 64
            q, c, s, z = make_weight(rng, bits, rows, cols, group)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            k.set_threads(1)
            y1, w1 = k.qmatmul(x, c, s, z, bits, group), k.dequantize(c, s, z, bits, group)
            u1 = k.unpack(c, bits, cols)
            for t in (2, 3, 2):
                k.set_threads(t)
                assert k.get_threads() == t
                assert np.array_equal(k.qmatmul(x, c, s, z, bits, group), y1), (bits, t)
                assert np.array_equal(k.dequantize(c, s, z, bits, group), w1)
                assert np.array_equal(k.unpack(c, bits, cols), u1)
    finally:
        k.set_threads(K.get_threads())


def test_concurrent_calls_from_python_threads():
    """cffi releases the GIL: concurrent calls share the pool safely (a busy pool runs inline)."""
    import threading

    rng = np.random.default_rng(6)
    bits, rows, cols, group = 3, 800, 576, 192
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    xs = [rng.standard_normal((2, cols)).astype(np.float32) for _ in range(4)]
    expect = [K.qmatmul(x, c, s, z, bits, group) for x in xs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                got[i] = K.qmatmul(xs[i], c, s, z, bits, group)
                assert np.array_equal(got[i], expect[i])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


# ------------------------------------------------------------------ API details

def test_qmatmul_1d_out_and_readonly_inputs():
    rng = np.random.default_rng(7)
    q, c, s, z = make_weight(rng, 4, 10, 128, 64)
    x = rng.standard_normal(128).astype(np.float32)
    y = K.qmatmul(x, c, s, z, 4, 64)
    assert y.shape == (10,)
    assert np.array_equal(y, K.qmatmul(x[None], c, s, z, 4, 64)[0])
    out = np.empty((1, 10), np.float32)
    assert K.qmatmul(x[None], c, s, z, 4, 64, out=out) is out
    for a in (c, s, z, x):
        a.flags.writeable = False
    assert np.array_equal(K.qmatmul(x, c, s, z, 4, 64), y)
    assert K.dequantize(c, s, z, 4, 64).shape == (10, 128)


def test_dequantize_out_and_gather_shapes():
    rng = np.random.default_rng(8)
    q, c, s, z = make_weight(rng, 2, 12, 64, 32)
    W = P.dequantize(c, s, z, 2, 32)
    out = np.empty((4, 64), np.float32)
    assert K.dequantize(c, s, z, 2, 32, 3, 7, out=out) is out
    assert np.array_equal(out, W[3:7])
    assert K.dequantize(c, s, z, 2, 32, 5, 5).shape == (0, 64)
    ids = np.array([[0, 11], [3, 3]], dtype=np.int32)
    assert np.array_equal(K.gather_rows(c, s, z, 2, 32, ids), W[ids])
    assert K.gather_rows(c, s, z, 2, 32, np.zeros(0, np.int64)).shape == (0, 64)


def _bad_cases():
    rng = np.random.default_rng(9)
    q, c, s, z = make_weight(rng, 4, 6, 128, 64)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    qm = K.qmatmul
    return [
        ("x float64", lambda: qm(x.astype(np.float64), c, s, z, 4, 64), "float32"),
        ("x list", lambda: qm(x.tolist(), c, s, z, 4, 64), "numpy array"),
        ("x non-contiguous", lambda: qm(np.repeat(x, 2, 1)[:, ::2], c, s, z, 4, 64), "C-contiguous"),
        ("x fortran", lambda: qm(np.asfortranarray(x), c, s, z, 4, 64), "C-contiguous"),
        ("x wrong width", lambda: qm(x[:, :96].copy(), c, s, z, 4, 64), "columns"),
        ("x 3-D", lambda: qm(x[None], c, s, z, 4, 64), "1-D or 2-D"),
        ("codes int8", lambda: qm(x, c.view(np.int8), s, z, 4, 64), "uint8"),
        ("scales float64", lambda: qm(x, c, s.astype(np.float64), z, 4, 64), "float32"),
        ("scales shape", lambda: qm(x, c, s[:, :1].copy(), z, 4, 64), "shape"),
        ("zeros non-contiguous", lambda: qm(x, c, s, np.asfortranarray(np.repeat(z, 2, 0)[::2]), 4, 64), "C-contiguous"),
        ("group not dividing", lambda: qm(x, c, np.zeros((6, 1), np.float32), np.zeros((6, 1), np.float32), 4, 96), "does not divide"),
        ("group % 32", lambda: qm(x, c, np.zeros((6, 8), np.float32), np.zeros((6, 8), np.float32), 4, 16), "multiple of 32"),
        ("bits 5", lambda: qm(x, c, s, z, 5, 64), "bits"),
        ("out shape", lambda: qm(x, c, s, z, 4, 64, out=np.empty((2, 5), np.float32)), "shape"),
        ("out aliasing x", lambda: qm(x[:, :6], c, s, z, 4, 64, out=x[:, :6]), "."),
        ("pack too large", lambda: K.pack(np.full((2, 32), 4, np.uint8), 2), "2\\*\\*2"),
        ("pack width", lambda: K.pack(np.zeros((2, 40), np.uint8), 4), "multiple of 32"),
        ("unpack width", lambda: K.unpack(c, 4, 96), "bytes per row"),
        ("dequant rows", lambda: K.dequantize(c, s, z, 4, 64, 4, 9), "row range"),
        ("dequant out dtype", lambda: K.dequantize(c, s, z, 4, 64, out=np.empty((6, 128))), "float32"),
        ("gather range", lambda: K.gather_rows(c, s, z, 4, 64, np.array([0, 6])), "ids"),
        ("gather negative", lambda: K.gather_rows(c, s, z, 4, 64, np.array([-1])), "ids"),
        ("gather float ids", lambda: K.gather_rows(c, s, z, 4, 64, np.array([0.0])), "integer"),
        ("activations width", lambda: K.quantize_activations(np.zeros((2, 48), np.float32)), "multiple of 32"),
        ("threads", lambda: K.set_threads(0), "threads"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_one_line_value_errors(case):
    what, call, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value), what


# ------------------------------------------------------------------ the AVX-512 VNNI data path, emulated

@pytest.fixture(scope="module")
def vnni_emulated(tmp_path_factory):
    """The VNNI variant's code (layouts, 8-bit int8 path) with vpdpbusd emulated in AVX2, built
    here, so that it is tested on machines without AVX-512 (the real module cannot run there)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "avx2" not in ISAS or not os.path.isfile(os.path.join(root, "build_ext.py")):
        pytest.skip("needs AVX2 and the source tree (build_ext.py, csrc/)")
    spec = importlib.util.spec_from_file_location("_tzq_build_ext_for_tests", os.path.join(root, "build_ext.py"))
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    ffi = be._make_ffi("avx2", "TZQ_ISA_AVX2", ["-mavx2", "-mfma", "-mf16c", "-O1"], module="_tzq_vnni_emulated",
                       defines=["TZQ_EMULATE_VNNI"])
    tmp = str(tmp_path_factory.mktemp("vnni"))
    try:
        path = ffi.compile(tmpdir=tmp)
    except Exception as e:  # no compiler on this machine
        pytest.skip(f"cannot compile the emulated VNNI module: {e}")
    spec = importlib.util.spec_from_file_location("_tzq_vnni_emulated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return K.Kernels.from_module(mod, "avx512-emulated")


@pytest.mark.parametrize("bits, cols, group", SHAPES)
def test_vnni_path_equals_avx2_exactly(vnni_emulated, bits, cols, group):
    """For 2/3/4 bits the VNNI variant only swaps maddubs+madd for dpbusd: same int32 lane sums,
    same float code, so its results equal AVX2's bit for bit (and so must the real _tzq_avx512
    where it runs). 8-bit lanes hold other partial sums (int8 dpbusd vs int16 madd): within the
    reordering tolerance of the reference."""
    rng = np.random.default_rng(bits + cols + group)
    q, c, s, z = make_weight(rng, bits, 37, cols, group)
    for n in (1, 2, 3, 5):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        y = K.get("avx2").qmatmul(x, c, s, z, bits, group)
        paths = [vnni_emulated] + ([K.get("avx512")] if "avx512" in ISAS else [])
        for k in paths:
            got = k.qmatmul(x, c, s, z, bits, group)
            if bits == 8:
                tol = 1e-5 * magnitude(x, q, s, z, group)
                assert np.all(np.abs(got - REF.qmatmul(x, c, s, z, bits, group)) <= tol)
            else:
                assert np.array_equal(got, y)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="fork start method only")
def test_thread_pool_survives_fork():
    """A forked child (e.g. a multiprocessing data loader) starts with an empty pool and works."""
    import multiprocessing as mp

    rng = np.random.default_rng(10)
    bits, rows, cols, group = 4, 1200, 576, 64
    q, c, s, z = make_weight(rng, bits, rows, cols, group)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    old = K.get_threads()
    K.set_threads(2)
    y = K.qmatmul(x, c, s, z, bits, group)  # the parent's pool has workers now
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_fork_child, args=(b, x, c, s, z, bits, group))
    p.start()
    assert a.poll(60)
    assert np.array_equal(a.recv(), y)
    p.join(60)
    assert p.exitcode == 0
    assert np.array_equal(K.qmatmul(x, c, s, z, bits, group), y)
    K.set_threads(old)


def _fork_child(conn, x, c, s, z, bits, group):
    conn.send(K.qmatmul(x, c, s, z, bits, group))
