"""Sampling and streaming generation with a KV cache."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .model import KVCache


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Temperature 0 is greedy (argmax, lowest id on ties); otherwise nucleus sampling."""
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
                 top_p: float = 1.0, seed: int | None = None, stop_ids=()) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded) or after max_new_tokens."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    limit = net.cfg.max_position_embeddings
    max_len = min(len(prompt_ids) + max_new_tokens, limit)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    rng = np.random.default_rng(seed)
    cache = KVCache(net.cfg, 1, max_len)
    h = net.hidden(np.asarray(prompt_ids, dtype=np.int64)[None], cache)[0, -1]
    while cache.length < max_len:
        tok = sample(net.logits(h[None])[0], temperature, top_p, rng)
        if tok in stop_ids:
            return
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
