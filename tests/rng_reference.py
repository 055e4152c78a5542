"""NumPy reference of csrc/rng.c (the counter-based random directions of ZO training), written from
the specification in that file's header: tests/test_zo.py checks every ISA build against it, and
tests/arm/gen_cases.py writes golden directions from it for the aarch64 builds under qemu."""
import numpy as np

M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def _mix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def ref_bits(seed: int, tid: int, n: int) -> np.ndarray:
    key = int(_mix(np.array([(int(_mix(np.array([(seed + G) & M64], np.uint64))[0]) + (tid + 1) * G) & M64],
                            np.uint64))[0])
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(np.uint64(key) + i * np.uint64(G))


def ref_z(seed: int, tid: int, n: int, dist: str) -> np.ndarray:
    r = ref_bits(seed, tid, n)
    if dist == "rademacher":
        return np.where(r >> np.uint64(63), np.float32(-1), np.float32(1)).astype(np.float32)
    f32 = np.float32
    u1 = ((r >> np.uint64(41)).astype(np.uint32) * np.uint32(2) + np.uint32(1)).astype(f32) * f32(2.0 ** -24)
    u2 = ((((r >> np.uint64(18)) & np.uint64(0x7FFFFF)).astype(np.uint32) * np.uint32(2) + np.uint32(1))
          .astype(f32) * f32(2.0 ** -24))
    return np.sqrt(f32(-2.0) * _ref_log(u1)) * _ref_cos2pi(u2)


def _ref_log(u: np.ndarray) -> np.ndarray:
    """csrc/rng.c's fp32 log of u in (0, 1): u = m 2^e, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s)."""
    f32 = np.float32
    b = u.view(np.uint32)
    frac = b & np.uint32(0x7FFFFF)
    big = frac >= np.uint32(0x3504F3)
    m = (frac | np.where(big, np.uint32(0x3F000000), np.uint32(0x3F800000))).view(f32)
    e = ((b >> np.uint32(23)).astype(np.int32) - np.where(big, 126, 127).astype(np.int32)).astype(f32)
    s = (m - f32(1)) / (m + f32(1))
    s2 = s * s
    p = f32(1) + s2 * (f32(0.33333334) + s2 * (f32(0.2) + s2 * (f32(0.14285715) + s2 * f32(0.11111111))))
    return e * f32(0.6931472) + (f32(2) * s) * p


def _ref_cos2pi(u: np.ndarray) -> np.ndarray:
    f32 = np.float32
    w = np.abs(u - f32(0.5))
    far = w > f32(0.25)
    y = np.where(far, f32(0.5) - w, w)
    x = f32(6.2831855) * y
    x2 = x * x
    c = f32(1) + x2 * (f32(-0.5) + x2 * (f32(0.041666668) + x2 * (f32(-0.0013888889) + x2 * (
        f32(2.4801588e-05) + x2 * (f32(-2.7557319e-07) + x2 * f32(2.0876757e-09))))))
    return np.where(far, c, -c)
