"""Hugging Face model directories: ``config.json`` + ``model.safetensors`` (or sharded with
``model.safetensors.index.json``) + the tokenizer files.

The safetensors files are parsed here (8-byte header length, JSON header, raw data) and memory-mapped:
NumPy has no bfloat16 (safetensors' numpy framework refuses bf16 tensors), so bf16 is widened to
float32 by a 16-bit shift; fp16/fp64 are cast. Tensors are read one at a time on `get`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Optional

import numpy as np

from ..config import ModelConfig
from ..errors import TinyzqError
from . import TensorSource, _check_shapes, file_size

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked against the file size, data memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        size = file_size(path)
        if size < 8:
            raise TinyzqError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > min(size - 8, _MAX_HEADER):
                raise TinyzqError(f"{path}: truncated or corrupt safetensors file (header length {hlen}, "
                                  f"file has {size} bytes)")
            hbytes = f.read(hlen)
        try:
            header = json.loads(hbytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinyzqError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise TinyzqError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.size = size
        self.data_start = 8 + hlen
        self.tensors = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype, shape, (b, e) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise TinyzqError(f"{path}: corrupt safetensors header entry for {name!r}") from None
            dt = _DTYPES.get(dtype)
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if dt is not None and e - b != n * dt.itemsize:
                raise TinyzqError(f"{path}: tensor {name!r} has {e - b} bytes, expected {n * dt.itemsize} "
                                  f"for {dtype}{list(shape)}")
            self.tensors[name] = (dtype, shape, int(b), int(e))
            end_max = max(end_max, int(e))
        if self.data_start + end_max > size:
            raise TinyzqError(f"{path}: truncated safetensors file (header says {self.data_start + end_max} "
                              f"bytes, the file has {size})")
        self._mm: Optional[mmap.mmap] = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        return self._mm

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16/fp16/fp64 converted)."""
        dtype, shape, b, e = self.tensors[name]
        dt = _DTYPES.get(dtype)
        if dt is None:
            raise TinyzqError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype} "
                              "(supported: F32, F16, BF16, F64)")
        n = (e - b) // dt.itemsize
        raw = np.frombuffer(self._map(), dtype=dt, count=n, offset=self.data_start + b) if n else np.empty(0, dt)
        if dtype == "BF16":
            out = np.left_shift(raw.astype(np.uint32), 16).view(np.float32)
        else:
            out = raw.astype(np.float32)  # always a copy: the result never pins the map
        return out.reshape(shape)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None


def _strip_prefix_map(names) -> dict:
    """Map HF names to file keys, accepting checkpoints saved from a bare LlamaModel (no 'model.' prefix)."""
    out = {}
    for k in names:
        if k.startswith("model.") or k == "lm_head.weight":
            out.setdefault(k, k)
        else:
            out.setdefault("model." + k, k)
    return out


class HFSource(TensorSource):
    """A Hugging Face model directory as a lazy `TensorSource`."""

    def __init__(self, directory: str):
        self.path = directory = os.fspath(directory)
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise TinyzqError(f"{cfg_path}: file not found (not a Hugging Face model directory)")
        self.config: ModelConfig = ModelConfig.from_file(cfg_path)
        self._files: dict = {}
        index_path = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        keymap = {}  # file key -> SafetensorsFile
        try:
            if os.path.isfile(index_path):
                try:
                    with open(index_path, encoding="utf-8") as f:
                        wm = json.load(f)["weight_map"]
                    if not isinstance(wm, dict):
                        raise TypeError("weight_map is not an object")
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                    raise TinyzqError(f"{index_path}: invalid index ({e})") from None
                for key, fname in wm.items():
                    st = self._file(os.path.join(directory, fname))
                    if key not in st.tensors:
                        raise TinyzqError(f"{st.path}: missing tensor {key!r} (listed in {index_path})")
                    keymap[key] = st
            else:
                files = [single] if os.path.isfile(single) else sorted(
                    os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
                if not files:
                    bins = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
                    extra = " (PyTorch .bin checkpoints are not supported; re-save with safetensors)" if bins else ""
                    raise TinyzqError(f"{single}: file not found{extra}")
                for fp in files:
                    st = self._file(fp)
                    for key in st.tensors:
                        keymap.setdefault(key, st)
            self._keys = {}
            found = {}
            for hf, key in _strip_prefix_map(keymap).items():
                st = keymap[key]
                self._keys[hf] = (st, key)
                found[hf] = st.tensors[key][1]
            where = index_path if os.path.isfile(index_path) else (
                single if os.path.isfile(single) else directory)
            self._shapes = _check_shapes(where, self.config, found)
            for name in self._shapes:
                st, key = self._keys[name]
                if st.tensors[key][0] not in _DTYPES:
                    raise TinyzqError(f"{st.path}: tensor {key!r} has unsupported dtype {st.tensors[key][0]} "
                                      "(supported: F32, F16, BF16, F64)")
        except BaseException:
            self.close()
            raise

    def _file(self, path: str) -> SafetensorsFile:
        st = self._files.get(path)
        if st is None:
            st = self._files[path] = SafetensorsFile(path)
        return st

    def dtype(self, name: str) -> str:
        """The safetensors dtype ('F32', 'BF16', ...) a tensor is stored as."""
        st, key = self._keys[name]
        return st.tensors[key][0]

    def _load(self, name: str) -> np.ndarray:
        st, key = self._keys[name]
        return st.get(key)

    def _load_tokenizer(self):
        from ..tokenizer import Tokenizer
        return Tokenizer.load(self.path)

    def close(self) -> None:
        for st in getattr(self, "_files", {}).values():
            st.close()


__all__ = ["HFSource", "SafetensorsFile"]
