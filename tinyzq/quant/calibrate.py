"""Calibration: the mean x² of every decoder linear's inputs over a few windows of text.

These are the `x_stats` of `quantizer.quantize_search`: with them the search minimises (the diagonal
approximation of) each layer's output error instead of its weight error, which is what makes `search`
beat RTN on models with outlier input channels such as SmolLM2 (numbers in the quantizer's doc).

The statistics come from one forward pass of the float model; each linear is wrapped in a `_Tap`
that accumulates its input. Linears fed the same array (q/k/v; gate/up) share one accumulator.
"""
from __future__ import annotations

import numpy as np

from ..errors import TinyzqError
from .quantizer import XStats

CALIB_WINDOWS, CALIB_CTX = 8, 512  # 4096 tokens: 2 windows already give most of the gain


class _Tap:
    """Stand-in for a linear layer: records its input into `stats`, then runs it."""

    def __init__(self, lin, stats: XStats, last: list):
        self.lin, self.stats, self.last = lin, stats, last

    def __call__(self, x):
        if self.last[0] is not x:  # q/k/v (gate/up) see the same array: count it once
            self.stats.update(x)
            self.last[0] = x
        return self.lin(x)


def calib_windows(ids, ctx: int = CALIB_CTX, n: int = CALIB_WINDOWS) -> np.ndarray:
    """`n` windows of `ctx` tokens spread evenly over `ids` (so calibration sees the whole text)."""
    ids = np.asarray(ids, dtype=np.int64)
    if n < 1 or ctx < 2:
        raise TinyzqError(f"calibration needs at least one window of at least 2 tokens (got {n} × {ctx})")
    if len(ids) < ctx:
        if len(ids) < 16:
            raise TinyzqError(f"the calibration text has only {len(ids)} tokens; give it at least a paragraph")
        return ids[None]
    total = len(ids) // ctx
    picks = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    return np.stack([ids[p * ctx:(p + 1) * ctx] for p in picks])


def collect_x_stats(net, windows: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
    """{linear weight name: mean x² per input channel} for every decoder linear of `net` (a Transformer)."""
    taps = {}
    originals = [(layer, dict(q=layer.q, k=layer.k, v=layer.v, o=layer.o, gate=layer.gate, up=layer.up,
                              down=layer.down)) for layer in net.layers]
    groups = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
    hf = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
              gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    try:
        for i, (layer, lins) in enumerate(originals):
            for group in groups:
                stats, last = XStats(lins[group[0]].in_features), [None]
                for attr in group:
                    setattr(layer, attr, _Tap(lins[attr], stats, last))
                    taps[f"model.layers.{i}.{hf[attr]}.weight"] = stats
        from tqdm import tqdm

        for w in tqdm(windows, desc="calibrate", unit="window", disable=not progress, leave=False,
                      dynamic_ncols=True):
            net.hidden(np.asarray(w)[None])
    finally:  # the model is left exactly as it was, even on Ctrl-C
        for layer, lins in originals:
            for attr, lin in lins.items():
                setattr(layer, attr, lin)
    return {name: st.value for name, st in taps.items()}
