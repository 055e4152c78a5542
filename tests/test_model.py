"""Forward parity against Hugging Face transformers (fp32) on tiny random models built here."""
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinyzq.api import _float_weights  # noqa: E402
from tinyzq.config import ModelConfig  # noqa: E402
from tinyzq.generate import generate_ids  # noqa: E402
from tinyzq.model import KVCache, Transformer  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def hf_model(kind: str, **over):
    torch.manual_seed(0)
    kw = {**BASE, **over}
    if kind == "llama":
        cfg = transformers.LlamaConfig(**kw)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**kw)
        m = transformers.MistralForCausalLM(cfg)
    m = m.float().eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them matter
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def ours(m) -> Transformer:
    cfg = ModelConfig.from_hf(m.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    return Transformer(cfg, _float_weights(cfg, sd.__getitem__))


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_theta": 100000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 4096}),
]


@pytest.mark.parametrize("kind,over", CASES, ids=[f"{k}-{'-'.join(o) or 'base'}" for k, o in CASES])
def test_logits_match_transformers(kind, over):
    m = hf_model(kind, **over)
    net = ours(m)
    tokens = np.random.default_rng(1).integers(0, BASE["vocab_size"], size=(2, 48))
    with torch.no_grad():
        ref = m(torch.from_numpy(tokens)).logits.numpy()
    got = net.logits(net.hidden(tokens))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4


def test_token_nll_matches_log_softmax_with_tiling():
    m = hf_model("llama")
    net = ours(m)
    tokens = np.random.default_rng(2).integers(0, BASE["vocab_size"], size=(3, 40))
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.from_numpy(tokens)).logits.double(), -1).numpy()
    ref = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0].reshape(-1)
    h = net.hidden(tokens)
    for tile in (7, 64, 4096):  # tiles that do and do not divide the vocabulary
        got = net.token_nll(h[:, :-1], tokens[:, 1:], tile=tile)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    total, n = net.sequence_nll(tokens)
    assert n == 3 * 39 and abs(total - ref.sum()) < 1e-3 * abs(ref.sum())


def test_kv_cache_equals_full_recompute():
    net = ours(hf_model("llama"))
    tokens = np.random.default_rng(3).integers(0, BASE["vocab_size"], size=(1, 20))
    full = net.hidden(tokens)
    cache = KVCache(net.cfg, 1, 32)
    parts = [net.hidden(tokens[:, :7], cache)] + [net.hidden(tokens[:, i:i + 1], cache) for i in range(7, 13)]
    parts.append(net.hidden(tokens[:, 13:], cache))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 20


def test_greedy_generation_with_cache_equals_recompute_each_step():
    net = ours(hf_model("qwen2"))
    prompt = [5, 17, 42, 9]
    got = list(generate_ids(net, prompt, max_new_tokens=12, temperature=0.0))
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(np.argmax(net.logits(net.hidden(np.asarray([seq]))[0, -1]))))
    assert got == seq[len(prompt):]


def test_greedy_generation_matches_transformers_generate():
    m = hf_model("llama")
    net = ours(m)
    prompt = [3, 99, 12, 250]
    with torch.no_grad():
        ref = m.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert list(generate_ids(net, prompt, max_new_tokens=10)) == ref


def test_repetition_penalty_matches_transformers():
    """Greedy with the CTRL penalty over all tokens == transformers' generate(repetition_penalty=...);
    the penalised logits == its RepetitionPenaltyLogitsProcessor."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from tinyzq.generate import penalize_repeats

    m = hf_model("llama")
    net = ours(m)
    prompt = [3, 99, 12, 250, 3, 3]
    for pen in (1.3, 0.8):
        with torch.no_grad():
            ref = m.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, repetition_penalty=pen)[0, len(prompt):].tolist()
        assert list(generate_ids(net, prompt, 12, repeat_penalty=pen, repeat_last_n=-1)) == ref
        if pen < 1:  # this random model never repeats greedily; a penalty < 1 makes it (a visible change)
            assert ref != list(generate_ids(net, prompt, 12))
        z = np.random.default_rng(1).standard_normal(300).astype(np.float32)
        ids = [5, 7, 7, 250, 0]
        want = RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([ids]), torch.tensor(z[None]))[0].numpy()
        np.testing.assert_allclose(penalize_repeats(z, ids, pen), want, rtol=1e-6)


def test_repetition_penalty_window_equals_recompute():
    """repeat_last_n = k penalises exactly the last k tokens of prompt + answer (checked without a cache)."""
    from tinyzq.generate import penalize_repeats

    net = ours(hf_model("llama"))
    prompt, k, pen = [1, 2, 3, 4, 5, 6], 4, 0.5  # < 1 favours the window's tokens: the window shows
    got = list(generate_ids(net, prompt, 10, repeat_penalty=pen, repeat_last_n=k))
    assert got != list(generate_ids(net, prompt, 10, repeat_penalty=pen, repeat_last_n=-1))
    seq = list(prompt)
    for _ in range(10):
        z = net.logits(net.hidden(np.asarray([seq]))[0, -1])
        seq.append(int(np.argmax(penalize_repeats(z, seq[-k:], pen))))
    assert got == seq[len(prompt):]
    with pytest.raises(ValueError, match="repeat_last_n"):
        list(generate_ids(net, prompt, 2, repeat_penalty=pen, repeat_last_n=0))
    with pytest.raises(ValueError, match="repeat_penalty"):
        list(generate_ids(net, prompt, 2, repeat_penalty=0.0))


def test_sampling_is_seeded_and_respects_top_p():
    net = ours(hf_model("llama"))
    a = list(generate_ids(net, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7))
    b = list(generate_ids(net, [1, 2, 3], 15, temperature=1.0, top_p=0.9, seed=7))
    assert a == b and len(a) == 15
    from tinyzq.generate import sample

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, 0.75, rng) for _ in range(300)}
    assert draws == {0, 1}  # the nucleus of mass 0.75 is {0, 1}


def test_calibration_stats_match_hf_forward_hooks():
    """Mean x² of every linear's input, collected by our taps == the same statistic from torch hooks."""
    from tinyzq.quant.calibrate import calib_windows, collect_x_stats

    m = hf_model("qwen2")
    net = ours(m)
    ids = calib_windows(np.random.default_rng(0).integers(0, 300, 200), ctx=48, n=3)
    assert ids.shape == (3, 48) and ids[0, 0] != ids[1, 0]
    sums, counts = {}, {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            mod.register_forward_pre_hook(hook(name + ".weight"))
    with torch.no_grad():
        for w in ids:
            m(torch.from_numpy(w[None]))
    got = collect_x_stats(net, ids)
    assert sorted(got) == sorted(sums) and len(got) == 2 * 7
    for name in got:
        np.testing.assert_allclose(got[name], sums[name] / counts[name], rtol=2e-4)
    # the model is restored: no taps left behind
    assert all(type(getattr(layer, a)).__name__ == "FloatLinear" for layer in net.layers for a in ("q", "down"))
