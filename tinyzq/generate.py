"""Sampling and streaming generation with a KV cache."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .model import KVCache


def penalize_repeats(logits: np.ndarray, ids, penalty: float) -> np.ndarray:
    """The CTRL repetition penalty (Keskar et al. 2019, as in transformers and llama.cpp): the logit of
    every token in `ids` is divided by `penalty` when positive and multiplied by it when negative, so
    a penalty > 1 makes any token already seen less likely. Returns a new fp64 array."""
    z = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and len(ids):
        seen = np.unique(np.asarray(ids, dtype=np.int64))
        zs = z[seen]
        z[seen] = np.where(zs > 0, zs / penalty, zs * penalty)
    return z


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
           recent=(), repeat_penalty: float = 1.0) -> int:
    """Temperature 0 is greedy (argmax, lowest id on ties); otherwise nucleus sampling. `recent` ids
    get the repetition penalty first."""
    if repeat_penalty != 1.0:
        logits = penalize_repeats(logits, recent, repeat_penalty)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate_ids(net, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=(), repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded) or after max_new_tokens.
    repeat_penalty > 1 penalises the last `repeat_last_n` tokens of prompt + answer (−1: all of them)."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    if not repeat_penalty > 0:
        raise ValueError(f"repeat_penalty (--repeat-penalty) must be > 0, not {repeat_penalty}")
    if repeat_last_n != -1 and repeat_last_n < 1:
        raise ValueError(f"repeat_last_n (--repeat-last-n) must be >= 1 or -1 (all tokens), not {repeat_last_n}")
    history = list(prompt_ids)
    limit = net.cfg.max_position_embeddings
    max_len = min(len(prompt_ids) + max_new_tokens, limit)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    rng = np.random.default_rng(seed)
    cache = KVCache(net.cfg, 1, max_len)
    h = net.hidden(np.asarray(prompt_ids, dtype=np.int64)[None], cache)[0, -1]
    while cache.length < max_len:
        recent = history if repeat_last_n == -1 else history[-repeat_last_n:]
        tok = sample(net.logits(h[None])[0], temperature, top_p, rng, recent, repeat_penalty)
        if tok in stop_ids:
            return
        history.append(tok)
        yield tok
        if cache.length + 1 >= max_len:  # the sequence is full: no need to run the last token
            return
        h = net.hidden(np.asarray([[tok]], dtype=np.int64), cache)[0, -1]


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, holding back incomplete UTF-8 sequences."""
    out: list[int] = []
    shown = ""
    for tok in ids:
        out.append(tok)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(out)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]
