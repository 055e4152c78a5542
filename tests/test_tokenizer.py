"""tinyzq.tokenizer: GGUF-built and HF-directory tokenizers, special tokens, chat templates, save/load.

The reference for the real SmolLM2 GGUF is transformers' own GGUF tokenizer loader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, offline), which builds the BPE from the GGUF
vocabulary/merges with its own code. One known difference: transformers 5.23 has no entry for the
`smollm` pre-tokenizer and falls back to plain GPT-2 ByteLevel splitting, while llama.cpp (and
SmolLM2's original tokenizer.json) first split every digit on its own. The two agree except where a
whitespace run precedes a digit (e.g. "x  12", indented numbers in code). The tests therefore check
(1) exact equality with stock transformers on text without that pattern, (2) exact equality on all
text once the reference gets SmolLM2's original pre-tokenizer, and (3) exact equality with stock
transformers on all text once *ours* gets the plain ByteLevel one — i.e. vocabulary, merges, byte
mapping and special tokens are identical and the digit rule is the only difference.
"""
import json
import os
import re

import pytest

from tinyzq.errors import TinyzqError
from tinyzq.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLES = [
    "In 2024, 12345 apples cost $3.50 (or 3,50 €).",
    "Café naïve façade — déjà vu; Ærøskøbing; straße",
    "日本語のテキストと中文字符，한국어 텍스트",
    "emoji: 😀🎉👍🏽 and 🇫🇷 flags",
    "spaces:   three, \t\ttabs,\n\n\nnewlines\r\n and trailing   ",
    "def f(x):\n    return x ** 2  # comment\n\nclass A:\n    pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><|im_start|>",
    "it's we'll they've I'm you'd HELLO'S",
    "",
    " leading space",
    "x  12 and a   2024 and\n\n3 and    indented 42",
]


def _has_ws_digit(text):
    """A run of 2+ whitespace characters before a digit: where stock transformers misses the smollm rule."""
    return re.search(r"\s\s\d", text) is not None


def assert_one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


# ----------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    from tinyzq.io import open_source
    with open_source(smollm2_gguf) as src:
        return src.tokenizer


@pytest.fixture(scope="module")
def hf_ref(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    d, f = os.path.split(smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.fixture(scope="module")
def real_texts():
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


@pytest.mark.real
def test_smollm2_basic_properties(smollm2_tok):
    tok = smollm2_tok
    assert tok.vocab_size == 49152 and not tok.add_bos
    assert (tok.bos_id, tok.bos_token, tok.eos_token, tok.eos_ids) == (1, "<|im_start|>", "<|im_end|>", {2})
    assert tok.encode("In 2024, 12345 apples") == [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    # digits are always single tokens, also after whitespace runs (llama.cpp's `smollm` rule)
    assert tok.encode("x  12") == [104, 256, 33, 34]  # "x", "ĠĠ", "1", "2"
    assert tok.encode("\n\n3") == [1116, 35]
    assert tok.id_to_token(256) == "ĠĠ" and tok.id_to_token(1116) == "ĊĊ"


@pytest.mark.real
def test_smollm2_ids_equal_transformers_gguf_tokenizer(smollm2_tok, hf_ref, real_texts):
    checked = 0
    for text in SAMPLES + real_texts:
        ours = smollm2_tok.encode(text)
        ref = hf_ref(text, add_special_tokens=False)["input_ids"]
        if not _has_ws_digit(text):
            assert ours == ref, text[:200]
            checked += 1
    assert checked >= 40  # most of the real text has no whitespace-run-before-digit


@pytest.mark.real
def test_smollm2_ids_equal_reference_with_original_pretokenizer(smollm2_tok, hf_ref, real_texts):
    """transformers' GGUF-built tokenizer, given SmolLM2's original pre-tokenizer (tokenizer.json of
    HuggingFaceTB/SmolLM2-135M-Instruct: Digits(individual_digits=True) + ByteLevel), == ours everywhere."""
    from tokenizers import pre_tokenizers
    backend = hf_ref.backend_tokenizer
    saved = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    try:
        for text in SAMPLES + real_texts:
            assert smollm2_tok.encode(text) == backend.encode(text, add_special_tokens=False).ids, text[:200]
    finally:
        backend.pre_tokenizer = saved


@pytest.mark.real
def test_smollm2_only_difference_to_transformers_is_the_digit_rule(smollm2_tok, hf_ref, real_texts):
    import copy

    from tokenizers import pre_tokenizers
    plain = copy.deepcopy(smollm2_tok.backend)
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    n_diff = 0
    for text in SAMPLES + real_texts:
        assert plain.encode(text, add_special_tokens=False).ids == hf_ref(text, add_special_tokens=False)["input_ids"]
        n_diff += smollm2_tok.encode(text) != hf_ref(text, add_special_tokens=False)["input_ids"]
    assert n_diff > 0  # the real text does exercise the difference


@pytest.mark.real
def test_smollm2_decode_equals_transformers(smollm2_tok, hf_ref, real_texts):
    for text in SAMPLES + real_texts[:20]:
        ids = smollm2_tok.encode(text)
        assert smollm2_tok.decode(ids) == hf_ref.decode(ids) == text
    ids = smollm2_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert smollm2_tok.decode(ids, skip_special_tokens=True) == hf_ref.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! ☺"},
     {"role": "user", "content": "Tell me a joke\nabout 日本."}],
]


@pytest.mark.real
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_chat_template_equals_transformers(smollm2_tok, hf_ref, gen):
    assert smollm2_tok.chat_template == hf_ref.chat_template
    for msgs in CONVERSATIONS:
        ours = smollm2_tok.apply_chat_template(msgs, add_generation_prompt=gen)
        ref = hf_ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours == ref
    text = smollm2_tok.apply_chat_template(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = smollm2_tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.real
def test_smollm2_llama_cpp_if_available(smollm2_gguf, smollm2_tok):
    """llama.cpp itself (optional: llama-cpp-python, not a dependency) as the ground truth."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=smollm2_gguf, vocab_only=True, verbose=False)
    from pydoc_data.topics import topics
    for text in SAMPLES + [topics[k] for k in sorted(topics)]:
        ref = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert smollm2_tok.encode(text) == ref, text[:200]


# ----------------------------------------------------------------------------- tiny tokenizers
def _trained_bpe(vocab_size=400, special=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from pydoc_data.topics import topics
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:10], trainer)
    return tok


def _gguf_meta_from(tok, pre, bos=1, eos=2):
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos}


def _write_tokenizer_gguf(path, meta):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), meta["general.architecture"])
    # hyper-parameters llama.cpp wants even for a vocab-only load (no tensors are written)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("unknown_token_id", w.add_unk_token_id), ("add_bos_token", w.add_add_bos_token),
                    ("add_space_prefix", w.add_add_space_prefix)):
        if f"tokenizer.ggml.{key}" in meta:
            fn(meta[f"tokenizer.ggml.{key}"])
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


PRE_TEXTS = SAMPLES + ["Numbers 1234567 and 12 3 45678; x=100000.", "You'RE we'LL 'tis\r\n\r\n  end",
                       "tabs\tand  double  spaces  9  8", "A\n\n\n  B ...  !!! ???"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_gguf_bpe_pretokenizers_equal_transformers(tmp_path, pre):
    """For the pre-tokenizers transformers does implement, our GGUF-built tokenizer == transformers'."""
    transformers = pytest.importorskip("transformers")
    tok = _trained_bpe()
    meta = _gguf_meta_from(tok, pre)
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    ours = Tokenizer.from_gguf_metadata(meta)
    for text in PRE_TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], (pre, text)
        assert ours.decode(ours.encode(text)) == text


def test_gguf_pretokenizer_splits():
    """The split rules themselves (independent of merges): digit grouping per pre-tokenizer."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    def pieces(pre, text):
        meta = _gguf_meta_from(HFTok(models.BPE()), pre)
        meta.update({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1],
                     "tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None})
        t = Tokenizer.from_gguf_metadata(meta)
        return [p for p, _ in t.backend.pre_tokenizer.pre_tokenize_str(text)]

    assert pieces("smollm", "a 2024") == ["a", "Ġ", "2", "0", "2", "4"]
    assert pieces("llama-bpe", "a 2024") == ["a", "Ġ", "202", "4"]
    assert pieces("qwen2", "a 2024") == ["a", "Ġ", "2", "0", "2", "4"]
    assert pieces("gpt-2", "a 2024") == ["a", "Ġ2024"]
    assert pieces("default", "a 2024!?") == ["a", "Ġ", "202", "4", "!?"]  # llama.cpp's default
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre"):
        assert pieces("some-new-pre", "a 2024") == ["a", "Ġ", "202", "4"]


def test_special_tokens_are_single_ids_and_user_defined():
    tok = _trained_bpe()
    meta = _gguf_meta_from(tok, "smollm")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<think>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [4]
    t = Tokenizer.from_gguf_metadata(meta)
    n = len(meta["tokenizer.ggml.tokens"])
    assert t.vocab_size == n
    assert t.encode("<|im_start|>a<think>b<|im_end|>") == [1] + t.encode("a") + [n - 1] + t.encode("b") + [2]
    assert t.decode(t.encode("x<|im_end|>"), skip_special_tokens=True) == "x"


def _spm_meta():
    """A small sentencepiece-style (tokenizer.ggml.model == 'llama') vocabulary: control tokens, 256 byte
    tokens, and BPE pieces with scores = -rank of a BPE trained here on '▁'-joined words."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers
    from pydoc_data.topics import topics
    bpe = HFTok(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False)
    bpe.train_from_iterator([topics[k] for k in sorted(topics)][:10], trainer)
    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    chars = [p for p in pieces if len(p) == 1]
    merged = [(m if isinstance(m, str) else " ".join(m)).replace(" ", "") for m in data["model"]["merges"]]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    seen = set()
    for i, p in enumerate(merged):
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(1)
            scores.append(-float(i))
    for c in chars:
        if c not in seen:
            seen.add(c)
            tokens.append(c)
            types.append(1)
            scores.append(-1e6)
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def test_gguf_sentencepiece_llama_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    meta = _spm_meta()
    ours = Tokenizer.from_gguf_metadata(meta)
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_ids == {2}
    path = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(path, meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    texts = ["The quick brown fox", "def function(x): return x", "Hello world. This is a test of the object",
             "Unicode: é 中 😀", "numbers 12345"]
    for text in texts:
        ids = ours.encode(text)
        assert ids[0] == 1  # BOS added by default for sentencepiece vocabularies, like llama.cpp
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids[1:]) == text
    # bytes not in the vocabulary fall back to <0xXX> tokens
    assert ours.encode("😀", add_bos=False)[-4:] == [3 + b for b in "😀".encode()]


@pytest.mark.parametrize("kind", ["spm", "llama-bpe", "qwen2", "smollm", "gpt-2", "default"])
def test_gguf_tokenizers_equal_llama_cpp_if_available(tmp_path, kind):
    """llama.cpp itself on tiny GGUF vocabularies of each family (optional: llama-cpp-python)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    meta = _spm_meta() if kind == "spm" else _gguf_meta_from(_trained_bpe(), kind)
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, meta)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ours = Tokenizer.from_gguf_metadata(meta)
    for text in PRE_TEXTS + [" two  spaces", "a<s>b</s> c", "x\n\ny"]:
        assert ours.encode(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=True), text


def test_unsupported_tokenizer_model():
    with pytest.raises(TinyzqError) as e:
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    assert_one_line_error(e, "m.gguf", "bert", "gpt2", "llama")
    with pytest.raises(TinyzqError) as e:
        Tokenizer.from_gguf_metadata({}, "m.gguf")
    assert_one_line_error(e, "m.gguf")


# ----------------------------------------------------------------------------- HF dirs, save/load
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture()
def hf_tok_dir(tmp_path):
    tok = _trained_bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}, "eos_token": "<|im_end|>",
        "add_bos_token": True, "chat_template": TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return tmp_path


def test_hf_dir_load_equals_transformers(hf_tok_dir):
    transformers = pytest.importorskip("transformers")
    t = Tokenizer.load(str(hf_tok_dir))
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_tok_dir))
    assert t.add_bos and t.bos_id == 0 and t.bos_token == "<|endoftext|>" and t.eos_token == "<|im_end|>"
    assert t.eos_ids == {2, 0}
    for text in PRE_TEXTS:
        assert t.encode(text) == [0] + ref(text, add_special_tokens=False)["input_ids"]
        assert t.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            assert t.apply_chat_template(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)
    assert t.encode_batch(["a b", "c"]) == [t.encode("a b"), t.encode("c")]


def test_chat_template_errors(hf_tok_dir):
    t = Tokenizer.load(str(hf_tok_dir))
    with pytest.raises(TinyzqError) as e:
        t.apply_chat_template([{"role": "tool", "content": "x"}])
    assert_one_line_error(e, "no tools")
    t.chat_template = "{% for %}"
    with pytest.raises(TinyzqError) as e:
        t.apply_chat_template(CONVERSATIONS[0])
    assert_one_line_error(e, "chat template")
    t.chat_template = None
    with pytest.raises(TinyzqError) as e:
        t.apply_chat_template(CONVERSATIONS[0])
    assert_one_line_error(e, "no chat template")
    # the sandbox forbids unsafe attribute access
    t.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(TinyzqError):
        t.apply_chat_template(CONVERSATIONS[0])


def test_save_load_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    meta = _gguf_meta_from(_trained_bpe(), "smollm")
    meta["tokenizer.chat_template"] = TEMPLATE
    meta["tokenizer.ggml.eot_token_id"] = 0
    t = Tokenizer.from_gguf_metadata(meta)
    assert t.eos_ids == {2, 0} and t.eos_token == "<|im_end|>"
    t.save(str(tmp_path))
    u = Tokenizer.load(str(tmp_path))
    assert (u.bos_id, u.eos_ids, u.add_bos, u.chat_template, u.eos_token) == (
        t.bos_id, t.eos_ids, t.add_bos, t.chat_template, t.eos_token)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in PRE_TEXTS:
        assert u.encode(text) == t.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert u.apply_chat_template(CONVERSATIONS[2]) == ref.apply_chat_template(CONVERSATIONS[2], tokenize=False,
                                                                              add_generation_prompt=True)


def test_load_errors(tmp_path):
    with pytest.raises(TinyzqError) as e:
        Tokenizer.load(str(tmp_path))
    assert_one_line_error(e, "tokenizer.json", "not found")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TinyzqError) as e:
        Tokenizer.load(str(tmp_path))
    assert_one_line_error(e, "tokenizer.json", "sentencepiece")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TinyzqError) as e:
        Tokenizer.load(str(tmp_path))
    assert_one_line_error(e, "tokenizer.json")
    _trained_bpe().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TinyzqError) as e:
        Tokenizer.load(str(tmp_path))
    assert_one_line_error(e, "tokenizer_config.json", "JSON")


def test_load_chat_template_jinja_file_and_post_processor_bos(tmp_path):
    from tokenizers import processors
    tok = _trained_bpe()
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                                "eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    t = Tokenizer.load(str(tmp_path))
    assert t.add_bos and t.encode("hi")[0] == 0 and t.encode("hi").count(0) == 1
    assert t.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo"
