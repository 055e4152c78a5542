"""Calibrated quantization methods (tinyzq.quant: gptq, awq, blockzo, the block-wise driver) and the
calibration command line. GPTQ is checked against an independent NumPy transcription of the published
algorithm (Frantar et al. 2022, Algorithm 1 with group-wise params); AWQ folding must leave the float model
unchanged; every method must lower the layer (or block) output error below RTN."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyzq import api
from tinyzq.errors import TinyzqError
from tinyzq.model import rms_norm, silu
from tinyzq.quant import quantizer as Q
from tinyzq.quant.blockwise import Quantizer, block_forward, parse_method, quantize_blocks
from tinyzq.quant.gptq import gptq_quantize, inverse_upper_cholesky, search_params


# ------------------------------------------------------------------------------ independent reference
def ref_gptq(W, X, bits, group, damp=0.01, act_order=False):
    """GPTQ as published, one column at a time, fp64, no lazy batching (group params = min/max of the
    current weights of the group when its first column is reached; with act_order, of the original
    weights, fixed up front)."""
    W = np.array(W, np.float64)
    H = 2.0 * X.astype(np.float64).T @ X.astype(np.float64)
    n = W.shape[1]
    maxq = 2 ** bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(wg):
        lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
        s = (hi - lo) / maxq
        return s, np.round(-lo / s)

    static = [params(W[:, g:g + group]) for g in range(0, n, group)] if act_order else None
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # H⁻¹ = Uᵀ U
    q_all = np.zeros_like(W)
    for j in range(n):
        if act_order:
            s, z = static[perm[j] // group]
        elif j % group == 0:
            s, z = params(W[:, j:j + group])
        q = np.clip(np.round(W[:, j] / s + z), 0, maxq)
        q_all[:, j] = q
        err = (W[:, j] - s * (q - z)) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    return q_all[:, np.argsort(perm)]


def correlated_inputs(rng, n, d, outliers=4):
    X = rng.standard_normal((n, 16)) @ rng.standard_normal((16, d)) + 0.5 * rng.standard_normal((n, d))
    X[:, rng.choice(d, outliers, replace=False)] *= 8.0  # a few loud channels, as in real LLMs
    return X.astype(np.float32)


def out_err(X, W, q, s, z, group):
    return float(np.sum((X.astype(np.float64) @ (Q.dequantize(q, s, z, group) - W).T.astype(np.float64)) ** 2))


# ------------------------------------------------------------------------------ GPTQ
def test_inverse_upper_cholesky():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((400, 150))
    H = A.T @ A
    U = inverse_upper_cholesky(H)
    assert np.allclose(np.tril(U, -1), 0)
    assert np.allclose(U.T @ U, np.linalg.inv(H), rtol=1e-8, atol=1e-12)
    assert np.allclose(U, np.linalg.cholesky(np.linalg.inv(H)).T, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_matches_reference(bits, act_order):
    rng = np.random.default_rng(bits + 10 * act_order)
    X = correlated_inputs(rng, 512, 256)
    W = rng.standard_normal((48, 256)).astype(np.float32)
    q, s, z = gptq_quantize(W, X.T @ X, bits, 64, act_order=act_order, fp16=False)
    q_ref = ref_gptq(W, X, bits, 64, act_order=act_order)
    assert np.mean(q == q_ref) > 0.995  # fp32 vs fp64: a handful of codes at rounding ties may differ
    e, e_ref = out_err(X, W, q, s, z, 64), None
    # the reference's own error with the same group params
    e_ref = float(np.sum((X.astype(np.float64) @ (np.repeat(s, 64, 1) * (q_ref - np.repeat(z, 64, 1)) - W).T) ** 2))
    assert abs(e / e_ref - 1) < 0.02


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_method_beats_rtn_on_random_layers(bits):
    rng = np.random.default_rng(bits)
    X = correlated_inputs(rng, 1024, 256)
    W = (rng.standard_normal((64, 256)) * rng.uniform(0.5, 2, 256)).astype(np.float32)
    e_rtn = out_err(X, W, *Q.quantize_rtn(W, bits, 64), 64)
    errs = {}
    for base in ("search", "gptq", "gptq+search"):
        q, s, z = Quantizer(base, bits, 64)([_Lin(W)], ["w"], X)[0]
        errs[base] = out_err(X, W, q, s, z, 64)
    q, s, z = gptq_quantize(W, X.T @ X, bits, 64, act_order=True)
    errs["gptq act_order"] = out_err(X, W, q, s, z, 64)
    assert all(e < e_rtn for e in errs.values()), (e_rtn, errs)
    assert errs["gptq+search"] < errs["search"]  # error feedback on top of the search helps


class _Lin:
    def __init__(self, w):
        self.weight, self.bias = w, None
        self.out_features, self.in_features = w.shape


def test_gptq_dead_inputs_and_errors():
    rng = np.random.default_rng(1)
    X = correlated_inputs(rng, 256, 128)
    X[:, 5] = 0  # an input never driven
    W = rng.standard_normal((8, 128)).astype(np.float32)
    q, s, z = gptq_quantize(W, X.T @ X, 3, 64)
    assert q.dtype == np.uint8 and q.max() <= 7 and np.isfinite(s).all()
    with pytest.raises(TinyzqError, match="Hessian"):
        gptq_quantize(W, np.eye(64), 3, 64)
    with pytest.raises(TinyzqError, match="group size"):
        gptq_quantize(W, X.T @ X, 3, 48)
    assert search_params(W[:, :64], 3, np.ones(64))[0].shape == (8,)


# ------------------------------------------------------------------------------ method names
def test_parse_method():
    assert parse_method("awq+gptq").name == "awq+gptq"
    assert parse_method("gptq+awq").name == "awq+gptq"
    assert parse_method("search+gptq").base == "gptq+search"
    assert parse_method("awq").base == "rtn" and parse_method("awq").awq
    assert parse_method("gptq+blockzo").blockzo
    for bad, msg in [("magic", "unknown part"), ("rtn+gptq", "rtn cannot"), ("gptq+gptq", "twice"), ("", "must be")]:
        with pytest.raises(TinyzqError, match=msg):
            parse_method(bad)


# ------------------------------------------------------------------------------ on the tiny random model
@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return tiny_hf_dir


def _tiny_windows(m, n=4, T=64):
    from tinyzq.data import default_text

    ids = np.asarray(m.tokenizer.encode(default_text()[:40_000]))
    return ids[: n * T].reshape(n, T)


def test_awq_folding_keeps_the_float_model(tiny):
    from tinyzq.quant.awq import awq_block
    from tinyzq.quant.blockwise import _rope

    m = api.load(tiny)
    wins = _tiny_windows(m)
    want = m.net.hidden(wins)
    cos, sin = _rope(m.net, wins.shape[1])
    x = m.net.embed.take(wins.reshape(-1)).reshape(*wins.shape, -1)
    for i, layer in enumerate(m.net.layers):
        alphas = awq_block(m.net, i, layer, x, cos, sin, bits=2, group=32, grid=10)
        assert set(alphas) == {"qkv", "o", "gate_up", "down"}
        x = block_forward(m.net, i, layer, x, cos, sin)
    got = m.net.hidden(wins)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


@pytest.mark.parametrize("bits", [2, 3])
def test_block_methods_beat_rtn_on_tiny_model(tiny, bits):
    """Model-level: hidden-state error of the calibrated methods below RTN's (on the calibration windows)."""
    errs = {}
    ref = api.load(tiny)
    wins = _tiny_windows(ref)
    want = ref.net.hidden(wins)
    for method in ("rtn", "search", "awq", "gptq", "awq+gptq"):
        m = api.load(tiny)
        quantize_blocks(m.net, wins, bits, 32, method)
        errs[method] = float(np.mean((m.net.hidden(wins) - want) ** 2))
    assert all(errs[k] < errs["rtn"] for k in errs if k != "rtn"), errs


def test_blockzo_lowers_block_mse(tiny):
    from tinyzq.quant.blockwise import _rope, quantize_block_sequential
    from tinyzq.quant.blockzo import blockzo_block

    m = api.load(tiny)
    wins = _tiny_windows(m)
    cos, sin = _rope(m.net, wins.shape[1])
    x = m.net.embed.take(wins.reshape(-1)).reshape(*wins.shape, -1)
    layer = m.net.layers[0]
    y_f = block_forward(m.net, 0, layer, x, cos, sin)
    quantize_block_sequential(m.net, 0, layer, x, cos, sin, Quantizer("rtn", 2, 32))
    r = blockzo_block(m.net, 0, layer, x, y_f, cos, sin, steps=60, lr=1e-2)
    assert r["kept"] and r["loss_after"] < 0.97 * r["loss_before"], r
    mse = float(np.mean((block_forward(m.net, 0, layer, x, cos, sin) - y_f) ** 2)) / float(np.mean(y_f ** 2))
    assert abs(mse / r["loss_after"] - 1) < 1e-4


# ------------------------------------------------------------------------------ command line
def run(*args):
    return subprocess.run([sys.executable, "-m", "tinyzq", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("content,needle", [(b"", "no text"), (b" \n\n ", "no text"), (b"Hi.", "only"),
                                            (b"caf\xe9 au lait " * 50, "not UTF-8")])
def test_bad_calibration_text(tiny, tmp_path, content, needle):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    p = run("quantize", tiny, tmp_path / "o", "--bits", 3, "--group", 32, "--method", "gptq", "--calib", f)
    assert_one_line_error(p, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [(("--method", "gptq+magic"), "magic"),
                                         (("--calib-tokens", 4), "at least 16"),
                                         (("--calib-tokens", 512, "--calib-windows", 2), "not both")])
def test_bad_method_options(tiny, tmp_path, args, needle):
    assert_one_line_error(run("quantize", tiny, tmp_path / "o", "--bits", 3, "--group", 32, *args), needle)


def test_quantize_cli_awq_gptq(tiny, tmp_path):
    from tinyzq.data import default_text

    f = tmp_path / "calib.txt"
    f.write_text(default_text()[:20_000], encoding="utf-8")
    out = tmp_path / "q.tzq"
    p = run("quantize", tiny, out, "--bits", 3, "--group", 32, "--method", "gptq+awq", "--calib", f,
            "--calib-tokens", 300)
    assert p.returncode == 0, p.stderr
    assert "awq+gptq" in p.stdout
    m = api.load(out)
    assert m.meta["method"] == "awq+gptq" and m.meta["bits"] == 3
    assert np.isfinite(m.perplexity(default_text()[-20_000:], 64, 4)["ppl"])


# ------------------------------------------------------------------------------ the real SmolLM2 (short)
@pytest.fixture(scope="module")
def real_block(smollm2_gguf):
    """SmolLM2 block 2 with its float inputs from 2 windows of 256 training-split tokens."""
    from tinyzq.data import default_text, split_text
    from tinyzq.quant.blockwise import _rope

    m = api.load(smollm2_gguf)
    ids = np.asarray(m.tokenizer.encode(split_text(default_text())[0][:20_000]))[:512].reshape(2, 256)
    cos, sin = _rope(m.net, 256)
    x = m.net.embed.take(ids.reshape(-1)).reshape(2, 256, -1)
    for i in range(2):
        x = block_forward(m.net, i, m.net.layers[i], x, cos, sin)
    return m, x, cos, sin


@pytest.mark.real
def test_real_layer_methods_beat_rtn(real_block):
    m, x, cos, sin = real_block
    layer = m.net.layers[2]
    h = rms_norm(x, layer.mlp_norm, m.cfg.rms_norm_eps)
    a = (silu(layer.gate(h)) * layer.up(h)).reshape(-1, 1536)  # down_proj's input: outlier channels
    W = layer.down.weight
    for bits in (2, 3):
        e_rtn = out_err(a, W, *Q.quantize_rtn(W, bits, 64), 64)
        errs = {base: out_err(a, W, *Quantizer(base, bits, 64)([layer.down], ["down"], a)[0], 64)
                for base in ("search", "gptq", "gptq+search")}
        assert all(e < 0.8 * e_rtn for e in errs.values()), (bits, e_rtn, errs)


@pytest.mark.real
def test_real_block_awq_and_blockzo(real_block):
    import copy

    from tinyzq.quant.awq import awq_block
    from tinyzq.quant.blockwise import quantize_block_sequential
    from tinyzq.quant.blockzo import blockzo_block

    m, x, cos, sin = real_block
    y_f = block_forward(m.net, 2, m.net.layers[2], x, cos, sin)

    def rtn_block_err(layer):
        quantize_block_sequential(m.net, 2, layer, x, cos, sin, Quantizer("rtn", 3, 64))
        return float(np.mean((block_forward(m.net, 2, layer, x, cos, sin) - y_f) ** 2))

    plain = copy.deepcopy(m.net.layers[2])
    scaled = copy.deepcopy(m.net.layers[2])
    awq_block(m.net, 2, scaled, x, cos, sin, bits=3, group=64, grid=5)
    assert np.allclose(block_forward(m.net, 2, scaled, x, cos, sin), y_f, rtol=1e-4, atol=1e-3 * np.abs(y_f).max())
    e_plain, e_awq = rtn_block_err(plain), rtn_block_err(scaled)
    assert e_awq < e_plain, (e_awq, e_plain)
    r = blockzo_block(m.net, 2, plain, x, y_f, cos, sin, steps=6)
    assert r["loss_after"] <= r["loss_before"]


def test_bench_quality_json_and_svg(tiny, tmp_path):
    import json

    from tinyzq.data import default_text

    text = tmp_path / "val.txt"
    text.write_text(default_text()[-20_000:], encoding="utf-8")
    out = tmp_path / "q.json"
    p = run("bench", "quality", tiny, "--bits", "3", "--groups", "32", "--methods", "rtn,gptq", "--text", text,
            "--ctx", 64, "--max-windows", 2, "--calib-tokens", 256, "--json", out)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["float"]["ppl"] > 1 and [c["method"] for c in res["cells"]] == ["rtn", "gptq"]
    for c in res["cells"]:
        assert c["bits"] == 3 and c["group"] == 32 and c["bits_per_weight"] == 4.0
        assert c["ppl"] > 1 and c["quantize_seconds"] > 0 and c["peak_rss_mb"] > 0
    assert (tmp_path / "q.svg").read_text().startswith("<svg")
    bad = run("bench", "quality", tiny, "--methods", "rtn,nope", "--json", tmp_path / "x.json")
    assert_one_line_error(bad, "nope")
