"""`tinyzq bench` on the tiny model: JSON keys and internal consistency (never timing thresholds),
`bench quality` routing, and the pieces bench relies on (bandwidth probe, fused projections, C attention)."""
import importlib.machinery
import json
import math
import sys
import types

import numpy as np
import pytest

from tinyzq import api, cli, kernels, model
from tinyzq.quant.packed import PackedLinear

KEYS = ("decode_tok_s", "prefill_tok_s", "train_forward_tok_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def tiny_w4(tiny_hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "w4")
    api.quantize(tiny_hf_dir, out, 4, 32, "rtn", progress=False)
    return out


@pytest.fixture(scope="module")
def bench_json(tiny_w4, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench_out") / "b.json")
    rc = cli.main(["bench", tiny_w4, "--threads", "2", "--json", path, "--repeats", "1", "--new-tokens", "6",
                   "--prompt-tokens", "40", "--train-batch", "2", "--train-ctx", "24"])
    assert rc == 0
    with open(path) as f:
        return json.load(f)


def test_bench_json_keys_and_consistency(bench_json):
    r = bench_json
    for k in KEYS + ("bandwidth_gb_s", "decode_bandwidth_fraction", "weight_bytes_per_token"):
        assert isinstance(r[k], float) or isinstance(r[k], int), k
        assert r[k] > 0, k
    assert r["settings"] == {"threads": 2, "repeats": 1, "decode_prompt_tokens": 16, "new_tokens": 6,
                             "prompt_tokens": 40, "train_batch": 2, "train_ctx": 24,
                             "many_row_product": "int16" if kernels.get().gemm16_fast else "fp32"}
    assert r["machine"]["threads"] == 2 and r["machine"]["isa"] in kernels.available_isas()
    assert math.isclose(r["decode_bandwidth_fraction"],
                        r["weight_bytes_per_token"] * r["decode_tok_s"] / (r["bandwidth_gb_s"] * 1e9), rel_tol=1e-9)
    assert r["peak_rss_mb"] == r["peak_rss_mb_by_phase"]["decode"]
    assert len(r["decode_tokens"]) == 6
    fp = r["reference"]["numpy_fp32"]
    for k in KEYS + ("decode_bandwidth_fraction", "weight_bytes_per_token"):
        assert fp[k] > 0, k
        assert math.isclose(r["ratios"]["numpy_fp32"][k], r[k] / fp[k], rel_tol=1e-9) if k in KEYS else True
    # the fp32 reference runs the same weights, dequantized: the same loss up to the int16 activation rounding
    # of our training forward (where it runs the int16 product; exactly the same otherwise), 4x bytes
    assert math.isclose(r["train_forward_loss"], fp["train_forward_loss"], rel_tol=1e-4)
    assert fp["weight_bytes_per_token"] > 2 * r["weight_bytes_per_token"]
    # the tiny model comes from a HF directory: no GGUF for llama.cpp
    assert "skipped" in r["reference"]["llama_cpp"] and "llama_cpp" not in r["ratios"]


def test_bench_table_printed(tiny_w4, capsys):
    rc = cli.main(["bench", tiny_w4, "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "8",
                   "--train-batch", "1", "--train-ctx", "8", "--no-numpy", "--no-llama-cpp"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "memory bandwidth" in out


def test_bench_missing_model_one_line_error(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bench_quality_routing(monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("tinyzq.bench_quality") is None:
        assert cli.main(["bench", "quality", "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "bench quality" in err
    seen = {}
    fake = types.ModuleType("tinyzq.bench_quality")
    fake.__spec__ = importlib.machinery.ModuleSpec("tinyzq.bench_quality", None)
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "tinyzq.bench_quality", fake)
    import tinyzq

    monkeypatch.setattr(tinyzq, "bench_quality", fake, raising=False)
    assert cli.main(["bench", "quality", "SRC", "--bits", "4"]) == 0
    assert seen["argv"] == ["SRC", "--bits", "4"]


def test_stream_read_checksum():
    buf = np.arange(100_003, dtype=np.uint8)
    words = np.frombuffer(buf[: buf.size // 8 * 8].tobytes(), dtype=np.uint64)
    want = (int(words.sum(dtype=np.uint64)) + int(buf[buf.size // 8 * 8:].sum())) % 2 ** 64
    for name in kernels.available_isas():
        assert kernels.get(name).stream_read(buf) == want


def test_fused_projections_are_views_and_see_inplace_updates(tiny_w4):
    m = api.load(tiny_w4)
    layer = m.net.layers[0]
    assert layer.qkv is not None and layer.gate_up is not None
    for part in (layer.q, layer.k, layer.v):
        for name in ("codes", "scales", "zeros"):
            assert np.shares_memory(getattr(part, name), getattr(layer.qkv.whole, name))
    x = np.random.default_rng(0).standard_normal((1, layer.q.in_features)).astype(np.float32)
    before = layer.qkv(x)
    layer.k.scales *= 2  # in place, as the ZO trainer does
    after = layer.qkv(x)
    q, k, v = layer.qkv.split(after)
    np.testing.assert_array_equal(q, layer.q(x))
    np.testing.assert_array_equal(k, layer.k(x))
    np.testing.assert_array_equal(v, layer.v(x))
    assert not np.array_equal(before, after)
    # a reassigned array breaks the views: detected, the model falls back to per-part calls
    layer.k.scales = layer.k.scales.copy()
    assert not layer.qkv.intact()
    out = m.net._proj(layer.qkv, [layer.q, layer.k, layer.v], x)
    np.testing.assert_array_equal(out[1], layer.k(x))


def test_decode_attention_step_matches_numpy_path(tiny_w4, monkeypatch):
    """The C attention step (T = 1) gives the NumPy path's hidden states (float32 rounding only)."""
    m = api.load(tiny_w4)
    net = m.net
    ids = np.arange(3, 23)[None]

    def run():
        cache = model.KVCache(net.cfg, 1, 32)
        net.hidden(ids[:, :8], cache)
        return np.stack([net.hidden(ids[:, t:t + 1], cache)[0, -1] for t in range(8, 20)])

    fast = run()
    monkeypatch.setattr(model, "_kernels", lambda: None)
    slow = run()
    assert np.abs(fast - slow).max() <= 1e-4 * np.abs(slow).max()


def test_fuse_refuses_mixed_parts():
    rng = np.random.default_rng(0)

    def lin(bits, cols=64, rows=32):
        q = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
        return PackedLinear.from_codes(q, np.ones((rows, cols // 32), np.float32), np.zeros((rows, cols // 32), np.float32),
                                       bits, 32)
    assert PackedLinear.fuse([lin(4), lin(3)]) is None
    assert PackedLinear.fuse([lin(4), lin(4, cols=96)]) is None
    f = PackedLinear.fuse([lin(4), lin(4, rows=8)])
    assert f is not None and f.out_features == 40
    assert PackedLinear.fuse(f.parts) is f  # already fused: reused
