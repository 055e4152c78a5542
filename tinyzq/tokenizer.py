"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` plus the chat template.

Sources:
- a Hugging Face directory (`Tokenizer.load`): ``tokenizer.json`` + ``tokenizer_config.json``
  (bos/eos, ``add_bos_token``, ``chat_template``), with ``chat_template.jinja``,
  ``special_tokens_map.json``, ``generation_config.json`` and ``config.json`` as fallbacks;
- GGUF metadata (`Tokenizer.from_gguf_metadata`): byte-level BPE (``tokenizer.ggml.model == "gpt2"``)
  with the pre-tokenizer named by ``tokenizer.ggml.pre``, or sentencepiece-style BPE
  (``tokenizer.ggml.model == "llama"``, byte fallback, merges recovered from the scores).

`encode` never adds EOS, and adds BOS only when the model's tokenizer config says ``add_bos``.
Special tokens written in the text (``<|im_start|>``) encode as their single ids.
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional, Sequence

from .errors import TinyzqError

try:  # imported lazily-tolerant so that `import tinyzq.tokenizer` never fails on its own
    import tokenizers as _tk
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
except ImportError:  # pragma: no cover
    _tk = None

# GGUF token types (llama.cpp `llama_token_type`)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, as in llama.cpp (llama-vocab.cpp) / the HF tokenizer.json of each family.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre names -> pre-tokenizer kind
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "megrez"}
_PRE_GPT2 = {"gpt-2", "gpt2", "phi-2", "jais", "olmo", "mpt"}
# llama.cpp's "default" (also used when tokenizer.ggml.pre is absent): punctuation runs, then GPT-2, then
# digit runs, then groups of three digits
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", None, r"\p{N}+", r"[0-9][0-9][0-9]")
SUPPORTED_GGUF_PRE = sorted(_PRE_DIGITS | _PRE_LLAMA3 | _PRE_QWEN2 | _PRE_GPT2 | {"default"})


def _byte_level_pre(kind: str):
    if kind == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if kind in ("llama3", "qwen2"):
        rx = _LLAMA3_REGEX if kind == "llama3" else _QWEN2_REGEX
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if kind == "default":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_DEFAULT_SPLITS[0]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Split(Regex(_DEFAULT_SPLITS[2]), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(_DEFAULT_SPLITS[3]), behavior="isolated", invert=False),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_text(tok) -> Optional[str]:
    """A token entry from tokenizer_config.json / special_tokens_map.json: str or AddedToken dict."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        c = tok.get("content")
        return c if isinstance(c, str) else None
    return None


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise TinyzqError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise TinyzqError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TinyzqError(f"{path}: expected a JSON object")
    return data


def _as_id_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(v) for v in x if v is not None]
    return [int(x)]


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering."""

    def __init__(
        self,
        tok: "_tk.Tokenizer",
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        add_bos: bool = False,
        chat_template: Optional[str] = None,
        extra_eos_ids: Iterable[int] = (),
        unk_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        bos_id: Optional[int] = None,
    ):
        self._tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.bos_id: Optional[int] = bos_id if bos_id is not None else (
            tok.token_to_id(bos_token) if bos_token is not None else None)
        eos = set()
        if eos_token is not None:
            i = tok.token_to_id(eos_token)
            if i is not None:
                eos.add(int(i))
        eos.update(int(i) for i in extra_eos_ids)
        self.eos_ids: set = eos
        # primary eos id: the one named by eos_token, else the smallest
        self.eos_id: Optional[int] = (tok.token_to_id(eos_token) if eos_token is not None else None)
        if self.eos_id is None and eos:
            self.eos_id = min(eos)
        if self.eos_token is None and self.eos_id is not None:
            self.eos_token = tok.id_to_token(self.eos_id)
        if self.add_bos and self.bos_id is None:
            raise TinyzqError("tokenizer: add_bos_token is set but the model has no bos token")
        self._template_cache = None

    # ------------------------------------------------------------------ basic
    @property
    def backend(self) -> "_tk.Tokenizer":
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list:
        """Token ids of `text`. BOS is prepended iff `add_bos` (default: the model's setting)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: Optional[bool] = None) -> list:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        ab = (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None
        return [([self.bos_id] if ab else []) + e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    # ------------------------------------------------------------------ chat
    def chat_renderer(self):
        """`render_chat` for `data.read_text` (chat .jsonl records through this model's template), or
        None when the model has no chat template."""
        if not self.chat_template:
            return None
        return lambda msgs: self.apply_chat_template(msgs, add_generation_prompt=False)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template,
        the way transformers does (sandboxed jinja2, trim_blocks/lstrip_blocks, `raise_exception`,
        `bos_token`/`eos_token` variables)."""
        if not self.chat_template:
            raise TinyzqError("tokenizer: this model has no chat template")
        tmpl = self._compiled_template()
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        if self.unk_token is not None:
            variables["unk_token"] = self.unk_token
        if self.pad_token is not None:
            variables["pad_token"] = self.pad_token
        variables.update(kwargs)
        try:
            return tmpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # jinja2 TemplateError, and errors raised by template code
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TinyzqError(f"chat template: {msg}") from None

    def _compiled_template(self):
        if self._template_cache is not None and self._template_cache[0] == self.chat_template:
            return self._template_cache[1]
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            tmpl = env.from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TinyzqError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None
        self._template_cache = (self.chat_template, tmpl)
        return tmpl

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` into
        `directory` (loadable by `Tokenizer.load` and by transformers' AutoTokenizer)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
        }
        if self.unk_token is not None:
            cfg["unk_token"] = self.unk_token
        if self.pad_token is not None:
            cfg["pad_token"] = self.pad_token
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)
        eos = sorted(self.eos_ids)
        if self.eos_id is not None and self.eos_id in self.eos_ids:  # primary first
            eos = [self.eos_id] + [i for i in eos if i != self.eos_id]
        gen = {"bos_token_id": self.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """Load from a Hugging Face model/tokenizer directory."""
        if _tk is None:  # pragma: no cover
            raise TinyzqError("the 'tokenizers' package is not installed")
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(directory, "tokenizer.model")):
                raise TinyzqError(f"{path}: file not found (only tokenizer.json is supported, "
                                  "not a sentencepiece tokenizer.model)")
            raise TinyzqError(f"{path}: file not found")
        try:
            tok = _tk.Tokenizer.from_file(path)
        except Exception as e:
            raise TinyzqError(f"{path}: cannot parse tokenizer: {str(e).splitlines()[0] if str(e) else e!r}") from None
        tc_path = os.path.join(directory, "tokenizer_config.json")
        tc = _read_json(tc_path) or {}
        stm = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        mc = _read_json(os.path.join(directory, "config.json")) or {}

        def special(name):
            t = _token_text(tc.get(name))
            return t if t is not None else _token_text(stm.get(name))

        bos_token, eos_token = special("bos_token"), special("eos_token")
        unk_token, pad_token = special("unk_token"), special("pad_token")
        bos_id = None
        if bos_token is None:
            for src in (gen, mc):
                ids = _as_id_list(src.get("bos_token_id"))
                if ids and tok.id_to_token(ids[0]) is not None:
                    bos_id, bos_token = ids[0], tok.id_to_token(ids[0])
                    break
        extra_eos = []
        for src in (gen, mc):
            extra_eos += [i for i in _as_id_list(src.get("eos_token_id")) if tok.id_to_token(i) is not None]
        if eos_token is None and extra_eos:
            eos_token = tok.id_to_token(extra_eos[0])

        # add_bos: explicit flag, else whether tokenizer.json's post-processor prepends BOS
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        else:
            add_bos = False
            bid = bos_id if bos_id is not None else (tok.token_to_id(bos_token) if bos_token else None)
            if bid is not None and tok.post_processor is not None:
                try:
                    with_sp = tok.encode("a", add_special_tokens=True).ids
                    add_bos = bool(with_sp) and with_sp[0] == bid
                except Exception:
                    add_bos = False

        chat_template = tc.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default") or next(iter(named.values()), None)
        if chat_template is None:
            jp = os.path.join(directory, "chat_template.jinja")
            if os.path.isfile(jp):
                with open(jp, encoding="utf-8") as f:
                    chat_template = f.read()
            else:
                ct = _read_json(os.path.join(directory, "chat_template.json")) or {}
                chat_template = ct.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TinyzqError(f"{tc_path}: chat_template must be a string")
        return cls(tok, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos, chat_template=chat_template,
                   extra_eos_ids=extra_eos, unk_token=unk_token, pad_token=pad_token, bos_id=bos_id)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF") -> "Tokenizer":
        """Build from GGUF metadata (key -> python value; arrays as lists). `source` names the file in errors."""
        if _tk is None:  # pragma: no cover
            raise TinyzqError("the 'tokenizers' package is not installed")
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise TinyzqError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.model/tokens missing)")
        tokens = list(tokens)
        n = len(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n)
        if len(types) != n:
            raise TinyzqError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, expected {n}")

        def tid(key):
            v = meta.get(key)
            if v is None:
                return None
            v = int(v)
            return v if 0 <= v < n else None

        bos_id, eos_id = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
        unk_id, pad_id = tid("tokenizer.ggml.unknown_token_id"), tid("tokenizer.ggml.padding_token_id")
        extra_eos = [i for i in (eos_id, tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id"))
                     if i is not None]

        if model == "gpt2":
            tok = _gguf_bpe(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"), source)
            add_bos_default = False
        elif model == "llama":
            tok = _gguf_spm(tokens, meta.get("tokenizer.ggml.scores"), types, unk_id,
                            meta.get("tokenizer.ggml.add_space_prefix", True), source)
            add_bos_default = True
        else:
            raise TinyzqError(f"{source}: unsupported tokenizer model {model!r} (supported: gpt2, llama)")

        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i in range(n) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and tokens[i]]
        if special:
            tok.add_special_tokens(special)
        if tok.get_vocab_size(with_added_tokens=True) != n:
            warnings.warn(f"{source}: the tokenizer vocabulary has duplicate tokens "
                          f"({tok.get_vocab_size(with_added_tokens=True)} distinct of {n})", stacklevel=2)

        name = lambda i: tokens[i] if i is not None else None  # noqa: E731
        return cls(tok, bos_token=name(bos_id), eos_token=name(eos_id),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_id is not None,
                   chat_template=meta.get("tokenizer.chat_template"), extra_eos_ids=extra_eos,
                   unk_token=name(unk_id), pad_token=name(pad_id), bos_id=bos_id)


def _gguf_bpe(tokens: list, merges, pre: Optional[str], source: str):
    if merges is None:
        raise TinyzqError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TinyzqError(f"{source}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    pre = pre or "default"
    if pre in _PRE_DIGITS:
        kind = "digits"
    elif pre in _PRE_LLAMA3:
        kind = "llama3"
    elif pre in _PRE_QWEN2:
        kind = "qwen2"
    elif pre in _PRE_GPT2:
        kind = "gpt2"
    else:
        if pre != "default":
            warnings.warn(f"{source}: unknown tokenizer.ggml.pre {pre!r}; using llama.cpp's default "
                          "pre-tokenizer (token ids may differ from the model's own tokenizer)", stacklevel=3)
        kind = "default"
    try:
        bpe = models.BPE(vocab, pairs, ignore_merges=(kind == "llama3"))
    except Exception as e:
        raise TinyzqError(f"{source}: cannot build the BPE tokenizer: {str(e).splitlines()[0]}") from None
    tok = _tk.Tokenizer(bpe)
    tok.pre_tokenizer = _byte_level_pre(kind)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict, scores: dict) -> list:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (as transformers' `generate_merges`)."""
    merges = []
    for piece, score in scores.items():
        local = []
        for k in range(1, len(piece)):
            l, r = piece[:k], piece[k:]
            if l in vocab and r in vocab:
                local.append((l, r, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_spm(tokens: list, scores, types: list, unk_id: Optional[int], add_space_prefix, source: str):
    if scores is None:
        raise TinyzqError(f"{source}: sentencepiece tokenizer without tokenizer.ggml.scores")
    scores = list(scores)
    if len(scores) != len(tokens):
        raise TinyzqError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries, expected {len(tokens)}")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # only normal/user-defined pieces take part in merges (not control, byte or unknown pieces)
    mergeable = {t: float(scores[i]) for t, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    merges = _spm_merges(vocab, mergeable)
    unk = tokens[unk_id] if unk_id is not None else None
    try:
        bpe = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise TinyzqError(f"{source}: cannot build the sentencepiece tokenizer: {str(e).splitlines()[0]}") from None
    tok = _tk.Tokenizer(bpe)
    # like llama.cpp: a space is prepended to every text fragment (at the start and after each special
    # token: tokenizers normalizes each fragment between added tokens separately), spaces become U+2581
    norm = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else []),
    ])
    return tok


__all__ = ["Tokenizer", "SUPPORTED_GGUF_PRE"]
