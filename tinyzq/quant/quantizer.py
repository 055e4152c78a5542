"""Group-wise uniform weight quantizer: round-to-nearest (RTN) and a clip/scale search.

Format (docs/FORMAT.md): asymmetric, one scale `s` and zero point `z` per (output row, group of `group`
consecutive inputs); `W[o, j] ≈ s[o, j//group] · (q[o, j] − z[o, j//group])`, codes `q ∈ [0, 2^bits − 1]`.

RTN. Per group, the range is [min(w, 0), max(w, 0)] (0 is always inside, as in GPTQ, so the zero point
`z = round(−lo/s)` is an integer in [0, 2^b − 1] without clipping anything away and every weight is
within s/2 of the grid); `s = (hi − lo)/(2^b − 1)`; `q = clip(round(w/s + z), 0, 2^b − 1)`. An all-zero
group gets `s = ZERO_RANGE_SCALE` (the smallest normal fp16, so it survives fp16 storage), `z = 0`,
`q = 0`: it dequantizes to exactly 0.

Search (`quantize_search`). Per group, minimise the reconstruction error
`E = Σ_j a_j (w_j − ŵ_j)²` with `a_j = 1` (weight MSE) or `a_j = x_stats[j]` = mean of x_j² over
calibration activations (then E is the diagonal approximation of the layer's output error):
1. grid: shrink the range symmetrically, [r·lo, r·hi] for `grid` ratios r from 1.0 down to `min_ratio`
   (r = 1.0 is RTN itself); keep the best r per group;
2. refine: alternate a closed-form weighted least-squares fit of (s, z) for the fixed codes
   (u ≈ s·q + m, z = −m/s; z becomes a real number in code units, which the format allows) with
   re-rounding the codes to the new grid. Both half-steps can only lower E, so this is a monotone
   descent (a Lloyd iteration restricted to uniform grids) that ends in a local minimum; it is run
   `refine` iterations from the best grid ratio and from `starts` ratios spread over [min_ratio, 1],
   and the best end point is kept;
3. safety net: any group whose final error exceeds its RTN error (possible only through float
   rounding) falls back to its RTN parameters. So search is never worse than RTN, group by group.

Everything per group is done in units of the RTN step s0 (u = w/s0), so the arithmetic is
scale-free (no overflow for huge weights, no underflow for tiny ones) and the symmetric grid needs no
per-group broadcasting: the zero point does not move when both ends shrink by the same ratio.
Rows are processed in chunks of about CHUNK_ELEMS weights (cache-sized temporaries; peak extra memory
is a few chunks per thread), chunks in parallel threads (NumPy releases the GIL in its loops).

Measured (2-core AVX-512 VM; the 210 decoder linears of SmolLM2-135M, 106 M weights, g64): RTN ≈ 0.5 s;
search with the defaults ≈ 24 s on 1 thread, ≈ 20 s on 2 (the VM's vCPUs share vector units, so RTN
stays on one thread by default); weight MSE relative to RTN ≈ 0.51 (2-bit) and 0.71 (3-bit); on
Laplace weights 0.59 / 0.76 / 0.84 at 2 / 3 / 4 bits (grid alone: 0.64 / 0.83 / 0.94).

Weight MSE is the wrong target for SmolLM2: its linear inputs have outlier channels (mean x² up to
~750× the median), and clipping the weights that meet them costs far more than it saves elsewhere.
Perplexity on the default corpus's validation slice (16×512 tokens; float 9.70; scales/zeros fp16):
  W3g64  RTN 29.2 | search without x_stats 38.0 (worse!) | search with x_stats 14.5 (grid alone 19.9)
  W4g64  RTN 12.7 | with x_stats 10.4;   W2g64  RTN 2.6e5 | with x_stats 97;   W2g32  RTN 1.9e4 | 48
with x_stats = XStats over 16 windows of 512 tokens of the training split (2 windows: W3g64 14.8).
So pass x_stats whenever a forward pass on some text is possible.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..errors import TinyzqError

BITS = (2, 3, 4, 8)
# Scale given to all-zero groups: the smallest normal fp16 number, so it stays > 0 when stored as fp16.
ZERO_RANGE_SCALE = float(2.0 ** -14)
# Weights per chunk of rows: ~6 fp32 temporaries of this size stay within a 1 MiB L2 cache.
CHUNK_ELEMS = 1 << 16

_F32_TINY = float(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------------------- checks
def _sizes_that_work(in_features: int) -> list[int]:
    return [g for g in range(32, in_features + 1, 32) if in_features % g == 0]


def check_group(in_features: int, group: int, name: str = "") -> None:
    """Raise a one-line TinyzqError unless `group` is a multiple of 32 that divides `in_features`."""
    of = f" of {name}" if name else ""
    in_features, group = int(in_features), int(group)
    ok = _sizes_that_work(in_features)
    if not ok:
        raise TinyzqError(f"the input width {in_features}{of} is not a multiple of 32, so it cannot be quantized "
                          f"group-wise (kernels work in blocks of 32)")
    sizes = ", ".join(map(str, ok))
    if group <= 0 or group % 32 != 0:
        raise TinyzqError(f"group size {group} is not a positive multiple of 32 (kernels work in blocks of 32); "
                          f"sizes that work for the input width {in_features}{of}: {sizes}")
    if in_features % group != 0:
        raise TinyzqError(f"group size {group} does not divide the input width {in_features}{of}; "
                          f"sizes that work: {sizes}")


def _check_bits(bits) -> int:
    if bits not in BITS:
        raise TinyzqError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits!r}")
    return int(bits)


def _check_weight(w, group: int, name: str) -> np.ndarray:
    w = np.asarray(w)
    what = name or "weight"
    if w.ndim != 2:
        raise TinyzqError(f"{what}: expected a 2-D weight [out, in], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TinyzqError(f"{what}: expected a floating-point weight, got dtype {w.dtype}")
    check_group(w.shape[1], group, name)
    return np.ascontiguousarray(w, dtype=np.float32)


def _check_x_stats(x_stats, in_features: int, name: str) -> np.ndarray | None:
    if x_stats is None:
        return None
    a = np.ascontiguousarray(x_stats, dtype=np.float32)
    what = f"x_stats for {name}" if name else "x_stats"
    if a.shape != (in_features,):
        raise TinyzqError(f"{what}: expected shape ({in_features},) (mean x² per input), got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise TinyzqError(f"{what}: must be finite and >= 0 (mean of x² per input)")
    return a


def _threads(threads: int | None) -> int:
    if threads is None:
        try:
            threads = int(os.environ.get("TINYZQ_THREADS", "") or (os.cpu_count() or 1))
        except ValueError:
            threads = os.cpu_count() or 1
    return max(1, int(threads))


# ------------------------------------------------------------------------------------ core math
def _range_params(wg: np.ndarray, maxq: int, name: str):
    """RTN step s0 [R, ng] (fp32, > 0) and integer zero point z0 [R, ng] (fp32) of each group of wg [R, ng, G]."""
    lo = np.minimum(wg.min(axis=-1), 0).astype(np.float64)
    hi = np.maximum(wg.max(axis=-1), 0).astype(np.float64)
    rng = hi - lo
    if not np.isfinite(rng).all():
        raise TinyzqError(f"{name or 'weight'}: has NaN or infinite values (or values beyond the fp32 range)")
    s = rng / maxq
    zero_range = ~(s >= _F32_TINY)  # all-zero groups (or so close to 0 that fp32 cannot hold the step)
    s[zero_range] = ZERO_RANGE_SCALE
    s = s.astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, maxq).astype(np.float32)
    z[zero_range] = 0
    return s, z


def _encode(u: np.ndarray, s: np.ndarray, z: np.ndarray, maxq: int, out: np.ndarray) -> np.ndarray:
    """Codes clip(round(u/s + z), 0, maxq) as fp32 into `out`; u [R, ng, G], s/z [R, ng]."""
    np.divide(u, s[..., None], out=out)
    out += z[..., None]
    np.rint(out, out=out)
    np.clip(out, 0, maxq, out=out)
    return out


def _group_err(d: np.ndarray, sqa: np.ndarray | None) -> np.ndarray:
    """Σ_j a_j d_j² per group; d [R, ng, G] (clobbered when weighted), sqa = sqrt(a) [ng, G] or None."""
    if sqa is not None:
        d *= sqa
    return np.einsum("rgi,rgi->rg", d, d)


def _recon_err(u, q, s, z, sqa, tmp) -> np.ndarray:
    """Error of codes q with (s, z) against u, per group (all in units of s0)."""
    np.subtract(q, z[..., None], out=tmp)
    tmp *= s[..., None]
    tmp -= u
    return _group_err(tmp, sqa)


def _search_chunk(wg: np.ndarray, maxq: int, ratios: np.ndarray, start_ratios: np.ndarray, refine: int,
                  a: np.ndarray | None, sqa: np.ndarray | None, name: str):
    """Quantize one chunk of rows wg [R, ng, G]; returns q (uint8 [R, ng, G]), s, z ([R, ng] fp32)."""
    s0, z0 = _range_params(wg, maxq, name)
    u = wg / s0[..., None]  # weights in units of the RTN step
    tmp = np.empty_like(u)
    q = np.empty_like(u)

    # RTN: s' = 1, z = z0 (exactly quantize_rtn's codes)
    ones = np.ones_like(s0)
    q_rtn = _encode(u, ones, z0, maxq, np.empty_like(u))
    err_rtn = _recon_err(u, q_rtn, ones, z0, sqa, tmp)

    # 1. symmetric clip grid. With both ends shrunk by r, z stays z0 and the step is r (units of s0):
    #    codes − z0 = clip(round(u/r), −z0, maxq − z0).
    best_r = ones.copy()
    best_err = err_rtn.copy()
    if len(ratios) > 1:
        lo_b = np.broadcast_to(-z0[..., None], u.shape).copy()
        hi_b = lo_b + maxq
        for r in ratios[1:]:
            r = np.float32(r)
            np.multiply(u, np.float32(1) / r, out=tmp)
            np.rint(tmp, out=tmp)
            np.maximum(tmp, lo_b, out=tmp)
            np.minimum(tmp, hi_b, out=tmp)
            tmp *= r
            tmp -= u
            e = _group_err(tmp, sqa)
            better = e < best_err
            best_err[better] = e[better]
            best_r[better] = r
        del lo_b, hi_b
    best_s, best_z = best_r, z0.copy()

    # 2. refine from the best grid ratio and from `starts` ratios spread over the grid (the LS/re-round
    #    descent ends in a local minimum; several starts find better ones): each start runs `refine`
    #    iterations of (least-squares s, z for the fixed codes; re-round the codes). Both half-steps
    #    lower the error, so only the end point of each start is evaluated.
    if refine > 0:
        G = u.shape[-1]
        if a is None:
            sum_a = np.float32(G)
            mean_u = np.einsum("rgi->rg", u) / sum_a
        else:
            sum_a = a.sum(axis=-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean_u = np.einsum("rgi,gi->rg", u, a) / sum_a
        inits = [best_s.copy()] + [np.full_like(best_s, r) for r in start_ratios]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for cur_s in inits:
                cur_z = z0.copy()
                for _ in range(refine):
                    _encode(u, cur_s, cur_z, maxq, q)
                    if a is None:
                        mean_q = np.einsum("rgi->rg", q) / sum_a
                        np.subtract(q, mean_q[..., None], out=tmp)  # centred codes
                        sqq = np.einsum("rgi,rgi->rg", tmp, tmp)
                    else:
                        mean_q = np.einsum("rgi,gi->rg", q, a) / sum_a
                        np.subtract(q, mean_q[..., None], out=tmp)
                        tmp *= a
                        sqq = np.einsum("rgi,rgi->rg", tmp, q)  # Σ a (q − q̄) q = Σ a (q − q̄)²
                    s_new = np.einsum("rgi,rgi->rg", tmp, u) / sqq
                    z_new = mean_q - mean_u / s_new  # u ≈ s q + m with m = ū − s q̄; z = −m/s
                    ok = np.isfinite(s_new) & (s_new > 0) & np.isfinite(z_new)
                    np.copyto(cur_s, s_new, where=ok, casting="unsafe")
                    np.copyto(cur_z, z_new, where=ok, casting="unsafe")
                _encode(u, cur_s, cur_z, maxq, q)
                e = _recon_err(u, q, cur_s, cur_z, sqa, tmp)
                better = e < best_err
                best_err[better] = e[better]
                best_s[better] = cur_s[better]
                best_z[better] = cur_z[better]

    # 3. final codes; fall back to RTN wherever the search did not end up strictly better
    _encode(u, best_s, best_z, maxq, q)
    e = _recon_err(u, q, best_s, best_z, sqa, tmp)
    worse = ~(e < err_rtn)
    if worse.any():
        best_s[worse] = 1
        best_z[worse] = z0[worse]
        q[worse] = q_rtn[worse]
    return q.astype(np.uint8), (best_s * s0).astype(np.float32), best_z


def _run_chunks(w: np.ndarray, bits: int, group: int, fn: Callable, threads: int | None):
    """Apply fn(wg_chunk) -> (q, s, z) over row chunks of w, in threads; assemble the outputs."""
    out_f, in_f = w.shape
    ng = in_f // group
    q = np.empty((out_f, in_f), np.uint8)
    s = np.empty((out_f, ng), np.float32)
    z = np.empty((out_f, ng), np.float32)
    rows = max(1, CHUNK_ELEMS // max(1, in_f))
    starts = list(range(0, out_f, rows))

    def work(r0: int) -> None:
        r1 = min(out_f, r0 + rows)
        qc, sc, zc = fn(w[r0:r1].reshape(r1 - r0, ng, group))
        q[r0:r1] = qc.reshape(r1 - r0, in_f)
        s[r0:r1] = sc
        z[r0:r1] = zc

    n = min(_threads(threads), len(starts))
    if n <= 1:
        for r0 in starts:
            work(r0)
    else:
        with ThreadPoolExecutor(n) as ex:
            for _ in ex.map(work, starts):
                pass
    return q, s, z


# ------------------------------------------------------------------------------------ public API
def quantize_rtn(w, bits: int, group: int, *, x_stats=None, name: str = "", threads: int | None = 1):
    """Round-to-nearest: (q uint8 [out, in], scales fp32 [out, in/group], zeros fp32 [out, in/group]).

    `x_stats` is accepted for a uniform METHODS signature and ignored (RTN uses no activations).
    """
    bits = _check_bits(bits)
    w = _check_weight(w, group, name)
    maxq = (1 << bits) - 1

    def fn(wg):
        s, z = _range_params(wg, maxq, name)
        u = wg / s[..., None]
        q = _encode(u, np.ones_like(s), z, maxq, u)
        return q.astype(np.uint8), s, z

    return _run_chunks(w, bits, group, fn, threads)


def quantize_search(w, bits: int, group: int, x_stats=None, grid: int = 20, *, min_ratio: float = 0.3,
                    starts: int = 8, refine: int = 8, name: str = "", threads: int | None = None):
    """Per-group clip/scale search; same outputs as `quantize_rtn`, never worse than it per group.

    x_stats: optional float32 [in] = mean of x_j² over calibration activations; the searched error is
    then Σ_j x_stats[j]·(Δw_j)² instead of Σ_j (Δw_j)².
    grid: number of clip ratios in [min_ratio, 1] (1 = RTN only).
    starts: extra starting ratios in [min_ratio, 1] for the refinement (besides the best grid ratio).
    refine: least-squares/re-round iterations per start (0 = grid only, zero points stay integers;
    otherwise zero points are real numbers in code units).
    """
    bits = _check_bits(bits)
    w = _check_weight(w, group, name)
    a = _check_x_stats(x_stats, w.shape[1], name)
    grid, starts, refine = int(grid), int(starts), int(refine)
    if grid < 1:
        raise TinyzqError(f"grid must be >= 1, not {grid}")
    if starts < 0:
        raise TinyzqError(f"starts must be >= 0, not {starts}")
    if refine < 0:
        raise TinyzqError(f"refine must be >= 0, not {refine}")
    if not 0 < min_ratio <= 1:
        raise TinyzqError(f"min_ratio must be in (0, 1], not {min_ratio}")
    maxq = (1 << bits) - 1
    ratios = np.linspace(1.0, min_ratio, grid).astype(np.float32) if grid > 1 else np.ones(1, np.float32)
    start_ratios = np.linspace(1.0, min_ratio, starts).astype(np.float32) if starts > 1 else \
        np.ones(starts, np.float32)
    ag = None if a is None else a.reshape(-1, group)
    sqa = None if ag is None else np.sqrt(ag)
    return _run_chunks(w, bits, group,
                       lambda wg: _search_chunk(wg, maxq, ratios, start_ratios, refine, ag, sqa, name), threads)


def dequantize(q, scales, zeros, group: int) -> np.ndarray:
    """fp32 [out, in] = scales · (q − zeros), scales/zeros expanded along groups of `group` inputs."""
    q = np.asarray(q)
    scales = np.asarray(scales, dtype=np.float32)
    zeros = np.asarray(zeros, dtype=np.float32)
    if q.ndim != 2 or group <= 0 or q.shape[1] % group != 0:
        raise TinyzqError(f"dequantize: codes of shape {q.shape} do not split into groups of {group}")
    out_f, in_f = q.shape
    ng = in_f // group
    if scales.shape != (out_f, ng) or zeros.shape != (out_f, ng):
        raise TinyzqError(f"dequantize: scales {scales.shape} / zeros {zeros.shape} do not match codes {q.shape} "
                          f"at group {group} (expected ({out_f}, {ng}))")
    w = np.empty((out_f, ng, group), np.float32)
    np.subtract(q.reshape(out_f, ng, group), zeros[..., None], out=w, dtype=np.float32)
    w *= scales[..., None]
    return w.reshape(out_f, in_f)


class XStats:
    """Running mean of x_j² per input channel over calibration activations: the `x_stats` of
    `quantize_search` (the diagonal of XᵀX/n). Feed it every input of one linear layer:

        st = XStats(lin.in_features); st.update(x) ...; quantize_search(w, bits, group, x_stats=st.value)
    """

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.sum = np.zeros(self.in_features, np.float64)
        self.count = 0

    def update(self, x) -> None:
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, self.in_features)
        self.sum += np.einsum("ij,ij->j", x2, x2, dtype=np.float64)
        self.count += x2.shape[0]

    @property
    def value(self) -> np.ndarray:
        if self.count == 0:
            raise TinyzqError("no calibration activations were collected")
        return (self.sum / self.count).astype(np.float32)


METHODS: dict[str, Callable] = {"rtn": quantize_rtn, "search": quantize_search}


def quantize(w, bits: int, group: int, method: str = "rtn", x_stats=None, name: str = "", **options):
    """Dispatch to METHODS[method](w, bits, group, x_stats=..., name=..., **options) -> (q, scales, zeros)."""
    fn = METHODS.get(method)
    if fn is None:
        raise TinyzqError(f"unknown quantization method {method!r}; choose one of: {', '.join(METHODS)}")
    return fn(w, bits, group, x_stats=x_stats, name=name, **options)


__all__ = ["BITS", "METHODS", "ZERO_RANGE_SCALE", "XStats", "check_group", "dequantize", "quantize",
           "quantize_rtn", "quantize_search"]
