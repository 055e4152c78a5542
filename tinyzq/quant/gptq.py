"""GPTQ: column-by-column quantization with error feedback through the inverse Hessian `XᵀX`.

Frantar et al. 2022 (arXiv:2210.17323), in our format (asymmetric, per (row, group of G inputs)).
For a linear y = x Wᵀ with calibration inputs X [n, in], the layer's output error
‖X Wᵀ − X Ŵᵀ‖² = Σ_rows Δw H Δwᵀ with H = XᵀX. Columns are quantized one at a time (in natural
order, or by decreasing H_jj with `act_order`); the rounding error of column j is spread over the
not-yet-quantized columns by the row of the upper Cholesky factor U of H⁻¹ (the OBS update):

    d = U_jj;  e = (w_j − q_j)/d;  w_{j:} −= e · U_{j, j:}

done lazily in blocks of `block` columns (the update of later blocks is one matmul per block), which
is the published algorithm exactly, only batched. Damping: H += damp·mean(diag H)·I; dead inputs
(H_jj = 0, never driven) get H_jj = 1 and weight 0 (their codes dequantize to the group's zero).

Groups. Without act-order, a group's scale and zero are computed when its first column is reached,
from the current (already error-corrected) weights of that group — GPTQ's group-wise implementation.
(Its reference code computes them from the snapshot at the start of its 128-column lazy block; here
blocks are a multiple of G, so the group params see every earlier update, as in the column-by-column
description.) With `act_order`, the params of every group are fixed up front from the original
weights (GPTQ's `static_groups`), so the on-disk layout stays contiguous groups.

The group params come from `param_fn(wg, h_diag)` -> (s, z) per row: min/max RTN by default
(GPTQ's quantizer), or the activation-weighted clip/scale search (method `gptq+search`).
Scales and zeros are rounded to fp16 before use (`fp16=True`), so the error feedback sees the values
that are stored on disk.
"""
from __future__ import annotations

import numpy as np

from ..errors import TinyzqError
from .quantizer import _range_params, check_group, quantize_search

BLOCK = 128


def minmax_params(wg: np.ndarray, bits: int, h_diag=None):
    """GPTQ's quantizer: range [min(w,0), max(w,0)], integer zero point. wg [rows, G] -> s, z [rows]."""
    s, z = _range_params(wg[:, None, :].astype(np.float32), (1 << bits) - 1, "")
    return s[:, 0], z[:, 0]


def search_params(wg: np.ndarray, bits: int, h_diag=None):
    """Clip/scale search weighted by diag(H) (the `search` quantizer) on one group of columns."""
    G = wg.shape[1]
    a = None if h_diag is None else np.maximum(np.asarray(h_diag, np.float64), 0) / max(float(np.max(h_diag)), 1e-30)
    _, s, z = quantize_search(np.ascontiguousarray(wg, np.float32), bits, G, x_stats=a, threads=1)
    return s[:, 0], z[:, 0]


def inverse_upper_cholesky(H: np.ndarray) -> np.ndarray:
    """Upper-triangular U with H⁻¹ = Uᵀ U (GPTQ's `cholesky(cholesky_inverse(cholesky(H)), upper=True)`).

    With J the exchange matrix, J H J = L Lᵀ gives H = R Rᵀ with R = J L J upper triangular, so
    H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ (upper): one Cholesky and one triangular inverse instead of three
    cubic factorizations."""
    L = _chol_lower(H[::-1, ::-1])
    return np.ascontiguousarray(_tri_inv_lower(L)[::-1, ::-1])  # R⁻¹ = J L⁻¹ J


# Blocked Cholesky and triangular inverse: LAPACK only on 64×64 diagonal blocks, the rest is gemm.
# (OpenBLAS's threaded potrf/getri were 10-50× slower than this on a busy 2-core machine.)
def _chol_lower(A: np.ndarray, nb: int = 64) -> np.ndarray:
    n = A.shape[0]
    A = np.array(A, dtype=np.float64, copy=True)
    L = np.zeros_like(A)
    for k in range(0, n, nb):
        e = min(n, k + nb)
        Lkk = np.linalg.cholesky(A[k:e, k:e])
        L[k:e, k:e] = Lkk
        if e < n:
            P = A[e:, k:e] @ np.linalg.inv(Lkk).T
            L[e:, k:e] = P
            A[e:, e:] -= P @ P.T
    return L


def _tri_inv_lower(L: np.ndarray, nb: int = 64) -> np.ndarray:
    n = L.shape[0]
    X = np.zeros_like(L)
    for k in range(0, n, nb):
        e = min(n, k + nb)
        Xkk = np.tril(np.linalg.inv(L[k:e, k:e]))
        X[k:e, k:e] = Xkk
        if k:
            X[k:e, :k] = -Xkk @ (L[k:e, :k] @ X[:k, :k])
    return X


def _round16(a):
    return a.astype(np.float16).astype(np.float32)


def gptq_quantize(w, H, bits: int, group: int, *, damp: float = 0.01, act_order: bool = False,
                  block: int = BLOCK, param_fn=minmax_params, fp16: bool = True, name: str = ""):
    """(q uint8 [out, in], scales fp32 [out, in/G], zeros fp32 [out, in/G]) for weight w [out, in].

    H: [in, in] = Σ x xᵀ over calibration inputs (any positive multiple of it gives the same result).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise TinyzqError(f"{name or 'weight'}: expected a 2-D weight, got shape {w.shape}")
    out_f, in_f = w.shape
    check_group(in_f, group, name)
    H = np.array(H, dtype=np.float64, copy=True)
    if H.shape != (in_f, in_f):
        raise TinyzqError(f"{name or 'weight'}: Hessian of shape {H.shape}, expected ({in_f}, {in_f})")
    if not np.isfinite(H).all():
        raise TinyzqError(f"{name or 'weight'}: calibration statistics are not finite")
    maxq = (1 << bits) - 1
    W = np.array(w, dtype=np.float32, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = in_f // group
    scales = np.empty((out_f, ng), np.float32)
    zeros = np.empty((out_f, ng), np.float32)
    hd = np.diag(H).copy()

    def params(cols_w, g):
        s, z = param_fn(cols_w, bits, hd[g * group:(g + 1) * group])
        if fp16:
            s, z = _round16(np.asarray(s)), _round16(np.asarray(z))
        scales[:, g], zeros[:, g] = s, z

    perm = None
    if act_order:
        for g in range(ng):  # static groups: from the original weights
            params(W[:, g * group:(g + 1) * group], g)
        perm = np.argsort(-hd, kind="stable")
        W = np.ascontiguousarray(W[:, perm])
        H = H[perm][:, perm]
    H[np.diag_indices(in_f)] += damp * float(np.mean(np.diag(H)))
    try:
        U = inverse_upper_cholesky(H)
    except np.linalg.LinAlgError:
        raise TinyzqError(f"{name or 'weight'}: the calibration Hessian is not positive definite even after "
                          f"damping {damp}; use more calibration text or a larger damping") from None
    U = U.astype(np.float32)
    Q = np.empty((out_f, in_f), np.float32)  # codes, in the (possibly permuted) column order
    block = max(group, (int(block) // group) * group)
    inner = 16  # two-level lazy batching: rank-1 updates only inside 16 columns, matmuls beyond
    for i1 in range(0, in_f, block):
        i2 = min(in_f, i1 + block)
        W1 = W[:, i1:i2]  # a view: updated in place
        E1 = np.empty((out_f, i2 - i1), np.float32)
        U1 = U[i1:i2, i1:i2]
        for k1 in range(0, i2 - i1, inner):
            k2 = min(i2 - i1, k1 + inner)
            for i in range(k1, k2):
                j = i1 + i
                if perm is None:
                    if j % group == 0:
                        params(W1[:, i:i + group], j // group)
                    g = j // group
                else:
                    g = perm[j] // group
                s, z = scales[:, g], zeros[:, g]
                col = W1[:, i]
                q = np.clip(np.rint(col / s + z), 0, maxq)
                Q[:, j] = q
                e = (col - s * (q - z)) / U1[i, i]
                if i + 1 < k2:
                    W1[:, i + 1:k2] -= np.outer(e, U1[i, i + 1:k2])
                E1[:, i] = e
            if k2 < i2 - i1:
                W1[:, k2:] -= E1[:, k1:k2] @ U1[k1:k2, k2:]
        if i2 < in_f:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = np.argsort(perm)
        Q = Q[:, inv]
    return Q.astype(np.uint8), scales, zeros


class Hessian:
    """Running H = Σ x xᵀ (fp64) over calibration inputs of one linear (or of linears sharing an input)."""

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.H = np.zeros((self.in_features, self.in_features), np.float64)
        self.count = 0

    def update(self, x) -> None:
        x2 = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, self.in_features))
        self.H += (x2.T @ x2).astype(np.float64)
        self.count += x2.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """XᵀX / n."""
        if self.count == 0:
            raise TinyzqError("no calibration activations were collected")
        return self.H / self.count

    @property
    def x_stats(self) -> np.ndarray:
        """mean x² per input (the diagonal of XᵀX/n): the `x_stats` of the search quantizer."""
        return np.diag(self.mean).astype(np.float32)


__all__ = ["BLOCK", "Hessian", "gptq_quantize", "minmax_params", "search_params"]
