"""Zero-shot multiple-choice tasks, scored the way lm-evaluation-harness scores them.

Format: a UTF-8 JSONL file, one item per line (blank lines and a leading BOM are ignored)::

    {"task": "arc_easy", "id": "q17", "options": [["Question: ...\\nAnswer:", " Paris"], ...], "label": 0}

Each option is a pair ``[context, continuation]``; only the continuation is scored, and contexts may
differ between options (Winogrande-style partial scoring). Other keys are ignored.

Scoring of one option:
- ``ctx = encode(context)``, ``whole = encode(context + continuation)`` (BOS only if the model's tokenizer
  adds one); the continuation tokens are ``whole`` after its longest common prefix with ``ctx``, so a
  token that merges across the boundary is scored as part of the continuation. An empty prefix (empty
  context, no BOS) gets the EOS id, else the BOS id, as the one conditioning token (lm-eval's EOT rule).
- the sequence is truncated from the left to the model's context window W: the model reads the last W
  tokens of ``whole[:-1]`` (lm-eval: ``(ctx + cont)[-(W+1):][:-1]``).
- ``logprob`` = summed log-probability of the continuation tokens (fp64 log-sum-exp over the vocabulary).
- ``acc``: argmax of ``logprob`` equals the label; ``acc_norm``: argmax of ``logprob / len(continuation
  in UTF-8 bytes)`` equals the label (ties: the first option).
- per task: n, mean acc / acc_norm, and their standard errors ``sample std (ddof=1) / sqrt(n)``;
  ``mean``: the unweighted mean over tasks (standard error ``sqrt(Σ se²) / k``).

Speed: the options of an item run as one batch. Their longest common token prefix runs once (in chunks,
into a KV cache); the cache is copied to one row per option and only the differing remainders run, so a
4-way item costs little more than its longest option. The head is applied only at the positions that
predict continuation tokens, in vocabulary tiles, so ``[tokens, vocab]`` logits never exist.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import TinyzqError

CHUNK = 256  # tokens per forward call of one sequence (bounds the attention score matrix)


@dataclass
class Item:
    task: str
    id: str
    options: list  # [(context, continuation), ...]
    label: int
    line: int = 0
    source: str = "<items>"


@dataclass
class Encoded:
    """One option as tokens: the model reads `inp`, and positions `inp[-len(cont):]` predict `cont`."""
    inp: np.ndarray
    cont: np.ndarray
    nbytes: int
    truncated: int = 0  # tokens dropped on the left


# --- reading --------------------------------------------------------------------------------------------
def _check_item(obj, where: str) -> Item:
    if not isinstance(obj, dict):
        raise TinyzqError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    task = obj.get("task")
    if not isinstance(task, str) or not task.strip():
        raise TinyzqError(f"{where}: 'task' must be a non-empty string")
    iid = obj.get("id", None)
    if iid is None:
        iid = where.rsplit(":", 1)[-1]
    elif isinstance(iid, bool) or not isinstance(iid, (str, int)):
        raise TinyzqError(f"{where}: 'id' must be a string or an integer")
    opts = obj.get("options")
    if not isinstance(opts, list) or len(opts) < 2:
        raise TinyzqError(f"{where}: 'options' must be a list of at least 2 [context, continuation] pairs")
    pairs = []
    for k, o in enumerate(opts):
        if not (isinstance(o, list) and len(o) == 2 and isinstance(o[0], str) and isinstance(o[1], str)):
            raise TinyzqError(f"{where}: options[{k}] must be a [context, continuation] pair of strings")
        if not o[1]:
            raise TinyzqError(f"{where}: options[{k}] has an empty continuation")
        pairs.append((o[0], o[1]))
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(pairs):
        raise TinyzqError(f"{where}: 'label' must be an integer index into 'options' (0..{len(pairs) - 1}), "
                          f"got {json.dumps(label)}")
    return Item(task, str(iid), pairs, label)


def read_tasks(path: str) -> list:
    """Items of a task JSONL file, validated; a malformed line is a one-line error naming its number."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TinyzqError(f"{path}: cannot read: {e.strerror or e}") from None
    items = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        where = f"{path}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TinyzqError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise TinyzqError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        it = _check_item(obj, where)
        it.line, it.source = n, path
        items.append(it)
    if not items:
        raise TinyzqError(f"{path}: no items (expected one JSON object per line)")
    return items


def as_items(src) -> list:
    """A path, or a list of Item / dicts in the file format (validated the same way)."""
    if isinstance(src, (str, os.PathLike)):
        return read_tasks(src)
    items = []
    for k, x in enumerate(src):
        if isinstance(x, Item):
            items.append(x)
        else:
            it = _check_item(x, f"item {k}")
            it.line = k
            items.append(it)
    if not items:
        raise TinyzqError("no items to score")
    return items


def limit_items(items: list, limit: int | None) -> list:
    """The first `limit` items of every task (file order kept)."""
    if limit is None:
        return list(items)
    seen: dict = {}
    out = []
    for it in items:
        if seen.get(it.task, 0) < limit:
            seen[it.task] = seen.get(it.task, 0) + 1
            out.append(it)
    return out


# --- tokens -----------------------------------------------------------------------------------------------
def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_item(tokenizer, item: Item, max_length: int) -> list:
    """Tokens of every option of `item` (see the module doc for the rules)."""
    ctxs = tokenizer.encode_batch([c for c, _ in item.options])
    wholes = tokenizer.encode_batch([c + k for c, k in item.options])
    out = []
    for k, ((_, cont), ctx, whole) in enumerate(zip(item.options, ctxs, wholes)):
        p = _lcp(ctx, whole)
        c = whole[p:]
        where = f"{item.source}:{item.line}" if item.line else f"item {item.id!r}"
        if not c:
            raise TinyzqError(f"{where}: the continuation of options[{k}] encodes to no tokens")
        if len(c) > max_length:
            raise TinyzqError(f"{where}: the continuation of options[{k}] has {len(c)} tokens; the model's "
                              f"context window is {max_length}")
        pre = whole[:p]
        if not pre:
            first = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
            if first is None:
                raise TinyzqError(f"{where}: options[{k}] has an empty context and the model has neither a BOS "
                                  "nor an EOS token to condition on")
            pre = [first]
        seq = (list(pre) + list(c))[:-1]
        drop = max(0, len(seq) - max_length)
        out.append(Encoded(np.asarray(seq[drop:], dtype=np.int64), np.asarray(c, dtype=np.int64),
                           len(cont.encode("utf-8")), drop))
    return out


# --- the model -----------------------------------------------------------------------------------------
def _run(net, tokens: np.ndarray, cache, want: np.ndarray | None, chunk: int = CHUNK):
    """Feed tokens [B, T] through `net` in chunks (appending to `cache`); return the hidden states at the
    positions `want` (indices into T), [B, len(want), d]."""
    B, T = tokens.shape
    outs = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        h = net.hidden(tokens[:, a:b], cache)
        if want is not None:
            sel = want[(want >= a) & (want < b)] - a
            if sel.size:
                outs.append(h[:, sel])
    if want is None:
        return None
    return np.concatenate(outs, axis=1) if outs else np.zeros((B, 0, net.cfg.hidden_size), np.float32)


def option_logprobs(net, encs: list, reuse_cache: bool = True) -> np.ndarray:
    """Summed continuation log-probabilities (fp64) of the encoded options of one item."""
    from .model import KVCache

    hs, targets = [], []
    if not reuse_cache:  # reference path: one plain full forward per option
        for e in encs:
            h = net.hidden(e.inp[None])[0]
            hs.append(h[len(e.inp) - len(e.cont):])
            targets.append(e.cont)
    else:
        # shared prefix: common to every input and ending before the first position any option needs
        p = min(len(e.inp) - len(e.cont) for e in encs)
        first = encs[0].inp
        for e in encs[1:]:
            p = min(p, _lcp(first[:p], e.inp[:p]))
        rest = [e.inp[p:] for e in encs]
        R = max(len(r) for r in rest)
        cache = KVCache(net.cfg, len(encs), p + R)
        if p:
            pc = KVCache(net.cfg, 1, p)
            _run(net, first[None, :p], pc, None)
            for i in range(len(cache.k)):
                cache.k[i][:, :, :p] = pc.k[i][0, :, :p]
                cache.v[i][:, :, :p] = pc.v[i][0, :, :p]
            cache.length = p
            del pc
        batch = np.zeros((len(encs), R), dtype=np.int64)  # right padding never reaches real positions
        for i, r in enumerate(rest):
            batch[i, :len(r)] = r
        # positions (in the remainder) that predict continuation tokens, for every option
        lo = min(len(r) - len(e.cont) for r, e in zip(rest, encs))
        want = np.arange(lo, R)
        h = _run(net, batch, cache, want)
        del cache
        for i, (r, e) in enumerate(zip(rest, encs)):
            a = len(r) - len(e.cont) - lo
            hs.append(h[i, a:a + len(e.cont)])
            targets.append(e.cont)
    nll = net.token_nll(np.concatenate(hs), np.concatenate(targets))
    out, a = [], 0
    for t in targets:
        out.append(-float(np.sum(nll[a:a + len(t)], dtype=np.float64)))
        a += len(t)
    return np.asarray(out)


# --- metrics -------------------------------------------------------------------------------------------
def _stderr(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def summarize(records: list) -> dict:
    """Per-task n / acc / acc_norm / standard errors and their unweighted mean over tasks."""
    tasks: dict = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
    res = {}
    for name, rs in tasks.items():
        acc = [float(r["pred"] == r["label"]) for r in rs]
        accn = [float(r["pred_norm"] == r["label"]) for r in rs]
        res[name] = {"n": len(rs), "acc": float(np.mean(acc)), "acc_stderr": _stderr(acc),
                     "acc_norm": float(np.mean(accn)), "acc_norm_stderr": _stderr(accn)}
    k = len(res)

    def pooled(key):
        se = [v[key] for v in res.values()]
        return None if any(s is None for s in se) else math.sqrt(sum(s * s for s in se)) / k

    mean = {"tasks": k, "n": sum(v["n"] for v in res.values()),
            "acc": float(np.mean([v["acc"] for v in res.values()])), "acc_stderr": pooled("acc_stderr"),
            "acc_norm": float(np.mean([v["acc_norm"] for v in res.values()])),
            "acc_norm_stderr": pooled("acc_norm_stderr")}
    return {"tasks": res, "mean": mean}


def score_items(net, tokenizer, items: list, max_length: int | None = None, reuse_cache: bool = True,
                progress: bool = True, details: bool = False) -> dict:
    """Score multiple-choice items. Returns ``{"tasks": {name: {n, acc, acc_stderr, acc_norm,
    acc_norm_stderr}}, "mean": {...}, "items", "options", "tokens", "truncated_items", "seconds",
    "items_per_s", "peak_rss_mb"}`` (+ ``"details"``: per item log-probabilities etc. when asked)."""
    from tqdm import tqdm

    from .sysinfo import peak_rss_mb

    W = int(max_length or net.cfg.max_position_embeddings)
    records, n_opts, n_tok, n_trunc = [], 0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(items, desc="tasks", unit="item", disable=not progress, leave=False, dynamic_ncols=True)
    hits = 0
    for it in bar:
        encs = encode_item(tokenizer, it, W)
        lp = option_logprobs(net, encs, reuse_cache)
        nb = np.asarray([e.nbytes for e in encs], dtype=np.float64)
        rec = {"task": it.task, "id": it.id, "label": it.label, "pred": int(np.argmax(lp)),
               "pred_norm": int(np.argmax(lp / nb)), "logprobs": lp.tolist(),
               "cont_tokens": [len(e.cont) for e in encs], "cont_bytes": [e.nbytes for e in encs],
               "truncated": [e.truncated for e in encs]}
        records.append(rec)
        n_opts += len(encs)
        n_tok += sum(len(e.inp) for e in encs)
        n_trunc += any(e.truncated for e in encs)
        hits += rec["pred"] == rec["label"]
        bar.set_postfix(acc=f"{hits / len(records):.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    out = summarize(records)
    out.update({"items": len(records), "options": n_opts, "tokens": n_tok, "truncated_items": n_trunc,
                "context_window": W, "seconds": seconds, "items_per_s": len(records) / max(seconds, 1e-9),
                "peak_rss_mb": peak_rss_mb()})
    if details:
        out["details"] = records
    return out


def format_table(res: dict) -> str:
    """The per-task table and the mean, as printed by `tinyzq eval --tasks`."""
    def pm(v, se):
        return f"{100 * v:6.2f} ± {100 * se:5.2f}" if se is not None else f"{100 * v:6.2f} ±   n/a"

    names = list(res["tasks"])
    w = max([len("task"), len("mean")] + [len(n) for n in names])
    lines = [f"{'task':<{w}}  {'n':>6}  {'acc (%)':>15}  {'acc_norm (%)':>15}"]
    for n in names:
        t = res["tasks"][n]
        lines.append(f"{n:<{w}}  {t['n']:>6}  {pm(t['acc'], t['acc_stderr']):>15}  "
                     f"{pm(t['acc_norm'], t['acc_norm_stderr']):>15}")
    m = res["mean"]
    lines.append(f"{'mean':<{w}}  {m['n']:>6}  {pm(m['acc'], m['acc_stderr']):>15}  "
                 f"{pm(m['acc_norm'], m['acc_norm_stderr']):>15}")
    return "\n".join(lines)


__all__ = ["Item", "read_tasks", "as_items", "limit_items", "encode_item", "option_logprobs", "summarize",
           "score_items", "format_table"]
