"""NumPy reference of the packed format and of the int8-activation product (docs/FORMAT.md).

This module is the executable specification: the C kernels (tinyzq.kernels) are tested against
it. Everything here is vectorized NumPy and follows FORMAT.md literally, including the order of
the fp32 operations of the product, so that the C reference matches it bit for bit.

    codes  = pack(q, bits)                       # uint8 [rows, cols*bits/8]
    q      = unpack(codes, bits, cols)           # uint8 [rows, cols]
    W      = dequantize(codes, scales, zeros, bits, group)   # float32 [rows, cols]
    xi, d  = quantize_activations(x)             # int8 [n, cols], float32 [n, cols/32]
    y      = qmatmul_ref(x, codes, scales, zeros, bits, group)  # float32 [n, rows]
"""
from __future__ import annotations

import numpy as np

BITS = (2, 3, 4, 8)
BLOCK = 32

__all__ = ["BITS", "BLOCK", "pack", "unpack", "dequantize", "quantize_activations", "qmatmul_ref",
           "check_layout", "error_bound"]


def check_layout(cols: int, bits: int, group: int | None = None) -> None:
    """Raise ValueError unless (cols, bits, group) is a valid packed layout."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    if cols <= 0 or cols % BLOCK:
        raise ValueError(f"the input width must be a positive multiple of 32, got {cols}")
    if group is not None:
        if group <= 0 or group % BLOCK:
            raise ValueError(f"group must be a positive multiple of 32, got {group}")
        if cols % group:
            raise ValueError(f"group {group} does not divide the input width {cols}")


def _as2d(a: np.ndarray, name: str, dtype) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    return a


def _pack2(q: np.ndarray) -> np.ndarray:
    r = q.reshape(q.shape[0], -1, 4) & 3
    return (r[..., 0] | (r[..., 1] << 2) | (r[..., 2] << 4) | (r[..., 3] << 6)).astype(np.uint8)


def _unpack2(c: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    return ((c[..., None] >> shifts) & 3).reshape(c.shape[0], -1).astype(np.uint8)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] (each < 2**bits) -> canonical packed uint8 [rows, cols*bits/8]."""
    q = _as2d(q, "q", np.uint8)
    rows, cols = q.shape
    check_layout(cols, bits)
    if q.size and int(q.max()) >= (1 << bits):
        raise ValueError(f"codes must be < 2**{bits} = {1 << bits}, got {int(q.max())}")
    if bits == 8:
        return q.copy()
    if bits == 4:
        r = q.reshape(rows, cols // 2, 2)
        return (r[..., 0] | (r[..., 1] << 4)).astype(np.uint8)
    if bits == 2:
        return _pack2(q)
    # 3 bits: the low 2 bits in the 2-bit layout, then the bit-2 plane, 8 codes per byte
    hi = ((q >> 2) & 1).reshape(rows, cols // 8, 8).astype(np.uint16)
    plane = (hi << np.arange(8, dtype=np.uint16)).sum(axis=-1).astype(np.uint8)
    return np.concatenate([_pack2(q), plane], axis=1)


def unpack(codes: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Canonical packed uint8 [rows, cols*bits/8] -> uint8 codes [rows, cols]."""
    codes = _as2d(codes, "codes", np.uint8)
    check_layout(cols, bits)
    rows = codes.shape[0]
    if codes.shape[1] != cols * bits // 8:
        raise ValueError(f"codes must have {cols * bits // 8} bytes per row for {cols} {bits}-bit codes, "
                         f"got shape {codes.shape}")
    if bits == 8:
        return codes.copy()
    if bits == 4:
        out = np.empty((rows, cols), dtype=np.uint8)
        out[:, 0::2] = codes & 15
        out[:, 1::2] = codes >> 4
        return out
    if bits == 2:
        return _unpack2(codes)
    low = _unpack2(codes[:, : cols // 4])
    plane = codes[:, cols // 4:]
    hi = ((plane[..., None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(rows, cols)
    return (low | (hi << 2)).astype(np.uint8)


def _check_sz(scales, zeros, rows, cols, group):
    scales = _as2d(scales, "scales", np.float32)
    zeros = _as2d(zeros, "zeros", np.float32)
    want = (rows, cols // group)
    if scales.shape != want or zeros.shape != want:
        raise ValueError(f"scales and zeros must have shape {want}, got {scales.shape} and {zeros.shape}")
    return scales, zeros


def _cols_of(codes: np.ndarray, bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
    nbytes = codes.shape[1]
    if (nbytes * 8) % bits:
        raise ValueError(f"codes rows of {nbytes} bytes do not hold a whole number of {bits}-bit codes")
    return nbytes * 8 // bits


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group: int) -> np.ndarray:
    """W[o, j] = scales[o, j//group] * (q[o, j] - zeros[o, j//group]), fp32 (subtract, then multiply)."""
    codes = _as2d(codes, "codes", np.uint8)
    cols = _cols_of(codes, bits)
    check_layout(cols, bits, group)
    rows = codes.shape[0]
    scales, zeros = _check_sz(scales, zeros, rows, cols, group)
    q = unpack(codes, bits, cols).astype(np.float32).reshape(rows, cols // group, group)
    return (scales[..., None] * (q - zeros[..., None])).reshape(rows, cols)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0-style: per block of 32, d = max|x|/127, xi = round_half_away(x * (1/d)) in [-127, 127].

    xi is 0 where d == 0; a NaN product (0 * inf when d is subnormal) counts as 0. Returns
    (xi int8 [n, cols], d float32 [n, cols/32])."""
    x = _as2d(x, "x", np.float32)
    check_layout(x.shape[1], 8)
    q, d = _quantize_blocks(x, BLOCK, 127)
    return q.astype(np.int8), d


def quantize_activations16(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and group: a = max|x|/32767, xq = round_half_away(x * (1/a)) in [-32767, 32767] (0 where
    a == 0). Returns (xq int16 [n, cols], a float32 [n, cols/group])."""
    q, a = _quantize_blocks(_as2d(x, "x", np.float32), group, 32767)
    return q.astype(np.int16), a


def _quantize_blocks(x: np.ndarray, block: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The C kernels' activation quantizer, in their order of operations: per block d = max|x|/qmax,
    v = x * (1/d) in fp32 (NaN -> 0), clamped to [-qmax, qmax], rounded half away from zero.
    Returns (integer-valued float32 [n, cols], d float32 [n, cols/block])."""
    n, cols = x.shape
    xb = x.reshape(n, cols // block, block)
    d = np.abs(xb).max(axis=-1) / np.float32(qmax)
    inv = np.zeros_like(d)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        np.divide(np.float32(1), d, out=inv, where=d != 0)  # inf when d is subnormal
        v = xb * inv[..., None]
    v = np.where(np.isnan(v), np.float32(0), v)
    v = np.clip(v, np.float32(-qmax), np.float32(qmax))
    t = np.trunc(v)
    f = v - t
    r = t + (f >= 0.5).astype(np.float32) - (f <= -0.5).astype(np.float32)
    return r.reshape(n, cols), d.astype(np.float32)


def _product_args(x, codes, scales, zeros, bits: int, group: int) -> tuple:
    """Checked operands of a product: (x, codes, scales, zeros, rows, cols)."""
    x = _as2d(x, "x", np.float32)
    codes = _as2d(codes, "codes", np.uint8)
    cols = _cols_of(codes, bits)
    check_layout(cols, bits, group)
    rows = codes.shape[0]
    scales, zeros = _check_sz(scales, zeros, rows, cols, group)
    if x.shape[1] != cols:
        raise ValueError(f"x must have {cols} columns, got shape {x.shape}")
    return x, codes, scales, zeros, rows, cols


def gemm16_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
               group: int) -> np.ndarray:
    """The int16-activation product of FORMAT.md in fp32, in the reference order: with centred codes
    c = q - 2^(bits-1) and z' = z - 2^(bits-1), per group acc = sum xq * c (exact) and
    y += ((float)acc - z' * (float)sum(xq)) * (s * a), groups in order."""
    x, codes, scales, zeros, rows, cols = _product_args(x, codes, scales, zeros, bits, group)
    n, ng, c = x.shape[0], cols // group, np.float32(1 << (bits - 1))
    xq, a = quantize_activations16(x, group)
    q = unpack(codes, bits, cols).astype(np.float64) - float(c)
    xg = xq.astype(np.float64).reshape(n, ng, group)
    sq = xq.astype(np.int64).reshape(n, ng, group).sum(-1).astype(np.float32)           # [n, ng]
    y = np.zeros((n, rows), dtype=np.float32)
    for g in range(ng):
        acc = (xg[:, g] @ q[:, g * group:(g + 1) * group].T).astype(np.float32)          # exact, |acc| < 2**31
        zc = (zeros[:, g] - c).astype(np.float32)
        y = y + (acc - zc[None, :] * sq[:, g, None]) * (scales[None, :, g] * a[:, g, None])
    return y


def qmatmul_ref(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
                group: int) -> np.ndarray:
    """The int8-activation product y[n, o] = sum_j x[n, j] W[o, j] of FORMAT.md, in fp32, in the
    reference order: per group, acc = sum_b d_b * isum_b and sx = sum_b d_b * sum(xi_b) (blocks
    in order), then y += s * (acc - z * sx) (groups in order)."""
    x, codes, scales, zeros, rows, cols = _product_args(x, codes, scales, zeros, bits, group)
    n = x.shape[0]
    nb, ng, bpg = cols // BLOCK, cols // group, group // BLOCK
    xi, d = quantize_activations(x)
    q = unpack(codes, bits, cols)
    # exact integer block sums via float64 matmul (|isum| <= 32*255*127 < 2**53)
    qb = q.reshape(rows, nb, BLOCK).transpose(1, 0, 2).astype(np.float64)      # [nb, rows, 32]
    xb = xi.reshape(n, nb, BLOCK).transpose(1, 2, 0).astype(np.float64)        # [nb, 32, n]
    isum = np.matmul(qb, xb).astype(np.float32)                                # [nb, rows, n], exact
    xsum = xi.reshape(n, nb, BLOCK).astype(np.int32).sum(axis=-1).astype(np.float32).T  # [nb, n]
    dT = d.T                                                                   # [nb, n]
    y = np.zeros((rows, n), dtype=np.float32)
    for g in range(ng):
        acc = np.zeros((rows, n), dtype=np.float32)
        sx = np.zeros((n,), dtype=np.float32)
        for b in range(g * bpg, (g + 1) * bpg):
            acc = acc + dT[b][None, :] * isum[b]
            sx = sx + dT[b] * xsum[b]
        y = y + scales[:, g, None] * (acc - zeros[:, g, None] * sx[None, :])
    return np.ascontiguousarray(y.T)


def error_bound(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """FORMAT.md's bound on |qmatmul - x @ W.T| from the activation rounding:
    |dy[n, o]| <= sum_b (d_b / 2) * sum_{j in b} |W[o, j]|, as float64 [n, rows]."""
    x = np.asarray(x, dtype=np.float32)
    n, cols = x.shape
    d = (np.abs(x.reshape(n, cols // BLOCK, BLOCK)).max(axis=-1) / np.float32(127)).astype(np.float64)
    wabs = np.abs(np.asarray(W, dtype=np.float64)).reshape(W.shape[0], cols // BLOCK, BLOCK).sum(axis=-1)
    return (d / 2) @ wabs.T
