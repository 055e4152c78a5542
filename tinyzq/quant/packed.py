"""PackedLinear: a linear layer whose weight lives as packed 2/3/4/8-bit codes + fp32 scales/zeros.

Layout: docs/FORMAT.md. The scales and zeros are plain fp32 arrays owned by this object; training
perturbs and updates them in place, and the very same object serves evaluation and generation.
"""
from __future__ import annotations

import numpy as np

from .. import kernels

# Up to this many activation rows the int8-activation kernel (bandwidth-bound decode) is used;
# above it, weight tiles are dequantized to fp32 and multiplied with NumPy's BLAS (compute-bound).
DECODE_MAX_ROWS = 8


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
            y = kernels.qmatmul(x2, self.codes, self.scales, self.zeros, self.bits, self.group)
        else:
            y = x2 @ self.rows(0, self.out_features).T
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)

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
