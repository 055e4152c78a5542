"""The decoder layers of one decode step (one new position, KV cache) in one C call.

`Transformer.hidden` (tinyzq/model.py) calls `decode_layers` for T = 1 with a cache; it runs
csrc/decode.c's `tzq_decode_layers` (RMSNorm, fused q/k/v, attention step, o, residual, RMSNorm,
fused gate/up, SiLU * up, down, residual, for every layer) when the model fits it, and returns False
(the caller runs the NumPy loop, which is the reference) when it does not: a layer that is not
packed, q/k/v or gate/up not fused (`PackedLinear.fuse`), more than DECODE_MAX_ROWS sequences, or no
C kernels. Both paths make the very same product calls, so they agree to float rounding.

The C structs hold raw pointers into the model's arrays, built once per (kernel module, model) and
reused while every array is still the very object it was built from (checked on each call by
identity, a few microseconds): ZO training updates scales, zeros and norms IN PLACE (same memory,
seen by the next call), and anything reassigned (a re-fused layer, a new norm array, another KV
cache) rebuilds the structs.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from .quant.packed import DECODE_MAX_ROWS, FusedLinear, PackedLinear

_F32 = np.dtype(np.float32)


def _packed(lin) -> bool:
    return type(lin) is PackedLinear and lin.codes.flags.c_contiguous and lin.scales.flags.c_contiguous \
        and lin.zeros.flags.c_contiguous and (lin.bias is None or lin.bias.flags.c_contiguous)


def _vec(a, n: int) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == _F32 and a.shape == (n,) and a.flags.c_contiguous


class _Plan:
    """cffi tzq_layer[n] for one model and one kernel module, plus what it was built from."""

    def __init__(self, net, k):
        cfg = net.cfg
        self.k, self.net = k, net
        ffi = k.ffi
        L = len(net.layers)
        self.layers = ffi.new("tzq_layer[]", max(L, 1))
        self.keep = []    # (owner, attribute, object) the pointers were taken from
        self._cols = None
        self.cache = None
        d, f = cfg.hidden_size, cfg.intermediate_size
        for i, layer in enumerate(net.layers):
            s = self.layers[i]
            for name in ("attn_norm", "mlp_norm"):
                a = getattr(layer, name)
                if not _vec(a, d):
                    raise _Unfit
                setattr(s, name, ffi.cast("float *", a.ctypes.data))
                self.keep.append((layer, name, a))
            for name in ("qkv", "gate_up"):
                fl = getattr(layer, name)
                self.keep.append((layer, name, fl))
                if not isinstance(fl, FusedLinear) or not fl.intact() or not _packed(fl.whole):
                    raise _Unfit
                self._linear(s, name, fl.whole)
                parts = [layer.q, layer.k, layer.v] if name == "qkv" else [layer.gate, layer.up]
                if len(fl.parts) != len(parts) or any(a is not b for a, b in zip(fl.parts, parts)):
                    raise _Unfit
                for p in parts:  # the parts' views: reassigning one makes the fused buffer stale
                    for attr in ("codes", "scales", "zeros", "bias"):
                        self.keep.append((p, attr, getattr(p, attr)))
            for name in ("o", "down"):
                lin = getattr(layer, name)
                if not _packed(lin):
                    raise _Unfit
                self._linear(s, name, lin)
                self.keep.append((layer, name, lin))
            want = {"qkv": (cfg.q_size + 2 * cfg.kv_size, d), "o": (d, cfg.q_size), "gate_up": (2 * f, d),
                    "down": (d, f)}
            for name, (r, c) in want.items():
                lin = getattr(s, name)
                if (lin.rows, lin.cols) != (r, c):
                    raise _Unfit

    def _linear(self, s, name, lin: PackedLinear):
        ffi = self.k.ffi
        t = getattr(s, name)
        t.codes = ffi.cast("uint8_t *", lin.codes.ctypes.data)
        t.scales = ffi.cast("float *", lin.scales.ctypes.data)
        t.zeros = ffi.cast("float *", lin.zeros.ctypes.data)
        t.bias = ffi.NULL if lin.bias is None else ffi.cast("float *", lin.bias.ctypes.data)
        t.rows, t.cols, t.bits, t.group = lin.out_features, lin.in_features, lin.bits, lin.group
        for attr in ("codes", "scales", "zeros", "bias"):
            self.keep.append((lin, attr, getattr(lin, attr)))

    def valid(self) -> bool:
        if self._cols is None:  # the owners' instance dicts (none of these classes uses slots or properties)
            self._cols = (tuple(vars(o) for o, _, _ in self.keep), tuple(a for _, a, _ in self.keep),
                          tuple(x for _, _, x in self.keep))
        dicts, attrs, objs = self._cols
        return all(map(operator.is_, map(dict.get, dicts, attrs), objs))  # ~1200 identities, in C loops

    def set_cache(self, cache) -> None:
        ffi = self.k.ffi
        for i in range(len(self.net.layers)):
            self.layers[i].kcache = ffi.cast("float *", cache.k[i].ctypes.data)
            self.layers[i].vcache = ffi.cast("float *", cache.v[i].ctypes.data)
        self.cache = (cache, list(cache.k), list(cache.v), cache.k[0].shape[0], cache.max_len)

    def cache_ok(self, cache, B: int) -> bool:
        """The very cache (and arrays) the pointers were set from, already checked by set_cache's caller."""
        c = self.cache
        return c is not None and c[0] is cache and c[3] == B and c[4] == cache.max_len \
            and len(c[1]) == len(cache.k) and len(c[2]) == len(cache.v) \
            and all(map(operator.is_, c[1], cache.k)) and all(map(operator.is_, c[2], cache.v))


class _Unfit(Exception):
    pass


_LAYER_ATTRS = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")


class _UnfitPlan:
    """Memo of a model that does not fit the C step, until one of its layers' members changes."""

    def __init__(self, net, k):
        self.k, self.net, self._cols = k, net, None
        self.keep = [(layer, a, getattr(layer, a)) for layer in net.layers for a in _LAYER_ATTRS]

    valid = _Plan.valid


def decode_layers(net, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache, pos0: int, k=None):
    """Every decoder layer of `net` for one new position: x [B, 1, d] (the embeddings) -> the residual
    stream after the last layer (a new array, before the final norm), or None when this model/input
    does not fit the C step (nothing is touched; run the NumPy loop). `k`: the kernels module the
    caller already holds (default: tinyzq.model's choice, None when the kernels are not built)."""
    cfg = net.cfg
    if not (isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[1] == 1 and x.shape[2] == cfg.hidden_size
            and 0 < x.shape[0] <= DECODE_MAX_ROWS):
        return None
    if k is None:
        from .model import _kernels

        k = _kernels()
    if k is None or not hasattr(k.lib, "tzq_decode_layers"):  # not built, or a build older than decode.c
        return None
    plan = net.__dict__.get("_decode_plan")
    if plan is None or plan.k is not k or plan.net is not net or not plan.valid():
        try:
            plan = _Plan(net, k)
        except _Unfit:
            plan = _UnfitPlan(net, k)
        net._decode_plan = plan
    if isinstance(plan, _UnfitPlan):
        return None
    B = x.shape[0]
    if not plan.cache_ok(cache, B):
        kc = cache.k[0]
        if len(cache.k) != len(net.layers) or len(cache.v) != len(net.layers) or \
                kc.shape != (B, cfg.num_key_value_heads, cache.max_len, cfg.head_dim) or \
                not all(isinstance(a, np.ndarray) and a.dtype == _F32 and a.flags.c_contiguous and a.shape == kc.shape
                        and a.flags.writeable for a in (*cache.k, *cache.v)):
            return None
        plan.set_cache(cache)
    out = np.array(x, dtype=np.float32, order="C")  # a copy: x may be someone's array
    cs = np.ascontiguousarray(cos[0], dtype=np.float32)
    sn = np.ascontiguousarray(sin[0], dtype=np.float32)
    ffi = k.ffi
    rc = k.lib.tzq_decode_layers(ffi.cast("float *", out.ctypes.data), B, cfg.hidden_size, plan.layers,
                                 len(net.layers), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                 cfg.intermediate_size, cache.max_len, int(pos0),
                                 ffi.cast("float *", cs.ctypes.data), ffi.cast("float *", sn.ctypes.data),
                                 float(cfg.rms_norm_eps), 1.0 / math.sqrt(cfg.head_dim))
    if rc:
        k._check(rc, "decode_layers")
    return out
