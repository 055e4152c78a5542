"""PackedLinear: a linear layer whose weight lives as packed 2/3/4/8-bit codes + fp32 scales/zeros.

Layout: docs/FORMAT.md. The scales and zeros are plain fp32 arrays owned by this object; training
perturbs and updates them in place, and the very same object serves evaluation and generation.

Fused projections (`PackedLinear.fuse`, used by tinyzq.model for q/k/v and gate/up): the parts'
codes, scales, zeros (and biases) are row-concatenated into one buffer each, and every part's
`codes`/`scales`/`zeros`/`bias` become VIEWS into those buffers (rows are contiguous, so a row slice
is a C-contiguous view). One kernel call then serves all parts, and in-place updates of a part's
scales/zeros (the ZO trainer, tinyzq/zo/) reach the fused kernel because they write the same memory.
Invariant: update these arrays in place (`a[...] = v`, `a += d`), never reassign them. A reassigned
array is detected (`FusedLinear.intact()` checks identities) and the model falls back to the
per-part calls, which is correct but slower.
"""
from __future__ import annotations

import os

import numpy as np

from .. import kernels

# Up to this many activation rows the int8-activation kernel (bandwidth-bound decode) is used;
# above it, the weight is dequantized to fp32 and multiplied with NumPy's BLAS (compute-bound).
# The rule is deterministic (never timed at run time: results must not depend on the machine's
# load). Measured on a 2-core EPYC (AVX2), SmolLM2 shapes, ms per call, int8 kernel / dequant+BLAS
# (1 BLAS thread): 4-bit 3072x576: n=8 0.23/1.28, n=32 0.81/2.76, n=64 1.88/6.22; 2-bit similar;
# 8-bit 8192x576: n=32 6.2/12.3, n=64 15.5/15.9. At n = 512 the int8 kernel (no GEMM blocking) is
# ~20% slower than BLAS over a perplexity run. Crossover ~64 rows: 32 keeps a margin for the
# 8-bit head. The two paths differ by the int8 activation rounding (SmolLM2 W4 perplexity +0.3%).
DECODE_MAX_ROWS = 32

# Above DECODE_MAX_ROWS: "auto" multiplies with int16 activations (kernels.gemm16) where the ISA
# module has a fast kernel for it (AVX-512 VNNI: ~1.3-1.9x an fp32 sgemm, and its rounding keeps the
# ZO signal, README), else dequantizes to fp32 for BLAS; "fp32" always takes BLAS, "int16" always
# gemm16 (the scalar reference where there is no fast one: tests). Env TINYZQ_PREFILL.
PREFILL = os.environ.get("TINYZQ_PREFILL", "auto").strip().lower() or "auto"
PREFILL_MODES = ("auto", "fp32", "int16")


def use_gemm16(bits: int, group: int) -> bool:
    """Whether a many-row product of a bits/group weight runs on kernels.gemm16 (see PREFILL)."""
    if PREFILL not in PREFILL_MODES:
        raise kernels.KernelError(f"TINYZQ_PREFILL must be one of {', '.join(PREFILL_MODES)}, got {PREFILL!r}")
    if PREFILL == "fp32" or not kernels.gemm16_fits(bits, group):
        return False
    return PREFILL == "int16" or kernels.get().gemm16_fast


class PackedLinear:
    def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, group: int,
                 in_features: int, bias: np.ndarray | None = None):
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)
        self.zeros = np.ascontiguousarray(zeros, dtype=np.float32)
        self.bits, self.group, self.in_features = int(bits), int(group), int(in_features)
        self.out_features = self.codes.shape[0]
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        expect = (self.out_features, self.in_features * self.bits // 8)
        if self.codes.shape != expect or self.scales.shape != (self.out_features, self.in_features // self.group) \
                or self.zeros.shape != self.scales.shape:
            raise ValueError(f"packed shapes do not fit {self.out_features}x{self.in_features} at {bits} bits, "
                             f"group {group}: codes {self.codes.shape}, scales {self.scales.shape}, zeros {self.zeros.shape}")

    @classmethod
    def from_codes(cls, q: np.ndarray, scales, zeros, bits: int, group: int, bias=None) -> "PackedLinear":
        """From unpacked integer codes q [out, in]."""
        return cls(kernels.pack(np.ascontiguousarray(q, dtype=np.uint8), bits), scales, zeros, bits, group,
                   q.shape[1], bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.in_features), dtype=np.float32)
        if x2.shape[0] <= DECODE_MAX_ROWS:
            bw = self.__dict__.get("_bound")
            if bw is None or not bw.valid(self.codes, self.scales, self.zeros):
                bw = self._bound = kernels.get().bind(self.codes, self.scales, self.zeros, self.bits, self.group)
            y = bw(x2)
        else:
            y = self.matmul_rows(x2, 0, self.out_features)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)

    def matmul_rows(self, x2: np.ndarray, start: int, stop: int) -> np.ndarray:
        """x2 float32 [n, in] @ (weight rows start:stop).T for many rows n (the prefill product)."""
        if use_gemm16(self.bits, self.group):
            return kernels.gemm16(x2, self.codes[start:stop], self.scales[start:stop], self.zeros[start:stop],
                                  self.bits, self.group)
        return x2 @ self.rows(start, stop).T

    def rows(self, start: int, stop: int) -> np.ndarray:
        """fp32 weight rows start:stop, dequantized now."""
        return kernels.dequantize(self.codes, self.scales, self.zeros, self.bits, self.group, start, stop)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return kernels.gather_rows(self.codes, self.scales, self.zeros, self.bits, self.group,
                                   np.ascontiguousarray(ids, dtype=np.int64))

    def dequantize(self) -> np.ndarray:
        return self.rows(0, self.out_features)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes + (0 if self.bias is None else self.bias.nbytes)

    @classmethod
    def fuse(cls, parts: list) -> "FusedLinear | None":
        """One linear computing all `parts` (same input) at once, or None if they cannot be fused
        (different bits/group/input width, or some with and some without bias). See the module doc
        for the view invariant; fusing parts that are already fused together reuses their buffers."""
        if len(parts) < 2 or not all(type(p) is cls for p in parts):
            return None
        p0 = parts[0]
        if any((p.bits, p.group, p.in_features) != (p0.bits, p0.group, p0.in_features) for p in parts) or \
                len({p.bias is None for p in parts}) != 1:
            return None
        prev = p0.__dict__.get("_fused")
        if prev is not None and prev.parts == list(parts) and prev.intact():
            return prev
        cat = lambda name: np.ascontiguousarray(np.concatenate([getattr(p, name) for p in parts], axis=0))  # noqa: E731
        whole = cls(cat("codes"), cat("scales"), cat("zeros"), p0.bits, p0.group, p0.in_features,
                    None if p0.bias is None else cat("bias"))
        a = 0
        for p in parts:
            b = a + p.out_features
            p.codes, p.scales, p.zeros = whole.codes[a:b], whole.scales[a:b], whole.zeros[a:b]
            if p.bias is not None:
                p.bias = whole.bias[a:b]
            p.__dict__.pop("_bound", None)
            a = b
        fused = FusedLinear(whole, list(parts))
        for p in parts:
            p._fused = fused
        return fused


class FusedLinear:
    """Row-concatenated PackedLinear parts: `fl(x)` returns the parts' outputs concatenated along the
    last axis (`split(y)` cuts them apart). Valid while every part still holds its views."""

    def __init__(self, whole: PackedLinear, parts: list):
        self.whole, self.parts = whole, parts
        self.sizes = [p.out_features for p in parts]
        self.out_features, self.in_features = whole.out_features, whole.in_features
        self._views = [(p.codes, p.scales, p.zeros, p.bias) for p in parts]

    def intact(self) -> bool:
        for p, (c, s, z, b) in zip(self.parts, self._views):
            if p.codes is not c or p.scales is not s or p.zeros is not z or p.bias is not b:
                return False
        return True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.whole(x)

    def split(self, y: np.ndarray) -> list:
        out, a = [], 0
        for n in self.sizes:
            out.append(y[..., a:a + n])
            a += n
        return out
