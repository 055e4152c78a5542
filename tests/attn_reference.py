"""The float64 NumPy reference of csrc/attn_prefill.c (causal grouped-query attention), shared by
tests/test_attention.py and the ARM harness's golden cases (tests/arm/gen_cases.py)."""
import numpy as np


def reference(q, k, v, pos0):
    """float64 softmax(q.K^T + causal mask) V, one query row at a time; and max |q.k|."""
    B, nkv, g, T, hd = q.shape
    out, smax = np.zeros(q.shape, np.float64), 0.0
    for t in range(T):
        S = pos0 + t + 1  # keys 0 .. pos0+t are visible
        s = np.einsum("bkgd,bksd->bkgs", q[:, :, :, t].astype(np.float64), k[:, :, :S].astype(np.float64))
        smax = max(smax, float(np.abs(s).max()))
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, :, t] = np.einsum("bkgs,bksd->bkgd", p, v[:, :, :S].astype(np.float64))
    return out, smax
