"""Block-by-block calibrated quantization: the driver behind `awq`, `gptq`, `blockzo` and their
combinations (`awq+gptq`, `awq+search`, `gptq+search`, `awq+gptq+blockzo`, ...). (`search` on its own —
the default method — is run by api.quantize from one float forward's statistics, which is 4× faster;
this driver can also run it sequentially: quantize_blocks(..., "search").)

Calibration windows [N, T] of tokens are embedded once; then decoder block i is processed with
only block i's activations in memory:

  quantized stream x_q [N, T, d]: the inputs of block i computed by the already-quantized blocks 0..i−1
      (GPTQ's sequential mode: each block compensates the error its predecessors left). Within the block
      the linears are quantized in forward order — q/k/v (shared input), o, gate/up (shared input),
      down — each from activations produced by the already-quantized linears before it ("true
      sequential"). `search` and `gptq` take their statistics (mean x², XᵀX) from this stream.
  float stream x_f [N, T, d] (only for `awq` and `blockzo`): the float model's block inputs. AWQ searches
      its scales on float activations (as in the paper: its scales are a property of the float model,
      folded into it before quantization); `blockzo` uses the float block's outputs on x_f as targets,
      as EfficientQAT's Block-AP does.

Memory: the two streams (4·N·T·d bytes each: 9.4 MB for 8 windows of 512 tokens on SmolLM2), plus the
transient activations of one block (h, attention input of o, gate/up/down activations ~ 4·N·T·(3d + 2f)
bytes ≈ 80 MB at 4096 tokens on SmolLM2; attention scores are formed per window batch by the model's own
forward) and XᵀX of the widest linear (in², fp64: 19 MB for down_proj). Never all layers at once.
Each finished block's float linears are replaced by packed ones, so RSS falls as the driver advances.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import TinyzqError
from ..model import FloatLinear, rms_norm, silu
from . import quantizer
from .gptq import Hessian, gptq_quantize, minmax_params, search_params

PARTS = ("rtn", "search", "awq", "gptq", "blockzo")
BATCH = 4  # windows per forward call (bounds the attention scores' memory)


@dataclass(frozen=True)
class Plan:
    awq: bool = False
    base: str = "rtn"  # rtn | search | gptq | gptq+search
    blockzo: bool = False

    @property
    def name(self) -> str:
        parts = (["awq"] if self.awq else []) + ([] if self.base == "rtn" and (self.awq or self.blockzo) else
                                                  self.base.split("+")) + (["blockzo"] if self.blockzo else [])
        return "+".join(parts)


def parse_method(method: str) -> Plan:
    """'awq+gptq' -> Plan(awq=True, base='gptq'). Order does not matter; rtn/search/gptq pick the
    quantizer of the weights (gptq+search: GPTQ with searched group scales), awq and blockzo add a
    step before / after it. Without a quantizer named, awq and blockzo use rtn."""
    if not isinstance(method, str) or not method.strip():
        raise TinyzqError(f"--method must be one of {', '.join(PARTS)} or a '+' combination, not {method!r}")
    parts = [p.strip().lower() for p in method.split("+")]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise TinyzqError(f"--method {method!r}: unknown part {bad[0]!r}; choose from {', '.join(PARTS)} "
                          f"combined with '+' (e.g. awq+gptq)")
    if len(set(parts)) != len(parts):
        raise TinyzqError(f"--method {method!r} names a part twice")
    s = set(parts)
    if "rtn" in s and ({"search", "gptq"} & s):
        raise TinyzqError(f"--method {method!r}: rtn cannot be combined with search or gptq (they replace it)")
    base = "gptq+search" if {"gptq", "search"} <= s else "gptq" if "gptq" in s else \
        "search" if "search" in s else "rtn"
    return Plan(awq="awq" in s, base=base, blockzo="blockzo" in s)


def _forward_batches(fn, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([fn(x[a:a + batch]) for a in range(0, len(x), batch)], axis=0)


def _attention(net, i, layer, h, cos, sin, capture: list | None = None):
    """The attention branch of block i on h (batched over windows); capture[0] := o's input."""
    if capture is None:
        return _forward_batches(lambda hb: net._attention(i, layer, hb, cos, sin, None, 0), h)
    o = layer.o
    pieces = []

    class Tap:
        def __call__(self, xb):
            pieces.append(xb)
            return o(xb)

    layer.o = Tap()
    try:
        out = _forward_batches(lambda hb: net._attention(i, layer, hb, cos, sin, None, 0), h)
    finally:
        layer.o = o
    capture.append(np.concatenate(pieces, axis=0))
    return out


def block_forward(net, i: int, layer, x: np.ndarray, cos, sin) -> np.ndarray:
    """Block i's output for inputs x [N, T, d] (the same arithmetic as Transformer.hidden)."""
    eps = net.cfg.rms_norm_eps
    x = x + _attention(net, i, layer, rms_norm(x, layer.attn_norm, eps), cos, sin)
    h = rms_norm(x, layer.mlp_norm, eps)
    return x + layer.down(silu(layer.gate(h)) * layer.up(h))


def _rope(net, T: int):
    ang = np.arange(T, dtype=np.float64)[:, None] * net.inv_freq[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


LINEAR_NAMES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


# GPTQ damping for whole models, as a fraction of mean(diag XᵀX). The paper's 1% fits the calibration
# text's XᵀX too closely: on SmolLM2 W3g64 with the default 4096 calibration tokens (Python's help
# pages), damping 0.01 / 0.1 / 0.3 / 1 / 3 gave held-out GPL-3 ppl 35.2 / 32.9 / 32.6 / 34.2 / 33.4
# (search alone 35.2) and prose 59.5 / 49.6 / 47.5 / 46.4 / 48.5 (search 47.2): 0.3 is the best trade.
DEFAULT_DAMP = 0.3


class Quantizer:
    """Quantizes a set of linears that share one input, from that input's statistics."""

    def __init__(self, base: str, bits: int, group: int, gptq_options: dict | None = None):
        self.base, self.bits, self.group = base, bits, group
        self.gptq_options = {"damp": DEFAULT_DAMP, **(gptq_options or {})}

    def __call__(self, lins: list, names: list, x: np.ndarray):
        """Returns [(q, s, z)] per linear; x: their common input [..., in]."""
        bits, group = self.bits, self.group
        if self.base == "rtn":
            return [quantizer.quantize_rtn(lin.weight, bits, group, name=n) for lin, n in zip(lins, names)]
        if self.base == "search":  # only the diagonal of XᵀX is needed
            st = quantizer.XStats(lins[0].in_features)
            st.update(x)
            xs = st.value
            return [quantizer.quantize_search(lin.weight, bits, group, x_stats=xs, name=n)
                    for lin, n in zip(lins, names)]
        # gptq: one pass over the stacked rows of the linears (they share H)
        H = Hessian(lins[0].in_features)
        H.update(x)
        W = np.concatenate([lin.weight for lin in lins], axis=0)
        pf = search_params if self.base == "gptq+search" else minmax_params
        q, s, z = gptq_quantize(W, H.H, bits, group, param_fn=pf, name=names[0], **self.gptq_options)
        out, r = [], 0
        for lin in lins:
            n = lin.out_features
            out.append((q[r:r + n], s[r:r + n], z[r:r + n]))
            r += n
        return out


def _install(net, i, layer, attrs, results, bits, group):
    from .packed import PackedLinear

    for attr, (q, s, z) in zip(attrs, results):
        lin = getattr(layer, attr)
        s = s.astype(np.float16).astype(np.float32)  # stored as fp16: the next stage sees the stored model
        z = z.astype(np.float16).astype(np.float32)
        pl = PackedLinear.from_codes(q, s, z, bits, group, bias=lin.bias)
        setattr(layer, attr, pl)
        net.weights[f"model.layers.{i}.{LINEAR_NAMES[attr]}.weight"] = pl


def quantize_block_sequential(net, i, layer, x, cos, sin, quant: Quantizer) -> np.ndarray:
    """Quantize block i's linears in forward order from the quantized stream x; returns the block output."""
    eps = net.cfg.rms_norm_eps
    name = lambda a: f"model.layers.{i}.{LINEAR_NAMES[a]}.weight"  # noqa: E731
    h = rms_norm(x, layer.attn_norm, eps)
    _install(net, i, layer, ("q", "k", "v"),
             quant([layer.q, layer.k, layer.v], [name("q"), name("k"), name("v")], h), quant.bits, quant.group)
    cap = []
    _attention(net, i, layer, h, cos, sin, capture=cap)  # o's input with the quantized q/k/v
    xo = cap[0]
    _install(net, i, layer, ("o",), quant([layer.o], [name("o")], xo), quant.bits, quant.group)
    x = x + layer.o(xo)
    del xo, cap, h
    h = rms_norm(x, layer.mlp_norm, eps)
    _install(net, i, layer, ("gate", "up"), quant([layer.gate, layer.up], [name("gate"), name("up")], h),
             quant.bits, quant.group)
    a = silu(layer.gate(h)) * layer.up(h)
    del h
    _install(net, i, layer, ("down",), quant([layer.down], [name("down")], a), quant.bits, quant.group)
    return x + layer.down(a)


def quantize_blocks(net, windows: np.ndarray, bits: int, group: int, method: str, progress: bool = False,
                    gptq_options: dict | None = None, awq_options: dict | None = None,
                    blockzo_options: dict | None = None) -> dict:
    """Quantize every decoder block of `net` (a Transformer with FloatLinears) in place, block by block.

    windows: int [N, T] calibration tokens. Returns a small report (method, seconds, per-block notes).
    """
    from tqdm import tqdm

    plan = parse_method(method)
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise TinyzqError(f"calibration needs token windows [N, T] with T >= 2, got shape {windows.shape}")
    for layer in net.layers:
        for attr in LINEAR_NAMES:
            if not isinstance(getattr(layer, attr), FloatLinear):
                raise TinyzqError("block-wise quantization needs a float model (its linears are already packed)")
    t0 = time.perf_counter()
    cos, sin = _rope(net, windows.shape[1])
    x_q = net.embed.take(windows.reshape(-1).astype(np.int64)).reshape(*windows.shape, -1).astype(np.float32)
    need_float = plan.awq or plan.blockzo
    x_f = x_q.copy() if need_float else None
    quant = Quantizer(plan.base, bits, group, gptq_options)
    notes = []
    for i in tqdm(range(len(net.layers)), desc=f"quantize W{bits}g{group} {plan.name}", unit="block",
                  disable=not progress, leave=False, dynamic_ncols=True):
        layer = net.layers[i]
        note = {"block": i}
        if plan.awq:
            from .awq import awq_block

            note["awq_alpha"] = awq_block(net, i, layer, x_f, cos, sin, bits, group, **(awq_options or {}))
            p = f"model.layers.{i}."
            net.weights[p + "input_layernorm.weight"] = layer.attn_norm
            net.weights[p + "post_attention_layernorm.weight"] = layer.mlp_norm
        y_f = block_forward(net, i, layer, x_f, cos, sin) if need_float else None
        y_q = quantize_block_sequential(net, i, layer, x_q, cos, sin, quant)
        if plan.blockzo:
            from .blockzo import blockzo_block

            note["blockzo"] = blockzo_block(net, i, layer, x_q, y_f, cos, sin, **(blockzo_options or {}))
            y_q = block_forward(net, i, layer, x_q, cos, sin)
        x_q, x_f = y_q, y_f
        notes.append(note)
    return {"method": plan.name, "seconds": time.perf_counter() - t0, "blocks": notes,
            "calib_tokens": int(windows.size)}


__all__ = ["PARTS", "Plan", "Quantizer", "block_forward", "parse_method", "quantize_block_sequential",
           "quantize_blocks"]
