"""The transformer forward pass (Llama / Qwen2 / Mistral family) in NumPy.

Linear layers are objects with one small interface (see `FloatLinear` and `tinyzq.quant.packed.PackedLinear`):
`lin(x)` multiplies `[..., in]` activations, `lin.matmul_rows(x2, a, b)` multiplies `[n, in]` activations
with weight rows `a:b` only (lm_head tiles), `lin.rows(a, b)` returns fp32 weight rows `a:b`,
`lin.take(ids)` returns fp32 rows (embedding lookup). The model neither knows nor cares whether a weight
is float or packed 2/3/4/8-bit: training and deployment run this same code on the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


# The seven projections of a decoder block, in Hugging Face naming; these are what gets quantized.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def weight_shapes(cfg: ModelConfig) -> dict:
    """Every tensor the model needs (Hugging Face names) and its shape."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def is_block_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and \
        any(name.endswith(s + ".weight") for s in BLOCK_LINEARS)


class FloatLinear:
    """fp32 `y = x @ W.T (+ b)`; W is [out, in] (Hugging Face layout)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # 2-D operands so NumPy hands the whole product to one BLAS gemm call
        y = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32) @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul_rows(self, x2: np.ndarray, start: int, stop: int) -> np.ndarray:
        return x2 @ self.weight[start:stop].T

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.weight[start:stop]

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.weight[ids]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)


ATTN_QBLOCK = 64  # queries per block of the causal attention (keys past the block's last query are skipped)


def _kv_rows(a: np.ndarray) -> np.ndarray:
    """a [B, nkv, S, hd] as the C kernel takes it: contiguous rows (a KV cache's prefix view is kept)."""
    st = a.strides
    if st[3] == 4 and st[2] == 4 * a.shape[3] and st[0] == st[1] * a.shape[1]:
        return a
    return np.ascontiguousarray(a)


def _causal_gqa(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, K=None) -> np.ndarray:
    """Causal grouped-query attention. q [B, nkv, g, T, hd] (already scaled) at absolute positions
    pos0..pos0+T-1; k, v [B, nkv, S, hd] for positions 0..S-1. Returns [B, nkv, g, T, hd].

    With the C kernels (K) this is one call to csrc/attn_prefill.c. The NumPy path below is the
    fall-back and the tests' reference. Its queries go in blocks of ATTN_QBLOCK: a block only multiplies
    the keys its last query can see (about half the work of the full square for a long prompt) and its
    scores stay cache-sized. Within a block the g query heads of one KV head are stacked as g*t rows
    against its keys, so every product is one plain batched gemm (no broadcast strides, which defeat
    BLAS)."""
    B, nkv, g, T, hd = q.shape
    if K is not None:  # csrc/attn_prefill.c: scores, mask, softmax and the product with V in one call
        return K.attn_prefill(np.ascontiguousarray(q), _kv_rows(k), _kv_rows(v), pos0)
    out = np.empty((B, nkv, g, T, hd), dtype=np.float32)
    for t0 in range(0, T, ATTN_QBLOCK):
        t1 = min(T, t0 + ATTN_QBLOCK)
        n, S1 = t1 - t0, pos0 + t1  # keys 0..S1-1 are visible to some query of the block
        qb = np.ascontiguousarray(q[:, :, :, t0:t1]).reshape(B, nkv, g * n, hd)
        scores = (qb @ k[:, :, :S1].swapaxes(-1, -2)).reshape(B, nkv, g, n, S1)
        if n > 1:  # causal: the query at absolute position pos0+t sees keys 0..pos0+t
            scores += np.where(np.arange(S1)[None, :] > (pos0 + np.arange(t0, t1))[:, None], -np.inf,
                               0.0).astype(np.float32)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[:, :, :, t0:t1] = (scores.reshape(B, nkv, g * n, S1) @ v[:, :, :S1]).reshape(B, nkv, g, n, hd)
    return out


def _fuse(parts):
    """A fused linear for parts sharing one input (q/k/v, gate/up) if their type supports it."""
    fuse = getattr(type(parts[0]), "fuse", None)
    return fuse(parts) if fuse is not None else None


def _kernels():
    """The C kernels (T = 1 attention step, element-wise ops of csrc/ops.c), or None when they are
    not built: the NumPy functions below are then used (they are also the tests' reference)."""
    try:
        from . import kernels

        return kernels.get()
    except ImportError:
        return None


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(var + eps))).astype(np.float32, copy=False) * w


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), written to stay finite for large |x| in fp32
    return x / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies with the rope scaling of the config (none, linear, llama3)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE (Hugging Face layout). x: [B, H, T, hd]; cos/sin: [T, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@dataclass
class Layer:
    attn_norm: np.ndarray
    q: object
    k: object
    v: object
    o: object
    mlp_norm: np.ndarray
    gate: object
    up: object
    down: object
    qkv: object = None      # q/k/v fused into one kernel call (see _fuse), or None
    gate_up: object = None  # gate/up fused likewise


class KVCache:
    """Keys/values of past positions, per layer: [B, n_kv, max_len, hd] fp32."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0


class Transformer:
    """Decoder-only transformer. `weights` maps Hugging Face tensor names to linears / fp32 arrays."""

    def __init__(self, cfg: ModelConfig, weights: dict):
        self.cfg = cfg
        self.weights = weights
        L = "model.layers.{}."
        self.embed = weights["model.embed_tokens.weight"]
        self.layers = [
            Layer(
                attn_norm=weights[L.format(i) + "input_layernorm.weight"],
                q=weights[L.format(i) + "self_attn.q_proj.weight"],
                k=weights[L.format(i) + "self_attn.k_proj.weight"],
                v=weights[L.format(i) + "self_attn.v_proj.weight"],
                o=weights[L.format(i) + "self_attn.o_proj.weight"],
                mlp_norm=weights[L.format(i) + "post_attention_layernorm.weight"],
                gate=weights[L.format(i) + "mlp.gate_proj.weight"],
                up=weights[L.format(i) + "mlp.up_proj.weight"],
                down=weights[L.format(i) + "mlp.down_proj.weight"],
            )
            for i in range(cfg.num_hidden_layers)
        ]
        self.norm = weights["model.norm.weight"]
        self.head = weights.get("lm_head.weight", self.embed) if not cfg.tie_word_embeddings else self.embed
        self.inv_freq = rope_inv_freq(cfg)
        for layer in self.layers:
            layer.qkv = _fuse([layer.q, layer.k, layer.v])
            layer.gate_up = _fuse([layer.gate, layer.up])

    def _proj(self, fused, parts, h):
        """The outputs of `parts` on h: one call of their fused linear while it is intact (the parts
        still hold views into it, see tinyzq/quant/packed.py), else one call per part."""
        if fused is not None and fused.parts[0] is parts[0] and all(a is b for a, b in zip(fused.parts, parts)) \
                and fused.intact():
            return fused.split(fused(h))
        return [p(h) for p in parts]

    # --- the forward pass -------------------------------------------------------------------------
    def hidden(self, tokens: np.ndarray, cache: KVCache | None = None, *, stop: int | None = None,
               resume: tuple | None = None, keep: dict | None = None) -> np.ndarray:
        """Final-normed hidden states [B, T, d] for int tokens [B, T] (appended to `cache` if given).

        Split passes (no cache): `stop=i` returns the residual stream entering layer i (no final norm);
        `resume=(i, x)` continues from that stream. The two halves run the very same operations as one
        pass, so the result is bit-identical; the ZO trainer shares the first half between its + and −
        passes when it perturbs only layers >= i. `keep`: a dict whose keys are layer indices (0..L) gets
        the residual stream entering each of them (L: after the last layer) from this one pass."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        pos0 = cache.length if cache is not None else 0
        if cache is not None and pos0 + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {pos0 + T} needed")
        ang = np.arange(pos0, pos0 + T, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        first, last = 0, len(self.layers) if stop is None else stop
        if (stop is not None or resume is not None or keep is not None) and cache is not None:
            raise ValueError("split passes (stop/resume) take no KV cache")
        if resume is not None:
            first, x = resume
            if x.shape[:2] != (B, T):
                raise ValueError(f"resume stream has shape {x.shape}, tokens {tokens.shape}")
        else:
            x = self.embed.take(tokens.reshape(-1).astype(np.int64)).reshape(B, T, -1).astype(np.float32, copy=False)
        K = _kernels()
        fast = cache is not None and T == 1 and K is not None
        eps = self.cfg.rms_norm_eps
        norm = (lambda a, w: K.rms_norm(a, w, eps)) if K is not None else (lambda a, w: rms_norm(a, w, eps))
        layers = zip(range(first, last), self.layers[first:last])
        if fast:
            from .decode import decode_layers  # every layer in one C call when the model fits it

            xc = decode_layers(self, x, cos, sin, cache, pos0, K)
            if xc is not None:
                x, layers = xc, ()
        for i, layer in layers:
            if keep is not None and i in keep:
                keep[i] = x  # never written in place below: every update makes a new array
            h = norm(x, layer.attn_norm)
            if fast:
                x = x + self._attention_decode(i, layer, h, cos, sin, cache, pos0, K)
            else:
                x = x + self._attention(i, layer, h, cos, sin, cache, pos0, K)
            h = norm(x, layer.mlp_norm)
            g, u = self._proj(layer.gate_up, [layer.gate, layer.up], h)
            x = x + layer.down(K.silu_mul(g, u) if K is not None else silu(g) * u)
        if cache is not None:
            cache.length = pos0 + T
        if keep is not None and last in keep:
            keep[last] = x
        if stop is not None:
            return x
        return norm(x, self.norm)

    def _attention(self, i, layer, h, cos, sin, cache, pos0, K=None):
        cfg = self.cfg
        B, T, _ = h.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self._proj(layer.qkv, [layer.q, layer.k, layer.v], h)
        if K is not None:  # in place on the projections' fresh outputs (views of one fused output)
            K.rope_(q, nh, hd, cos, sin)
            K.rope_(k, nkv, hd, cos, sin)
        q = q.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        if K is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[i][:, :, pos0:pos0 + T] = k
            cache.v[i][:, :, pos0:pos0 + T] = v
            k, v = cache.k[i][:, :, :pos0 + T], cache.v[i][:, :, :pos0 + T]
        g = nh // nkv
        q = (q * np.float32(1.0 / math.sqrt(hd))).reshape(B, nkv, g, T, hd)
        out = _causal_gqa(q, k, v, pos0, K).reshape(B, nh, T, hd).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
        return layer.o(out)

    def _attention_decode(self, i, layer, h, cos, sin, cache, pos0, K):
        """_attention for one new position (T = 1) with a KV cache, in one C call (csrc/attn.c):
        same operations in fp32, only dot-product summation orders differ."""
        cfg = self.cfg
        B = h.shape[0]
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h2 = h.reshape(B, -1)
        q, k, v = self._proj(layer.qkv, [layer.q, layer.k, layer.v], h2)
        q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
        out = K.attn_decode(q, k, v, nh, nkv, cos[0], sin[0], cache.k[i], cache.v[i], pos0, 1.0 / math.sqrt(hd))
        return layer.o(out).reshape(B, 1, -1)

    # --- heads ------------------------------------------------------------------------------------
    def logits(self, h: np.ndarray) -> np.ndarray:
        """Full logits for a few positions only (generation): h [..., d] -> [..., vocab]."""
        return self.head(np.ascontiguousarray(h, dtype=np.float32))

    def token_nll(self, h: np.ndarray, targets: np.ndarray, tile: int = 4096) -> np.ndarray:
        """Per-token negative log-likelihood (fp64) of `targets` given hidden states h [N, d].

        The vocabulary is processed in tiles of lm_head rows with an online log-sum-exp, so the
        [N, vocab] logits never exist at once (and a packed head is dequantized one tile at a time).
        """
        h = np.ascontiguousarray(h.reshape(-1, h.shape[-1]), dtype=np.float32)
        targets = np.asarray(targets).reshape(-1)
        n, V = h.shape[0], self.head.out_features
        run_max = np.full(n, -np.inf)
        run_sum = np.zeros(n)
        target_logit = np.zeros(n)
        K = _kernels()
        for a in range(0, V, tile):
            b = min(V, a + tile)
            z = self.head.matmul_rows(h, a, b)  # [n, tile] fp32
            hit = (targets >= a) & (targets < b)
            target_logit[hit] = z[hit, targets[hit] - a]
            if K is not None:
                K.lse_update(z, run_max, run_sum)
                continue
            m = np.maximum(run_max, z.max(axis=1))
            run_sum = run_sum * np.exp(run_max - m) + np.exp(z - m[:, None].astype(np.float32)).sum(axis=1, dtype=np.float64)
            run_max = m
        return run_max + np.log(run_sum) - target_logit

    def sequence_nll(self, tokens: np.ndarray, resume: tuple | None = None,
                     keep: dict | None = None) -> tuple[float, int]:
        """Summed next-token NLL and prediction count over a batch of windows [B, T] (no carried context).
        `resume`, `keep`: continue from / keep residual streams, as in `hidden`."""
        tokens = np.atleast_2d(tokens)
        h = self.hidden(tokens, resume=resume, keep=keep)
        nll = self.token_nll(h[:, :-1], tokens[:, 1:])
        return float(nll.sum()), int(nll.size)
