"""AWQ: activation-aware per-input-channel scaling, folded exactly into the float model.

Lin et al. 2023 (arXiv:2306.00978). For a linear fed by x, y = x Wᵀ = (x / s)(W · s)ᵀ for any positive
per-input-channel s: scaling up the weight columns that meet large activations gives them finer
quantization steps (relative to the activation), and the 1/s on the input costs nothing when it is
folded into whatever produced x:

  attn_norm  → q, k, v     RMSNorm weight /= s,          q/k/v columns *= s
  v          → o           v rows (and bias) /= s_v,    o columns *= s_v (tiled over the query heads
                           that share a KV head: with GQA one v row feeds several o columns, so s is
                           tied across them — searched on their pooled statistics)
  mlp_norm   → gate, up    RMSNorm weight /= s,          gate/up columns *= s
  up         → down        up rows /= s,                 down columns *= s
                           (down's input is silu(gate)·up, linear in up's output)

All four folds are exact in real arithmetic, so the float model's outputs do not change (to fp32
rounding; tested). s = mean|x|^α / sqrt(max·min) per channel (AWQ's normalisation), α searched on a
grid of `grid` values in [0, 1) to minimise the squared error of the part of the block it affects — the
attention output for q/k/v, o's output, the MLP output for gate/up, down's output — with those
weights quantized by `fake_quant` (RTN, like AWQ's search) and everything else float. α = 0 (s = 1)
is on the grid, so the chosen scaling never increases that error on the calibration tokens.

The inputs are the float model's activations (AWQ's choice): the scales describe the float model and
are folded into it before any quantization.
"""
from __future__ import annotations

import numpy as np

from ..model import FloatLinear, rms_norm, silu
from .quantizer import dequantize, quantize_rtn

GRID = 20


def fake_quant_rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    q, s, z = quantize_rtn(w, bits, group)
    return dequantize(q, s.astype(np.float16).astype(np.float32), z.astype(np.float16).astype(np.float32), group)


def _scales(act_abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(act_abs_mean.astype(np.float64), 1e-8) ** alpha
    s = np.maximum(s, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def _mse(a, b) -> float:
    d = (a - b).astype(np.float32, copy=False)
    return float(np.einsum("i,i->", d.ravel(), d.ravel(), dtype=np.float64)) / d.size


def _search(act: np.ndarray, expand, linears: list, run, ref: np.ndarray, bits: int, group: int, grid: int):
    """Best α: run(effective_weights) -> output; effective weight = Q(W·s)/s (s expanded to W's columns)."""
    best = (np.inf, 0.0, np.ones_like(act))
    for k in range(grid):
        alpha = k / grid
        s = _scales(act, alpha)
        se = expand(s)
        eff = [fake_quant_rtn(lin.weight * se, bits, group) / se for lin in linears]
        err = _mse(run(eff), ref)
        if err < best[0]:
            best = (err, alpha, s)
    return best


def _attention(net, i, layer, h, cos, sin, q=None, k=None, v=None, o=None):
    """Attention branch output with optionally replaced q/k/v/o linears (the layer is restored)."""
    saved = (layer.q, layer.k, layer.v, layer.o)
    try:
        layer.q, layer.k, layer.v, layer.o = (q or layer.q), (k or layer.k), (v or layer.v), (o or layer.o)
        return net._attention(i, layer, h, cos, sin, None, 0)
    finally:
        layer.q, layer.k, layer.v, layer.o = saved


class _Capture:
    def __init__(self, lin):
        self.lin, self.x = lin, None

    def __call__(self, x):
        self.x = x
        return self.lin(x)


def awq_block(net, i: int, layer, x: np.ndarray, cos, sin, bits: int, group: int, grid: int = GRID,
              max_tokens: int = 2048) -> dict:
    """Search and fold AWQ scales into decoder block `i` (float linears, modified in place) using
    float block inputs x [N, T, d] (the first windows up to `max_tokens` tokens). Returns the chosen αs."""
    cfg = net.cfg
    eps = cfg.rms_norm_eps
    n_win = max(1, min(len(x), max_tokens // x.shape[1]))
    x = x[:n_win]
    alphas = {}

    # 1. attn_norm -> q, k, v (inspect the attention output, float o)
    h = rms_norm(x, layer.attn_norm, eps)
    ref = _attention(net, i, layer, h, cos, sin)
    act = np.abs(h).reshape(-1, h.shape[-1]).mean(0)
    err, alphas["qkv"], s = _search(
        act, lambda s: s, [layer.q, layer.k, layer.v],
        lambda eff: _attention(net, i, layer, h, cos, sin, *[FloatLinear(w, lin.bias) for w, lin in
                                                             zip(eff, (layer.q, layer.k, layer.v))]),
        ref, bits, group, grid)
    layer.attn_norm = layer.attn_norm / s  # out of place: source arrays may be read-only maps
    for lin in (layer.q, layer.k, layer.v):
        lin.weight = lin.weight * s
    del ref

    # 2. v -> o (inspect o's output); s tied over the query heads of each KV head
    h = rms_norm(x, layer.attn_norm, eps)
    cap = _Capture(layer.o)
    ref = _attention(net, i, layer, h, cos, sin, o=cap)
    xo = cap.x
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = nh // nkv
    act_full = np.abs(xo).reshape(-1, nh * hd).mean(0)
    act = act_full.reshape(nkv, g, hd).mean(1).reshape(-1)  # head h uses KV head h // g

    def expand_o(s):
        return np.repeat(s.reshape(nkv, 1, hd), g, axis=1).reshape(-1)

    err, alphas["o"], s = _search(act, expand_o, [layer.o], lambda eff: xo @ eff[0].T, xo @ layer.o.weight.T,
                                  bits, group, grid)
    layer.v.weight = layer.v.weight / s[:, None]
    if layer.v.bias is not None:
        layer.v.bias = layer.v.bias / s
    layer.o.weight = layer.o.weight * expand_o(s)
    del xo, cap

    # 3. mlp_norm -> gate, up (inspect the MLP output, float down)
    x2 = x + _attention(net, i, layer, h, cos, sin)
    h2 = rms_norm(x2, layer.mlp_norm, eps)
    ref = layer.down(silu(layer.gate(h2)) * layer.up(h2))
    act = np.abs(h2).reshape(-1, h2.shape[-1]).mean(0)
    err, alphas["gate_up"], s = _search(
        act, lambda s: s, [layer.gate, layer.up],
        lambda eff: layer.down(silu(h2 @ eff[0].T) * (h2 @ eff[1].T)), ref, bits, group, grid)
    layer.mlp_norm = layer.mlp_norm / s
    layer.gate.weight = layer.gate.weight * s
    layer.up.weight = layer.up.weight * s

    # 4. up -> down (inspect down's output)
    h2 = rms_norm(x2, layer.mlp_norm, eps)
    a = silu(layer.gate(h2)) * layer.up(h2)
    a2 = a.reshape(-1, a.shape[-1])
    act = np.abs(a2).mean(0)
    err, alphas["down"], s = _search(act, lambda s: s, [layer.down], lambda eff: a2 @ eff[0].T,
                                     a2 @ layer.down.weight.T, bits, group, grid)
    layer.up.weight = layer.up.weight / s[:, None]
    if layer.up.bias is not None:
        layer.up.bias = layer.up.bias / s
    layer.down.weight = layer.down.weight * s
    return alphas


__all__ = ["GRID", "awq_block", "fake_quant_rtn"]
