"""The C decode step (csrc/decode.c via tinyzq/decode.py) against the NumPy decode loop of tinyzq/model.py.

Both paths make the same int8-activation product calls; they differ only in the summation order of
RMSNorm's sum of squares (and libm's expf vs NumPy's exp in SiLU), i.e. by float rounding. Such a
rounding difference can flip the int8 rounding of an activation (one quantization step, d_b = max|x_b|/127,
of one element), so the two are compared with a tolerance made of that int8 noise: the disagreement
must be at most twice the distance of the NumPy path from the same model run with exact fp32
products (the int8-activation error of the reference itself) plus float rounding.
"""
import numpy as np
import pytest

from tinyzq import decode, kernels
from tinyzq.config import ModelConfig
from tinyzq.model import KVCache, Transformer
from tinyzq.quant.packed import PackedLinear

ISAS = kernels.available_isas()


def _cfg(bias: bool, layers: int = 3) -> ModelConfig:
    d = {"architectures": ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"],
         "model_type": "qwen2" if bias else "llama", "vocab_size": 96, "hidden_size": 128,
         "intermediate_size": 192, "num_hidden_layers": layers, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}
    return ModelConfig.from_hf(d)


def _packed(rng, out, inp, bits, group, bias):
    q = rng.integers(0, 2 ** bits, size=(out, inp)).astype(np.uint8)
    s = (rng.random((out, inp // group), dtype=np.float32) * 0.02 + 0.005).astype(np.float32)
    z = (rng.random((out, inp // group), dtype=np.float32) * (2 ** bits - 1)).astype(np.float32)
    b = (0.1 * rng.standard_normal(out)).astype(np.float32) if bias else None
    return PackedLinear.from_codes(q, s, z, bits, group, b)


def make_net(bias=False, bits=4, group=32, seed=0, layers=3) -> Transformer:
    cfg = _cfg(bias, layers)
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qs, kvs = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    w = {"model.embed_tokens.weight": _packed(rng, cfg.vocab_size, d, 8, 32, False),
         "model.norm.weight": (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
        for name, (o, n), b in (("self_attn.q_proj", (qs, d), bias), ("self_attn.k_proj", (kvs, d), bias),
                                ("self_attn.v_proj", (kvs, d), bias), ("self_attn.o_proj", (d, qs), False),
                                ("mlp.gate_proj", (f, d), False), ("mlp.up_proj", (f, d), False),
                                ("mlp.down_proj", (d, f), False)):
            w[p + name + ".weight"] = _packed(rng, o, n, bits, group, b)
    return Transformer(cfg, w)


def _numpy_path():
    """Context: the NumPy decode loop (the C step reports 'does not fit')."""
    class _Ctx:
        def __enter__(self):
            self.orig = decode.decode_layers
            decode.decode_layers = lambda *a: None

        def __exit__(self, *e):
            decode.decode_layers = self.orig
    return _Ctx()


def _exact_products(net):
    """Context: every packed product in fp32 (dequantized weights), no int8 activations."""
    class _Ctx:
        def __enter__(self):
            self.orig = PackedLinear.__call__

            def call(lin, x):
                y = x.reshape(-1, lin.in_features).astype(np.float64) @ lin.dequantize().T.astype(np.float64)
                if lin.bias is not None:
                    y += lin.bias
                return y.astype(np.float32).reshape(*x.shape[:-1], lin.out_features)
            PackedLinear.__call__ = call
            self.n = _numpy_path()
            self.n.__enter__()

        def __exit__(self, *e):
            PackedLinear.__call__ = self.orig
            self.n.__exit__(*e)
    return _Ctx()


def _steps(net, tokens, prompt, B=1):
    """hidden states of decode steps after a prompt (prompt via the many-token path)."""
    cache = KVCache(net.cfg, B, 64)
    net.hidden(np.tile(np.asarray(prompt)[None], (B, 1)), cache)
    return np.stack([net.hidden(np.tile(np.asarray([[t]]), (B, 1)), cache) for t in tokens]), cache


def _check(got, ref, exact):
    noise = np.abs(ref - exact).max()
    assert np.abs(got - ref).max() <= 2 * noise + 1e-5 * np.abs(ref).max(), (np.abs(got - ref).max(), noise)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bias,bits,group,B", [(False, 4, 32, 1), (True, 4, 64, 1), (False, 3, 32, 1),
                                              (False, 2, 64, 3), (True, 8, 32, 2)])
def test_c_decode_step_matches_numpy_loop(isa, bias, bits, group, B):
    net = make_net(bias, bits, group)
    toks, prompt = [5, 17, 3, 88, 41, 9], [1, 2, 3, 4, 5]
    with kernels.use(isa):
        calls = []
        orig = decode.decode_layers

        def spy(*a):
            r = orig(*a)
            calls.append(r is not None)
            return r
        decode.decode_layers = spy
        try:
            got, cache_c = _steps(net, toks, prompt, B)
        finally:
            decode.decode_layers = orig
        assert calls == [True] * len(toks)
        with _numpy_path():
            ref, cache_n = _steps(net, toks, prompt, B)
        with _exact_products(net):
            exact, _ = _steps(net, toks, prompt, B)
    assert np.abs(ref - exact).max() < 0.25 * np.abs(exact).max()  # the noise scale is not vacuous
    _check(got, ref, exact)
    n = len(prompt) + len(toks)
    for a, b in zip(cache_c.k + cache_c.v, cache_n.k + cache_n.v):
        _check(a[:, :, :n], b[:, :, :n], b[:, :, :n])


@pytest.mark.parametrize("isa", ISAS)
def test_c_decode_step_does_not_depend_on_threads(isa):
    net = make_net(False, 4, 32)
    old = kernels.get_threads()
    out = []
    try:
        with kernels.use(isa):
            for t in (1, 3):
                kernels.set_threads(t)
                out.append(_steps(net, [5, 6, 7], [1, 2, 3])[0])
    finally:
        kernels.set_threads(old)
    np.testing.assert_array_equal(out[0], out[1])


def test_in_place_updates_are_seen_and_reassignment_rebuilds():
    net = make_net(False, 4, 32)
    base, _ = _steps(net, [5, 6], [1, 2, 3])
    layer = net.layers[1]
    # ZO-style in-place updates of a fused part's scales and of a norm: the very next step sees them
    layer.up.scales *= np.float32(1.5)
    layer.mlp_norm *= np.float32(0.5)
    got, _ = _steps(net, [5, 6], [1, 2, 3])
    with _numpy_path():
        ref, _ = _steps(net, [5, 6], [1, 2, 3])
    assert np.abs(got - base).max() > 1e-3
    _check(got, ref, ref)
    # a reassigned norm array and a reassigned part (fused views no longer intact) are followed too
    layer.mlp_norm = layer.mlp_norm * np.float32(2.0)
    layer.o = PackedLinear(layer.o.codes.copy(), layer.o.scales * np.float32(0.5), layer.o.zeros.copy(),
                           layer.o.bits, layer.o.group, layer.o.in_features)
    layer.gate.zeros = layer.gate.zeros.copy()  # qkv stays fused; gate/up must fall back
    got, _ = _steps(net, [5, 6], [1, 2, 3])
    with _numpy_path():
        ref, _ = _steps(net, [5, 6], [1, 2, 3])
    assert isinstance(net._decode_plan, decode._UnfitPlan)  # gate/up no longer fused: NumPy loop
    np.testing.assert_array_equal(got, ref)


def test_unfit_models_and_inputs_fall_back():
    from tinyzq.model import FloatLinear

    net = make_net(False, 4, 32)
    w = dict(net.weights)
    name = "model.layers.0.mlp.down_proj.weight"
    w[name] = FloatLinear(w[name].dequantize())
    net2 = Transformer(net.cfg, w)
    x = np.zeros((1, 1, net.cfg.hidden_size), np.float32)
    cs = np.ones((1, net.cfg.head_dim // 2), np.float32)
    cache = KVCache(net.cfg, 1, 8)
    assert decode.decode_layers(net2, x, cs, cs, cache, 0) is None
    assert decode.decode_layers(net, x, cs, cs, cache, 0) is not None
    assert decode.decode_layers(net, np.zeros((2, 1, net.cfg.hidden_size), np.float32), cs, cs, cache, 0) is None
    assert decode.decode_layers(net, np.zeros((40, 1, net.cfg.hidden_size), np.float32), cs, cs,
                                KVCache(net.cfg, 40, 8), 0) is None


def test_c_decode_layers_rejects_bad_arguments():
    k = kernels.get()
    ffi = k.ffi
    layers = ffi.new("tzq_layer[]", 1)
    x = np.zeros(64, np.float32)
    cs = np.zeros(8, np.float32)
    p = ffi.cast("float *", x.ctypes.data)
    c = ffi.cast("float *", cs.ctypes.data)
    # null weights, bad head split, pos outside the cache
    assert k.lib.tzq_decode_layers(p, 1, 64, layers, 1, 4, 2, 16, 128, 8, 0, c, c, 1e-5, 0.25) == -1
    assert k.lib.tzq_decode_layers(p, 1, 64, layers, 1, 4, 3, 16, 128, 8, 0, c, c, 1e-5, 0.25) == -1
    assert k.lib.tzq_decode_layers(p, 1, 64, layers, 1, 4, 2, 16, 128, 8, 8, c, c, 1e-5, 0.25) == -1
    assert k.lib.tzq_decode_layers(p, 1, 64, layers, 0, 4, 2, 16, 128, 8, 0, c, c, 1e-5, 0.25) == 0
