"""GGUF reader: metadata -> `ModelConfig` + `Tokenizer`, tensors -> float32 in HF naming/layout.

The header (metadata and tensor table) is parsed here directly from a memory map: `gguf.GGUFReader`
builds a NumPy view for every string of the 49k-token vocabulary and takes ~4 s on SmolLM2's header
(~1 s even with its memmap overhead removed), where this parser takes ~0.1 s. Tensor data stays in
the memory map and is dequantized one tensor at a time on `get`: F32/F16/BF16/Q8_0/Q4_0/Q4_1 with the
vectorized NumPy code below, every other type (K-quants, IQ*) with `gguf.quants.dequantize`.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for arch llama (and mistral) so that
the two RoPE halves of each head are interleaved; `unpermute_qk` undoes it. qwen2 is not permuted.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from typing import Any, Optional

import numpy as np

from ..config import SUPPORTED_ARCHS, ModelConfig
from ..errors import TinyzqError
from . import TensorSource, _check_shapes, file_size

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL, _T_STRING, _T_ARRAY, \
    _T_UINT64, _T_INT64, _T_FLOAT64 = range(13)
_SCALAR = {  # type -> (struct format, numpy dtype)
    _T_UINT8: ("<B", "<u1"), _T_INT8: ("<b", "<i1"), _T_UINT16: ("<H", "<u2"), _T_INT16: ("<h", "<i2"),
    _T_UINT32: ("<I", "<u4"), _T_INT32: ("<i", "<i4"), _T_FLOAT32: ("<f", "<f4"), _T_BOOL: ("<?", "<u1"),
    _T_UINT64: ("<Q", "<u8"), _T_INT64: ("<q", "<i8"), _T_FLOAT64: ("<d", "<f8"),
}
_SCALAR_STRUCT = {t: struct.Struct(f) for t, (f, _) in _SCALAR.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types handled natively (values of gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


class _Corrupt(Exception):
    pass


class GGUFFile:
    """Minimal, fast GGUF (v2/v3, little-endian) parser over a read-only memory map.

    `metadata`: key -> python value (numeric arrays as lists); `tensors`: name -> (ggml type,
    numpy shape (reversed ggml ne), absolute byte offset, byte size).
    """

    def __init__(self, path: str):
        self.path = path
        size = file_size(path)
        if size < 4:
            raise TinyzqError(f"{path}: not a GGUF file (only {size} bytes)")
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise TinyzqError(f"{path}: cannot memory-map: {e}") from None
        self.size = size
        mm = self._mm
        magic = bytes(mm[:4])
        if magic != GGUF_MAGIC:
            self.close()
            raise TinyzqError(f"{path}: not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
        try:
            self._parse()
        except _Corrupt as e:
            self.close()
            raise TinyzqError(f"{path}: truncated or corrupt GGUF ({e})") from None
        except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            self.close()
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TinyzqError(f"{path}: truncated or corrupt GGUF ({msg})") from None

    # ------------------------------------------------------------------ parsing
    def _need(self, off: int, n: int, what: str):
        if n < 0 or off + n > self.size:
            raise _Corrupt(f"{what} at byte {off} needs {n} bytes, file has {self.size}")

    def _str(self, off: int, what: str):
        self._need(off, 8, what)
        (n,) = _U64.unpack_from(self._mm, off)
        off += 8
        self._need(off, n, what)
        return self._mm[off:off + n].decode("utf-8", errors="replace"), off + n

    def _value(self, off: int, vtype: int, key: str):
        if vtype == _T_STRING:
            return self._str(off, f"value of {key}")
        st = _SCALAR_STRUCT.get(vtype)
        if st is not None:
            self._need(off, st.size, f"value of {key}")
            v = st.unpack_from(self._mm, off)[0]
            return (bool(v) if vtype == _T_BOOL else v), off + st.size
        if vtype == _T_ARRAY:
            self._need(off, 12, f"array header of {key}")
            (itype,) = _U32.unpack_from(self._mm, off)
            (count,) = _U64.unpack_from(self._mm, off + 4)
            off += 12
            if itype in _SCALAR:
                dt = np.dtype(_SCALAR[itype][1])
                self._need(off, count * dt.itemsize, f"array {key}")
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=off)
                vals = arr.astype(bool).tolist() if itype == _T_BOOL else arr.tolist()
                return vals, off + count * dt.itemsize
            if itype == _T_STRING:
                if count > self.size:
                    raise _Corrupt(f"array {key} claims {count} strings")
                out = []
                app = out.append
                mm, size, unpack = self._mm, self.size, _U64.unpack_from
                for _ in range(count):
                    if off + 8 > size:
                        raise _Corrupt(f"array {key} runs past the end of the file")
                    (n,) = unpack(mm, off)
                    off += 8
                    if off + n > size:
                        raise _Corrupt(f"array {key} runs past the end of the file")
                    app(mm[off:off + n].decode("utf-8", errors="replace"))
                    off += n
                return out, off
            if itype == _T_ARRAY:
                if count > self.size:
                    raise _Corrupt(f"array {key} claims {count} items")
                out = []
                for _ in range(count):  # nested arrays: rare, parse generically
                    v, off = self._value(off, _T_ARRAY, key)
                    out.append(v)
                return out, off
            raise _Corrupt(f"array {key} has unknown item type {itype}")
        raise _Corrupt(f"key {key} has unknown value type {vtype}")

    def _parse(self):
        mm = self._mm
        self._need(0, 24, "header")
        (version,) = _U32.unpack_from(mm, 4)
        if version & 0xFFFF == 0 and version != 0:
            raise TinyzqError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise TinyzqError(f"{self.path}: unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        if n_tensors > self.size or n_kv > self.size:
            raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata keys")
        off = 24
        meta: dict = {}
        for _ in range(n_kv):
            key, off = self._str(off, "metadata key")
            self._need(off, 4, f"type of {key}")
            (vtype,) = _U32.unpack_from(mm, off)
            off += 4
            meta[key], off = self._value(off, vtype, key)
        self.metadata = meta
        infos = []
        for _ in range(n_tensors):
            name, off = self._str(off, "tensor name")
            self._need(off, 4, f"tensor info of {name}")
            (nd,) = _U32.unpack_from(mm, off)
            off += 4
            if nd > 8:
                raise _Corrupt(f"tensor {name} has {nd} dimensions")
            self._need(off, 8 * nd + 12, f"tensor info of {name}")
            ne = struct.unpack_from(f"<{nd}Q", mm, off)
            off += 8 * nd
            (ttype,) = _U32.unpack_from(mm, off)
            (toff,) = _U64.unpack_from(mm, off + 4)
            off += 12
            infos.append((name, ne, ttype, toff))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"general.alignment {align!r} is not a power of two")
        data_start = (off + align - 1) // align * align
        self.data_offset = data_start
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        tensors = {}
        for name, ne, ttype, toff in infos:
            try:
                qt = GGMLQuantizationType(ttype)
                bs, ts = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise TinyzqError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}") from None
            n = int(np.prod(ne, dtype=np.int64)) if ne else 1
            if ne and ne[0] % bs:
                raise _Corrupt(f"tensor {name} row length {ne[0]} is not a multiple of {qt.name} block {bs}")
            nbytes = n // bs * ts
            start = data_start + toff
            if start + nbytes > self.size:
                raise _Corrupt(f"tensor {name} data ends at byte {start + nbytes}, file has {self.size} bytes")
            if name in tensors:
                raise _Corrupt(f"duplicate tensor {name}")
            tensors[name] = (ttype, tuple(int(x) for x in reversed(ne)), start, nbytes)
        self.tensors = tensors

    # ------------------------------------------------------------------ data
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, 1-D view into the memory map)."""
        ttype, shape, start, nbytes = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=start)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, numpy shape (reversed ggml ne)."""
        ttype, shape, start, nbytes = self.tensors[name]
        return dequantize(self.raw(name), ttype, shape)

    def close(self):
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # arrays still reference it; the GC closes it later
                pass


# ---------------------------------------------------------------------------- dequantization
def _f16_col(b: np.ndarray, lo: int) -> np.ndarray:
    """Column of fp16 values at byte offset lo of each block row, as float32 [nblocks, 1]."""
    return np.ascontiguousarray(b[:, lo:lo + 2]).view(np.float16).astype(np.float32)


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 34)
    d = _f16_col(b, 0)
    return np.multiply(b[:, 2:].view(np.int8), d, dtype=np.float32).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    out = np.empty((qs.shape[0], 32), np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    return out


def dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 18)
    d = _f16_col(b, 0)
    out = _nibbles(b[:, 2:])
    out -= 8.0
    out *= d
    return out.reshape(-1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 20)
    d = _f16_col(b, 0)
    m = _f16_col(b, 2)
    out = _nibbles(b[:, 4:])
    out *= d
    out += m
    return out.reshape(-1)


def dequant_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def dequant_bf16(raw: np.ndarray) -> np.ndarray:
    return np.left_shift(raw.view(np.uint16).astype(np.uint32), 16).view(np.float32)


_NATIVE = {F32: lambda r: r.view(np.float32).copy(), F16: dequant_f16, BF16: dequant_bf16,
           Q8_0: dequant_q8_0, Q4_0: dequant_q4_0, Q4_1: dequant_q4_1}
# rows per chunk, to bound the temporaries of the block-wise dequantizers
_CHUNK_BLOCKS = 1 << 18


def dequantize(raw: np.ndarray, ttype: int, shape: tuple) -> np.ndarray:
    """Dequantize a ggml tensor's bytes (uint8) of ggml type `ttype` to float32 of numpy `shape`."""
    raw = np.ascontiguousarray(raw).reshape(-1)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    fn = _NATIVE.get(int(ttype))
    if fn is not None:
        if ttype in (Q8_0, Q4_0, Q4_1):
            bsz = {Q8_0: 34, Q4_0: 18, Q4_1: 20}[ttype]
            nb = raw.size // bsz
            if nb > _CHUNK_BLOCKS:
                out = np.empty(nb * 32, np.float32)
                for s in range(0, nb, _CHUNK_BLOCKS):
                    e = min(nb, s + _CHUNK_BLOCKS)
                    out[s * 32:e * 32] = fn(raw[s * bsz:e * bsz])
            else:
                out = fn(raw)
        else:
            out = fn(raw)
    else:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize as gq_dequantize
        qt = GGMLQuantizationType(int(ttype))
        try:
            out = np.asarray(gq_dequantize(raw, qt), dtype=np.float32).reshape(-1)
        except NotImplementedError:
            raise TinyzqError(f"dequantization of ggml type {qt.name} is not supported") from None
    if out.size != n:
        raise TinyzqError(f"dequantized {out.size} values, expected {n} for shape {tuple(shape)}")
    return out.reshape(shape)


# ---------------------------------------------------------------------------- q/k permutation
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF order -> GGUF order) of q/k rows (weight or bias)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk` (GGUF order -> HF order)."""
    return np.ascontiguousarray(
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------- names
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> Optional[str]:
    """HF name of a GGUF tensor name, or None if it has no HF counterpart (e.g. rope_freqs.weight)."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{int(m.group(1))}.{_LAYER_MAP[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> Optional[str]:
    for g, h in _GLOBAL_MAP.items():
        if h == name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for g, h in _LAYER_MAP.items():
            if h == m.group(2):
                return f"blk.{int(m.group(1))}.{g}"
    return None


# ---------------------------------------------------------------------------- config
def _f32_clean(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int):
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    lo_wl, hi_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < hi_wl, 1.0, np.where(wavelen > lo_wl, factor, mid))


def _fit_llama3(freqs: np.ndarray, head_dim: int, theta: float, ctx: int, path: str) -> Optional[dict]:
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    if freqs.size != head_dim // 2:
        raise TinyzqError(f"{path}: rope_freqs.weight has {freqs.size} values, expected {head_dim // 2}")
    if np.allclose(freqs, 1.0):
        return None
    factor = float(freqs.max())
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072, ctx):
        for low in (1.0, 2.0, 0.5, 4.0):
            for high in (4.0, 8.0, 2.0, 16.0, 1.0):
                if high <= low:
                    continue
                ref = llama3_rope_factors(head_dim, theta, factor, low, high, orig)
                if np.allclose(ref, freqs, rtol=1e-5, atol=1e-6):
                    return {"rope_type": "llama3", "factor": _f32_clean(factor), "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": int(orig)}
    raise TinyzqError(f"{path}: rope_freqs.weight does not match any llama3 rope scaling (unsupported)")


def config_from_gguf(meta: dict, tensors: dict, path: str, read_tensor=None) -> ModelConfig:
    """`ModelConfig` from GGUF metadata. `tensors`: GGUF name -> info (only membership is used, plus
    `read_tensor(name)` -> float32 array for ``rope_freqs.weight`` when present)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise TinyzqError(f"{path}: missing metadata key 'general.architecture'")
    if arch not in SUPPORTED_ARCHS:
        raise TinyzqError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key, default: Any = KeyError):
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is KeyError:
                raise TinyzqError(f"{path}: missing metadata key '{arch}.{key}'")
            return default
        if isinstance(v, list):  # per-layer values: only uniform ones are supported
            if not v or any(x != v[0] for x in v):
                raise TinyzqError(f"{path}: per-layer {arch}.{key} values are not supported")
            v = v[0]
        return v

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = get("attention.key_length", None)
    if head_dim is None:
        if hidden % n_heads:
            raise TinyzqError(f"{path}: embedding_length {hidden} is not divisible by head_count {n_heads}")
        head_dim = hidden // n_heads
    head_dim = int(head_dim)
    emb = tensors.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        toks = meta.get("tokenizer.ggml.tokens")
        vocab = emb[1][0] if emb is not None else (len(toks) if toks else None)
    if vocab is None:
        raise TinyzqError(f"{path}: missing metadata key '{arch}.vocab_size'")
    theta = _f32_clean(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 2048))

    rope_scaling = None
    stype = get("rope.scaling.type", None)
    sfactor = get("rope.scaling.factor", None) or get("rope.scale_linear", None)
    if stype in (None, "none") and get("rope.scale_linear", None) is not None:
        stype = "linear"
    if stype == "linear" and sfactor and float(sfactor) != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": _f32_clean(sfactor)}
    elif stype == "yarn" and sfactor:
        rope_scaling = {"rope_type": "yarn", "factor": _f32_clean(sfactor),
                        "original_max_position_embeddings": int(get("rope.scaling.original_context_length", ctx))}
    elif stype not in (None, "none", "linear"):
        raise TinyzqError(f"{path}: unsupported rope scaling type {stype!r}")
    if "rope_freqs.weight" in tensors and read_tensor is not None:
        freqs = read_tensor("rope_freqs.weight")
        fitted = _fit_llama3(freqs, head_dim, theta, ctx, path)
        if fitted is not None:
            rope_scaling = fitted

    def tok_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    eos = [i for i in (tok_id("tokenizer.ggml.eos_token_id"),) if i is not None]
    eot = tok_id("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos:
        eos.append(eot)
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32_clean(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=ctx,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=(arch == "qwen2") or "blk.0.attn_q.bias" in tensors,
        bos_token_id=tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos[0] if len(eos) == 1 else (eos or None)),
    )


class GGUFSource(TensorSource):
    """A GGUF file as a lazy `TensorSource` (float32 tensors, HF names and layout)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._f = GGUFFile(self.path)
        try:
            self.metadata = self._f.metadata
            self.config = config_from_gguf(self._f.metadata, self._f.tensors, self.path, self._f.tensor)
            self._hf2gguf = {}
            found = {}
            for gname, (ttype, shape, start, nbytes) in self._f.tensors.items():
                h = gguf_to_hf_name(gname)
                if h is not None:
                    self._hf2gguf[h] = gname
                    found[h] = shape
            self._shapes = _check_shapes(self.path, self.config, found)
        except BaseException:
            self._f.close()
            raise

    def _load(self, name: str) -> np.ndarray:
        gname = self._hf2gguf[name]
        w = self._f.tensor(gname)
        if self.config.arch in ("llama", "mistral"):
            if gname.endswith(("attn_q.weight", "attn_q.bias")):
                w = unpermute_qk(w, self.config.num_attention_heads)
            elif gname.endswith(("attn_k.weight", "attn_k.bias")):
                w = unpermute_qk(w, self.config.num_key_value_heads)
        return w

    def ggml_type(self, name: str) -> str:
        """The ggml type name (e.g. 'Q4_1') a tensor is stored as."""
        from gguf.constants import GGMLQuantizationType
        return GGMLQuantizationType(self._f.tensors[self._hf2gguf[name]][0]).name

    def _load_tokenizer(self):
        from ..tokenizer import Tokenizer
        return Tokenizer.from_gguf_metadata(self._f.metadata, source=self.path)

    def close(self) -> None:
        self._f.close()


__all__ = ["GGUFSource", "GGUFFile", "dequantize", "permute_qk", "unpermute_qk", "gguf_to_hf_name",
           "hf_to_gguf_name", "config_from_gguf", "dequant_q8_0", "dequant_q4_0", "dequant_q4_1",
           "dequant_f16", "dequant_bf16"]
