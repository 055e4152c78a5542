"""The C kernels: loads the best extension module for this CPU and wraps it for NumPy arrays.

One cffi extension module is built per ISA level (build_ext.py): ``_tzq_ref`` (portable, always
built), ``_tzq_avx2``, ``_tzq_avx512`` on x86-64; ``_tzq_neon``, ``_tzq_dotprod`` on aarch64.
The CPU is asked through ``_tzq_ref`` (cpuid + xgetbv / getauxval) *before* a SIMD module is
imported, so a module is never loaded on a CPU that cannot run it.

Environment:
  TINYZQ_ISA=ref|avx2|avx512|neon|dotprod   force a kernel path (ValueError if unavailable here)
  TINYZQ_THREADS=N                           threads per kernel call (default: usable cores)

Module-level functions use the default path (chosen on first use). ``Kernels(name)`` gives an
object with the same methods bound to one specific module, and ``use(name)`` temporarily
switches the default (tests compare every path against the reference). Arrays are passed to C
without copies (``ffi.from_buffer``); inputs are checked (dtype, C-contiguity, shapes) with
one-line ValueErrors. cffi releases the GIL during the C calls.

Layout and arithmetic: docs/FORMAT.md; NumPy reference: tinyzq/quant/packing.py.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading

import numpy as np

try:
    from .errors import TinyzqError as _Base
except ImportError:  # pragma: no cover
    _Base = Exception


class KernelError(ValueError, _Base):
    """A one-line error about kernel inputs or the TINYZQ_ISA / TINYZQ_THREADS settings."""


__all__ = ["isa", "available_isas", "built_isas", "cpu_features", "set_threads", "get_threads",
           "pack", "unpack", "dequantize", "gather_rows", "qmatmul", "gemm16", "gemm16_fits", "quantize_activations",
           "rng_bits", "rng_fill", "rng_axpy",
           "Kernels", "BoundWeight", "use", "get", "KernelError", "ALL_ISAS"]

ALL_ISAS = ("ref", "avx2", "avx512", "neon", "dotprod")
_PREFERENCE = ("avx512", "avx2", "dotprod", "neon", "ref")  # best first
# features each module is compiled to use (mirrors tzq_isa_requires() in csrc/cpu.c)
_REQUIRES = {
    "ref": (),
    "avx2": ("avx", "avx2", "fma", "f16c"),
    "avx512": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "neon": ("neon",),
    "dotprod": ("neon", "dotprod"),
}
_FEATURE_BITS = {
    "sse2": 1, "ssse3": 2, "sse4_1": 4, "avx": 8, "avx2": 16, "fma": 32, "f16c": 64,
    "avx512f": 128, "avx512bw": 256, "avx512vl": 512, "avx512vnni": 1024,
    "neon": 4096, "dotprod": 8192, "i8mm": 16384,
}
_X86_FEATURES = ("sse2", "ssse3", "sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                 "avx512vl", "avx512vnni")
_ARM_FEATURES = ("neon", "dotprod", "i8mm")
_BITS = (2, 3, 4, 8)
_ERRORS = {-1: "invalid argument", -2: "out of memory"}

_lock = threading.RLock()
_ref_mod = None
_modules: dict = {}
_instances: dict = {}
_default: "Kernels | None" = None
_threads: int | None = None


# ---------------------------------------------------------------- modules and dispatch

def _import(name: str):
    mod = _modules.get(name)
    if mod is None:
        mod = importlib.import_module("tinyzq._tzq_" + name)
        _modules[name] = mod
    return mod


def _ref():
    global _ref_mod
    if _ref_mod is None:
        with _lock:
            if _ref_mod is None:
                try:
                    _ref_mod = _import("ref")
                except ImportError as e:
                    raise ImportError(
                        "tinyzq's C kernels are not built (tinyzq._tzq_ref is missing): install with "
                        "`pip install .` or `pip install -e .`, or run `python build_ext.py` in the "
                        f"source tree ({e})") from e
    return _ref_mod


def cpu_features() -> dict:
    """Features of the running CPU that the kernels care about (OS register-state support included)."""
    lib = _ref().lib
    bits = lib.tzq_cpu_features()
    arch = _ref().ffi.string(lib.tzq_cpu_arch()).decode()
    names = _X86_FEATURES if arch == "x86_64" else _ARM_FEATURES if arch == "aarch64" else ()
    return {k: bool(bits & _FEATURE_BITS[k]) for k in names}


def _supported(name: str, feats: dict) -> bool:
    return all(feats.get(f, False) for f in _REQUIRES[name])


def _module_exists(name: str) -> bool:
    if name in _modules:
        return True
    return importlib.util.find_spec("tinyzq._tzq_" + name) is not None


def built_isas() -> list:
    """Modules built for this installation (whether or not this CPU can run them), best first."""
    _ref()
    return [n for n in _PREFERENCE if _module_exists(n)]


def available_isas() -> list:
    """ISA paths that are built AND supported by this CPU, best first (always ends with 'ref')."""
    feats = cpu_features()
    return [n for n in built_isas() if _supported(n, feats)]


def _resolve_default() -> str:
    forced = os.environ.get("TINYZQ_ISA", "").strip().lower()
    avail = available_isas()
    if not forced or forced == "auto":
        return avail[0]
    if forced not in avail:
        why = "unknown" if forced not in ALL_ISAS else "not available on this CPU/build"
        raise KernelError(f"TINYZQ_ISA={forced!r} is {why}; valid choices here: {', '.join(avail)}")
    return forced


def _default_threads() -> int:
    env = os.environ.get("TINYZQ_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise KernelError(f"TINYZQ_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def get(name: str | None = None) -> "Kernels":
    """The Kernels object for ISA `name` (default: the path chosen for this process)."""
    global _default
    if name is None:
        if _default is None:
            with _lock:
                if _default is None:
                    _default = get(_resolve_default())
        return _default
    with _lock:
        k = _instances.get(name)
        if k is None:
            k = Kernels(name)
            _instances[name] = k
        return k


def isa() -> str:
    """Name of the kernel path in use: 'ref', 'avx2', 'avx512', 'neon' or 'dotprod'."""
    return get().name


@contextlib.contextmanager
def use(name: str):
    """Temporarily make ISA `name` the default path (not thread-safe; for tests and benchmarks)."""
    global _default
    k = get(name)
    with _lock:
        old = _default
        _default = k
    try:
        yield k
    finally:
        with _lock:
            _default = old


def set_threads(n: int) -> None:
    """Threads used by each kernel call (all loaded modules); results do not depend on it."""
    global _threads
    n = int(n)
    if n < 1:
        raise KernelError(f"threads must be >= 1, got {n}")
    with _lock:
        _threads = n
        for mod in _modules.values():
            mod.lib.tzq_set_threads(n)


def get_threads() -> int:
    global _threads
    if _threads is None:
        set_threads(_default_threads())
    return _threads


# ---------------------------------------------------------------- argument checks

def _err(msg: str):
    raise KernelError(msg)


def _arr(a, name: str, dtype, ndim: int | None = 2) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        _err(f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(a).__name__}")
    if a.dtype != dtype:
        _err(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        _err(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        _err(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _layout(cols: int, bits, group=None) -> None:
    if bits not in _BITS:
        _err(f"bits must be one of 2, 3, 4, 8, got {bits!r}")
    if cols <= 0 or cols % 32:
        _err(f"the input width must be a positive multiple of 32, got {cols}")
    if group is not None:
        if not isinstance(group, (int, np.integer)) or group <= 0 or group % 32:
            _err(f"group must be a positive multiple of 32, got {group!r}")
        if cols % group:
            _err(f"group {group} does not divide the input width {cols}")


_U8, _F32 = np.dtype(np.uint8), np.dtype(np.float32)


def _ok(a, dt, nd: int) -> bool:
    """Fast path of _arr: ndarray of dtype dt, nd dims, C-contiguous."""
    if not isinstance(a, np.ndarray) or a.ndim != nd:
        return False
    d = a.dtype
    return (d is dt or d == dt) and a.flags.c_contiguous


def _packed(codes, scales, zeros, bits, group) -> tuple:
    """Check a packed weight; returns (rows, cols)."""
    if _ok(codes, _U8, 2) and _ok(scales, _F32, 2) and _ok(zeros, _F32, 2) and bits in _BITS \
            and type(group) is int and group > 0 and not group & 31:
        rows, nbytes = codes.shape
        cols = nbytes * 8 // bits
        if cols * bits == nbytes * 8 and cols > 0 and not cols & 31 and not cols % group:
            sh = scales.shape
            if sh == zeros.shape and sh[0] == rows and sh[1] * group == cols:
                return rows, cols
    # slow path: find the precise one-line error
    _arr(codes, "codes", np.uint8)
    if bits not in _BITS:
        _err(f"bits must be one of 2, 3, 4, 8, got {bits!r}")
    rows, nbytes = codes.shape
    if (nbytes * 8) % bits:
        _err(f"codes rows of {nbytes} bytes do not hold a whole number of {bits}-bit codes")
    cols = nbytes * 8 // bits
    _layout(cols, bits, group)
    _arr(scales, "scales", np.float32)
    _arr(zeros, "zeros", np.float32)
    want = (rows, cols // group)
    if scales.shape != want or zeros.shape != want:
        _err(f"scales and zeros must have shape {want} for codes {codes.shape} at {bits} bits, group {group}; "
             f"got {scales.shape} and {zeros.shape}")
    return rows, cols


def _out(out, shape: tuple, dtype, name="out") -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    _arr(out, name, dtype, len(shape))
    if out.shape != shape:
        _err(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        _err(f"{name} must be writeable")
    return out


# ---------------------------------------------------------------- the wrappers

class Kernels:
    """The kernels of one ISA module ('ref', 'avx2', ...): same methods as the module functions."""

    def __init__(self, name: str):
        if name not in ALL_ISAS:
            _err(f"unknown ISA {name!r}; valid choices here: {', '.join(available_isas())}")
        if not _supported(name, cpu_features()):
            _err(f"ISA {name!r} is not supported by this CPU; valid choices here: {', '.join(available_isas())}")
        try:
            mod = _import(name)
        except ImportError:
            _err(f"ISA {name!r} is not built in this installation; valid choices here: {', '.join(available_isas())}")
        self.name = name
        self.ffi, self.lib = mod.ffi, mod.lib
        got = self.ffi.string(self.lib.tzq_isa_name()).decode()
        if got != name:  # pragma: no cover - build mix-up
            _err(f"module tinyzq._tzq_{name} reports ISA {got!r}")
        self.lib.tzq_set_threads(get_threads())

    @classmethod
    def from_module(cls, module, name: str) -> "Kernels":
        """Wrap an already imported cffi module built from csrc/ (tests and benchmarks only:
        no CPU check is made)."""
        k = cls.__new__(cls)
        k.name, k.ffi, k.lib = name, module.ffi, module.lib
        k.lib.tzq_set_threads(get_threads())
        return k

    def __repr__(self):
        return f"Kernels({self.name!r})"

    # buffers -> C pointers, no copies (read-only arrays are fine for inputs)
    def _p(self, ctype: str, a: np.ndarray):
        return self.ffi.from_buffer(ctype, a)

    def _check(self, rc: int, what: str):
        if rc != 0:
            _err(f"{what}: {_ERRORS.get(rc, f'error {rc}')} (tinyzq._tzq_{self.name})")

    def set_threads(self, n: int) -> None:
        self.lib.tzq_set_threads(int(n))

    def get_threads(self) -> int:
        return int(self.lib.tzq_get_threads())

    # -- packing
    def pack(self, q: np.ndarray, bits: int) -> np.ndarray:
        """uint8 codes [rows, cols] (< 2**bits) -> packed uint8 [rows, cols*bits/8]."""
        _arr(q, "q", np.uint8)
        rows, cols = q.shape
        _layout(cols, bits)
        if q.size and bits < 8 and int(q.max()) >= (1 << bits):
            _err(f"codes must be < 2**{bits} = {1 << bits}, got {int(q.max())}")
        out = np.empty((rows, cols * bits // 8), dtype=np.uint8)
        if rows:
            self._check(self.lib.tzq_pack(self._p("uint8_t[]", q), self._p("uint8_t[]", out), rows, cols, bits), "pack")
        return out

    def unpack(self, codes: np.ndarray, bits: int, cols: int) -> np.ndarray:
        """packed uint8 [rows, cols*bits/8] -> uint8 codes [rows, cols]."""
        _arr(codes, "codes", np.uint8)
        _layout(int(cols), bits)
        cols = int(cols)
        rows = codes.shape[0]
        if codes.shape[1] != cols * bits // 8:
            _err(f"codes must have {cols * bits // 8} bytes per row for {cols} {bits}-bit codes, got shape {codes.shape}")
        out = np.empty((rows, cols), dtype=np.uint8)
        if rows:
            self._check(self.lib.tzq_unpack(self._p("uint8_t[]", codes), self._p("uint8_t[]", out), rows, cols, bits),
                        "unpack")
        return out

    # -- dequantization
    def dequantize(self, codes, scales, zeros, bits: int, group: int, row_start: int = 0, row_stop=None,
                   out=None) -> np.ndarray:
        """float32 rows row_start:row_stop of W = s * (q - z) (bit-identical in every ISA)."""
        rows, cols = _packed(codes, scales, zeros, bits, group)
        row_start = int(row_start)
        row_stop = rows if row_stop is None else int(row_stop)
        if not 0 <= row_start <= row_stop <= rows:
            _err(f"row range {row_start}:{row_stop} is outside 0:{rows}")
        out = _out(out, (row_stop - row_start, cols), np.float32)
        if row_stop > row_start:
            self._check(self.lib.tzq_dequantize(
                self._p("uint8_t[]", codes), self._p("float[]", scales), self._p("float[]", zeros),
                rows, cols, bits, group, row_start, row_stop, self._p("float[]", out)), "dequantize")
        return out

    def gather_rows(self, codes, scales, zeros, bits: int, group: int, ids, out=None) -> np.ndarray:
        """Dequantized rows ids (embedding lookup): float32 [*ids.shape, cols]."""
        rows, cols = _packed(codes, scales, zeros, bits, group)
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            _err(f"ids must be a numpy integer array, got {getattr(ids, 'dtype', type(ids).__name__)}")
        shape = ids.shape
        flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= rows):
            _err(f"ids must be in [0, {rows}), got values in [{int(flat.min())}, {int(flat.max())}]")
        res = _out(out, shape + (cols,), np.float32)
        if flat.size:
            self._check(self.lib.tzq_gather_rows(
                self._p("uint8_t[]", codes), self._p("float[]", scales), self._p("float[]", zeros),
                rows, cols, bits, group, self._p("int64_t[]", flat), flat.size, self._p("float[]", res)),
                "gather_rows")
        return res

    # -- the int8-activation product
    def quantize_activations(self, x: np.ndarray) -> tuple:
        """x float32 [n, cols] -> (xi int8 [n, cols], d float32 [n, cols/32]) as in FORMAT.md."""
        _arr(x, "x", np.float32)
        n, cols = x.shape
        _layout(cols, 8)
        xi = np.empty((n, cols), dtype=np.int8)
        d = np.empty((n, cols // 32), dtype=np.float32)
        if n:
            self._check(self.lib.tzq_quantize_activations(self._p("float[]", x), n, cols, self._p("int8_t[]", xi),
                                                          self._p("float[]", d)), "quantize_activations")
        return xi, d

    def qmatmul(self, x: np.ndarray, codes, scales, zeros, bits: int, group: int, out=None) -> np.ndarray:
        """y = x @ W.T with x quantized to int8 blocks once per call: x float32 [n, cols] (or [cols])
        -> float32 [n, rows] (or [rows]). For few rows of x (decode); use dequantize + BLAS for many."""
        rows, cols = _packed(codes, scales, zeros, bits, group)
        if not isinstance(x, np.ndarray) or x.ndim not in (1, 2):
            _err(f"x must be a 1-D or 2-D numpy array of float32, got {getattr(x, 'shape', type(x).__name__)}")
        nd = x.ndim
        if not _ok(x, _F32, nd):
            _arr(x, "x", np.float32, None)
        if x.shape[-1] != cols:
            _err(f"x must have {cols} columns to match codes {codes.shape} at {bits} bits, got shape {x.shape}")
        n = 1 if nd == 1 else x.shape[0]
        if out is None:
            y = np.empty((rows,) if nd == 1 else (n, rows), dtype=np.float32)
        else:
            y = _out(out, (rows,) if nd == 1 else (n, rows), np.float32)
            if np.may_share_memory(out, x):
                _err("out must not overlap x")
        if n and rows:
            fb = self.ffi.from_buffer
            rc = self.lib.tzq_qmatmul(fb("float[]", x), n, fb("uint8_t[]", codes), fb("float[]", scales),
                                      fb("float[]", zeros), rows, cols, bits, group, fb("float[]", y))
            if rc:
                self._check(rc, "qmatmul")
        return y

    @property
    def gemm16_fast(self) -> bool:
        """True if this module's gemm16 is a SIMD kernel that beats fp32 BLAS (AVX-512 VNNI)."""
        return bool(self.lib.tzq_gemm16_fast())

    def gemm16(self, x: np.ndarray, codes, scales, zeros, bits: int, group: int, out=None) -> np.ndarray:
        """y = x @ W.T with x quantized to int16 per row and group (FORMAT.md, "int16-activation
        product"): x float32 [n, cols] -> float32 [n, rows]. For many rows (prefill, training)."""
        rows, cols = _packed(codes, scales, zeros, bits, group)
        if not _ok(x, _F32, 2):
            _arr(x, "x", np.float32)
        if x.shape[1] != cols:
            _err(f"x must have {cols} columns to match codes {codes.shape} at {bits} bits, got shape {x.shape}")
        if not gemm16_fits(bits, group):
            _err(f"gemm16: group {group} at {bits} bits could overflow its int32 sums")
        n = x.shape[0]
        y = np.empty((n, rows), dtype=np.float32) if out is None else _out(out, (n, rows), np.float32)
        if out is not None and np.may_share_memory(out, x):
            _err("out must not overlap x")
        if n and rows:
            fb = self.ffi.from_buffer
            self._check(self.lib.tzq_gemm16(fb("float[]", x), n, fb("uint8_t[]", codes), fb("float[]", scales),
                                            fb("float[]", zeros), rows, cols, bits, group, fb("float[]", y)), "gemm16")
        return y

    def bind(self, codes, scales, zeros, bits: int, group: int) -> "BoundWeight":
        """A packed weight checked once, with its C pointers cached, for many fast qmatmul calls
        (decode). The arrays are held, not copied: in-place updates of scales/zeros are seen."""
        return BoundWeight(self, codes, scales, zeros, bits, group)

    def stream_read(self, buf: np.ndarray) -> int:
        """Read every byte of a contiguous array once on the thread pool (memory bandwidth probe);
        returns the wrapping sum of its 64-bit words."""
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            _err("buf must be a C-contiguous numpy array")
        return int(self.lib.tzq_stream_read(self._p("uint8_t[]", buf.reshape(-1).view(np.uint8)), buf.nbytes))

    def attn_decode(self, q, k, v, nh: int, nkv: int, cos, sin, kcache, vcache, pos: int, scale: float,
                    out=None) -> np.ndarray:
        """One decode step of GQA attention (csrc/attn.c): q [B, >= nh*hd], k/v [B, >= nkv*hd] float32
        with unit stride along the last axis (views into a fused qkv output are fine); cos/sin [hd/2];
        kcache/vcache [B, nkv, max_len, hd] (RoPE'd k and v are written at `pos`). -> out [B, nh*hd]."""
        kcache = _arr(kcache, "kcache", np.float32, 4)
        vcache = _arr(vcache, "vcache", np.float32, 4)
        B, nkv_c, max_len, hd = kcache.shape
        if vcache.shape != kcache.shape or nkv_c != nkv or nh % nkv or not 0 <= pos < max_len:
            _err(f"attn_decode: caches {kcache.shape}/{vcache.shape} do not fit nkv={nkv}, nh={nh}, pos={pos}")
        cos = _arr(cos, "cos", np.float32, 1)
        sin = _arr(sin, "sin", np.float32, 1)
        if cos.shape != (hd // 2,) or sin.shape != (hd // 2,):
            _err(f"cos/sin must have shape ({hd // 2},)")
        ptrs, strides = [], []
        for name, a, w in (("q", q, nh * hd), ("k", k, nkv * hd), ("v", v, nkv * hd)):
            if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.ndim != 2 or a.shape[0] != B \
                    or a.shape[1] < w or a.strides[1] != 4 or a.strides[0] % 4:
                _err(f"attn_decode: {name} must be float32 [{B}, >= {w}] with unit stride along its rows")
            ptrs.append(self.ffi.cast("float *", a.__array_interface__["data"][0]))
            strides.append(a.strides[0] // 4)
        out = _out(out, (B, nh * hd), np.float32)
        rc = self.lib.tzq_attn_decode(ptrs[0], ptrs[1], ptrs[2], B, nh, nkv, hd, strides[0], strides[1], strides[2],
                                      self._p("float[]", cos), self._p("float[]", sin), self._p("float[]", kcache),
                                      self._p("float[]", vcache), max_len, int(pos), float(scale),
                                      self._p("float[]", out))
        if rc:
            self._check(rc, "attn_decode")
        return out


    # -- element-wise parts of a many-token forward (csrc/ops.c), row-parallel on the pool
    def _rows(self, a, name: str, writeable: bool = False):
        """(pointer, rows, width, row stride in floats) of a float32 array whose last axis has unit
        stride and whose leading axes collapse into one row stride (e.g. a column slice of a
        contiguous [B, T, k] array)."""
        if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.ndim < 1:
            _err(f"{name} must be a float32 numpy array")
        if writeable and not a.flags.writeable:
            _err(f"{name} must be writeable")
        w = a.shape[-1]
        n = a.size // w if w else 0
        st = a.strides
        if a.ndim == 1:
            rs = w
        else:
            rs = st[-2] // 4
            if st[-1] != 4 or st[-2] % 4 or any(st[i] != st[i + 1] * a.shape[i + 1] for i in range(a.ndim - 2)):
                _err(f"{name} must have unit stride along its last axis and evenly strided rows")
        if rs < w and n > 1:
            _err(f"{name}: rows overlap")
        return self._addr(a), n, w, rs

    def _addr(self, a: np.ndarray):
        """float * to a float32 array's first element, also for strided views (which from_buffer refuses)."""
        return self.ffi.cast("float *", a.__array_interface__["data"][0])

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float, out=None) -> np.ndarray:
        """x / sqrt(mean(x**2, -1) + eps) * w over the last axis (float32; out may be x)."""
        px, n, d, xs = self._rows(x, "x")
        w = _arr(w, "w", np.float32, 1)
        if w.shape != (d,):
            _err(f"w must have shape ({d},), got {w.shape}")
        out = np.empty(x.shape, np.float32) if out is None else out
        po, no, do, os_ = self._rows(out, "out", True)
        if (no, do) != (n, d):
            _err(f"out must have shape {x.shape}, got {out.shape}")
        self._check(self.lib.tzq_rms_norm(px, n, d, xs, self._p("float[]", w), float(eps), po, os_), "rms_norm")
        return out

    def silu_mul(self, g: np.ndarray, u: np.ndarray, out=None) -> np.ndarray:
        """silu(g) * u element-wise (float32, same shapes; out may be g or u)."""
        if getattr(g, "shape", None) != getattr(u, "shape", None):
            _err("g and u must have the same shape")
        pg, n, f, gs = self._rows(g, "g")
        pu, _, _, us = self._rows(u, "u")
        out = np.empty(g.shape, np.float32) if out is None else out
        po, no, fo, os_ = self._rows(out, "out", True)
        if (no, fo) != (n, f):
            _err(f"out must have shape {g.shape}, got {out.shape}")
        self._check(self.lib.tzq_silu_mul(pg, gs, pu, us, n, f, po, os_), "silu_mul")
        return out

    def rope_(self, x: np.ndarray, heads: int, hd: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate-half RoPE in place on the first `heads` heads of x [..., T, >= heads*hd] (the row of
        token t uses cos/sin [T, hd/2] row t)."""
        px, n, w, xs = self._rows(x, "x", True)
        cos, sin = _arr(cos, "cos", np.float32), _arr(sin, "sin", np.float32)
        T = cos.shape[0]
        if x.ndim < 2 or x.shape[-2] != T or cos.shape != (T, hd // 2) or sin.shape != cos.shape or heads * hd > w:
            _err(f"rope: x {x.shape} does not fit {heads} heads of {hd} and cos/sin {cos.shape}")
        self._check(self.lib.tzq_rope(px, n, T, xs, heads, hd, self._p("float[]", cos), self._p("float[]", sin)),
                    "rope")
        return x

    def attn_prefill(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int = 0, out=None) -> np.ndarray:
        """Causal GQA attention (csrc/attn_prefill.c): q [B, nkv, g, T, hd] float32 C-contiguous, scaled,
        at positions pos0 .. pos0+T-1; k, v [B, nkv, S, hd] with S = pos0 + T (contiguous, or views of
        the first S rows of a [B, nkv, max_len, hd] cache). Returns out [B, nkv, g, T, hd]."""
        q = _arr(q, "q", np.float32, 5)
        B, nkv, g, T, hd = q.shape
        S = pos0 + T
        for name, a in (("k", k), ("v", v)):
            if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.shape != (B, nkv, S, hd):
                _err(f"attn_prefill: {name} must be float32 [{B}, {nkv}, {S}, {hd}], got "
                     f"{getattr(a, 'shape', type(a).__name__)}")
            st = a.strides
            if st[3] != 4 or st[2] != 4 * hd or st[1] % 4 or st[0] != st[1] * nkv or st[1] != k.strides[1]:
                _err(f"attn_prefill: {name} must have contiguous rows of {hd} and (batch, head) groups evenly "
                     "strided like k's (a C-contiguous array or a prefix view of a KV cache)")
        kvs = k.strides[1] // 4  # floats between (batch, KV head) groups
        if kvs < S * hd:
            _err("attn_prefill: k/v groups overlap")
        out = np.empty(q.shape, np.float32) if out is None else _arr(out, "out", np.float32, 5)
        if out.shape != q.shape:
            _err(f"attn_prefill: out must have shape {q.shape}")
        p = self._addr
        self._check(self.lib.tzq_attn_prefill(p(q), p(k), p(v), B, nkv, g, T, hd, int(pos0), kvs, p(out)),
                    "attn_prefill")
        return out

    def lse_update(self, z: np.ndarray, run_max: np.ndarray, run_sum: np.ndarray) -> None:
        """Online log-sum-exp over the rows of a logits tile z [n, w] (float32 C-contiguous) into
        float64 run_max/run_sum [n], in place."""
        z = _arr(z, "z", np.float32)
        n = z.shape[0]
        for name, a in (("run_max", run_max), ("run_sum", run_sum)):
            _arr(a, name, np.float64, 1)
            if a.shape != (n,):
                _err(f"{name} must have shape ({n},)")
        self._check(self.lib.tzq_lse_update(self._p("float[]", z), n, z.shape[1], self._p("double[]", run_max),
                                            self._p("double[]", run_sum)), "lse_update")

    # -- counter-based random directions (csrc/rng.c) for zeroth-order training
    def rng_bits(self, seed: int, tensor_id: int, index: int) -> int:
        """The raw 64-bit draw r[index] of the stream (seed, tensor_id) (specified in csrc/rng.c)."""
        return int(self.lib.tzq_rng_bits(_u64(seed), _u64(tensor_id), int(index)))

    def rng_fill(self, n: int, seed: int, tensor_id: int, dist: str = "gaussian", out=None) -> np.ndarray:
        """z[i] = f(seed, tensor_id, i), i < n, float32 (dist 'gaussian' or 'rademacher')."""
        n = int(n)
        out = _out(out, (n,), np.float32)
        if n:
            self._check(self.lib.tzq_rng_fill(self._p("float[]", out), n, _u64(seed), _u64(tensor_id), _dist(dist)),
                        "rng_fill")
        return out

    def rng_axpy(self, src: np.ndarray, dst: np.ndarray, seed: int, tensor_id: int, a: float,
                 dist: str = "gaussian", mult: bool = False) -> np.ndarray:
        """dst = src + (a*z) (or src + (a*z)*src with mult), z = f(seed, tensor_id, flat index), fp32.
        dst may be src (in place); both float32 C-contiguous of the same size."""
        _arr(src, "src", np.float32, None)
        _arr(dst, "dst", np.float32, None)
        if src.size != dst.size:
            _err(f"src and dst must have the same size, got {src.size} and {dst.size}")
        if not dst.flags.writeable:
            _err("dst must be writeable")
        if dst.size:
            self._check(self.lib.tzq_rng_axpy(self._p("float[]", src), self._p("float[]", dst), src.size, _u64(seed),
                                              _u64(tensor_id), _dist(dist), float(a), 1 if mult else 0), "rng_axpy")
        return dst


_DISTS = {"gaussian": 0, "rademacher": 1}


def _dist(dist: str) -> int:
    if dist not in _DISTS:
        _err(f"dist must be 'gaussian' or 'rademacher', got {dist!r}")
    return _DISTS[dist]


def _u64(v) -> int:
    v = int(v)
    if not 0 <= v < 1 << 64:
        _err(f"seeds and tensor ids must be in [0, 2^64), got {v}")
    return v


class BoundWeight:
    """A packed weight bound to one kernel module: shapes checked once, C pointers cached.

    `bw(x2, out)` is Kernels.qmatmul for a C-contiguous float32 x2 [n, cols] without the per-call
    checks. The cached pointers are only used while `codes`, `scales` and `zeros` are still the very
    arrays given here (`valid()`); callers that may reassign them re-bind."""

    __slots__ = ("k", "codes", "scales", "zeros", "bits", "group", "rows", "cols", "_pc", "_ps", "_pz")

    def __init__(self, k: Kernels, codes, scales, zeros, bits: int, group: int):
        self.rows, self.cols = _packed(codes, scales, zeros, bits, group)
        self.k, self.codes, self.scales, self.zeros, self.bits, self.group = k, codes, scales, zeros, bits, group
        fb = k.ffi.from_buffer
        self._pc, self._ps, self._pz = fb("uint8_t[]", codes), fb("float[]", scales), fb("float[]", zeros)

    def valid(self, codes, scales, zeros) -> bool:
        return codes is self.codes and scales is self.scales and zeros is self.zeros and self.k is get()

    def __call__(self, x2: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if not _ok(x2, _F32, 2) or x2.shape[1] != self.cols:
            _err(f"x must be C-contiguous float32 [n, {self.cols}], got {getattr(x2, 'shape', None)}")
        n = x2.shape[0]
        y = np.empty((n, self.rows), dtype=np.float32) if out is None else out
        if n and self.rows:
            fb = self.k.ffi.from_buffer
            rc = self.k.lib.tzq_qmatmul(fb("float[]", x2), n, self._pc, self._ps, self._pz, self.rows, self.cols,
                                        self.bits, self.group, fb("float[]", y))
            if rc:
                self.k._check(rc, "qmatmul")
        return y


# ---------------------------------------------------------------- module-level API (default path)

def gemm16_fits(bits: int, group: int) -> bool:
    """Whether gemm16's exact int32 group sums cannot overflow: group * 2^(bits-1) * 32767 < 2^31."""
    return int(group) * (1 << (int(bits) - 1)) * 32767 < 2**31


def gemm16(x, codes, scales, zeros, bits: int, group: int, out=None):
    return get().gemm16(x, codes, scales, zeros, bits, group, out)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    return get().pack(q, bits)


def unpack(codes: np.ndarray, bits: int, cols: int) -> np.ndarray:
    return get().unpack(codes, bits, cols)


def dequantize(codes, scales, zeros, bits: int, group: int, row_start: int = 0, row_stop=None, out=None):
    return get().dequantize(codes, scales, zeros, bits, group, row_start, row_stop, out)


def gather_rows(codes, scales, zeros, bits: int, group: int, ids, out=None):
    return get().gather_rows(codes, scales, zeros, bits, group, ids, out)


def qmatmul(x, codes, scales, zeros, bits: int, group: int, out=None):
    return get().qmatmul(x, codes, scales, zeros, bits, group, out)


def quantize_activations(x: np.ndarray):
    return get().quantize_activations(x)


def rng_bits(seed: int, tensor_id: int, index: int) -> int:
    return get().rng_bits(seed, tensor_id, index)


def rng_fill(n: int, seed: int, tensor_id: int, dist: str = "gaussian", out=None) -> np.ndarray:
    return get().rng_fill(n, seed, tensor_id, dist, out)


def rng_axpy(src, dst, seed: int, tensor_id: int, a: float, dist: str = "gaussian", mult: bool = False):
    return get().rng_axpy(src, dst, seed, tensor_id, a, dist, mult)


for _f in (pack, unpack, dequantize, gather_rows, qmatmul, gemm16, quantize_activations, rng_bits, rng_fill, rng_axpy):
    _f.__doc__ = getattr(Kernels, _f.__name__).__doc__
del _f
