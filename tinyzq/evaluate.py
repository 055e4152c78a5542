"""Perplexity with a fixed, documented protocol.

Tokenize the whole text once (no BOS/EOS added); cut non-overlapping windows of `ctx` tokens from the
start, dropping the incomplete tail; keep the first `max_windows`; score each window on its own (no
carried context) on its ctx−1 next-token predictions; ppl = exp(total NLL / total predictions).
"""
from __future__ import annotations

import math
import time

import numpy as np

from .data import windows as make_windows
from .sysinfo import peak_rss_mb


def perplexity(net, ids, ctx: int = 512, max_windows: int | None = 64, batch: int = 4, progress: bool = True,
               desc: str = "eval") -> dict:
    from tqdm import tqdm

    win = make_windows(np.asarray(ids), ctx, max_windows)
    total_nll, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(win), desc=desc, unit="win", disable=not progress, leave=False, dynamic_ncols=True)
    for a in range(0, len(win), batch):
        nll, n = net.sequence_nll(win[a:a + batch])
        total_nll += nll
        count += n
        bar.update(len(win[a:a + batch]))
        el = time.perf_counter() - t0
        bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}", tok_s=f"{(a + len(win[a:a + batch])) * ctx / el:.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"ppl": math.exp(total_nll / count), "nll": total_nll / count, "tokens": int(win.size),
            "predictions": count, "windows": len(win), "ctx": ctx, "seconds": seconds,
            "tokens_per_s": win.size / seconds, "peak_rss_mb": peak_rss_mb()}
