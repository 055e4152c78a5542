"""Model I/O: lazy tensor sources over GGUF files and Hugging Face directories.

    src = open_source("model.gguf")          # or an HF directory (config.json + *.safetensors)
    src.config, src.tokenizer, src.names()
    w = src.get("model.layers.0.self_attn.q_proj.weight")   # float32, HF layout [out, in]

Tensors are read (and dequantized) one at a time on `get`; files are memory-mapped, so a 1B model
never needs all of its tensors in memory at once. Every failure is a one-line `TinyzqError` that
names the file and what is wrong.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from ..config import ModelConfig
from ..errors import TinyzqError


def hf_tensor_shapes(cfg: ModelConfig) -> dict:
    """The HF tensor names a model with config `cfg` has, with their shapes ([out, in] for linears),
    in a canonical order. `lm_head.weight` only when the embeddings are untied."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, f = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


class TensorSource:
    """A lazy, read-only set of float32 tensors in HF naming/layout, with the model's config and tokenizer.

    Subclasses set `config`, `path` and `_shapes` (name -> shape, HF order) and implement `_load(name)`
    and `_load_tokenizer()`.
    """

    config: ModelConfig
    path: str
    _shapes: dict

    def names(self) -> list:
        """HF tensor names (`lm_head.weight` only for untied models)."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple:
        try:
            return tuple(self._shapes[name])
        except KeyError:
            raise TinyzqError(f"{self.path}: no tensor {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 array in HF layout ([out, in] for linear weights)."""
        if name not in self._shapes:
            raise TinyzqError(f"{self.path}: no tensor {name!r}")
        arr = self._load(name)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if tuple(arr.shape) != tuple(self._shapes[name]):  # pragma: no cover - guarded at open time
            raise TinyzqError(f"{self.path}: tensor {name!r} has shape {tuple(arr.shape)}, "
                              f"expected {tuple(self._shapes[name])}")
        return arr

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> Iterator:
        """(name, float32 array) pairs, one tensor materialised at a time."""
        for n in self.names():
            yield n, self.get(n)

    @property
    def tokenizer(self):
        """The model's `tinyzq.tokenizer.Tokenizer` (built on first access)."""
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            tok = self._tokenizer = self._load_tokenizer()
        return tok

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(s)) for s in self._shapes.values()))

    # -- to implement
    def _load(self, name: str) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _load_tokenizer(self):  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, arch={self.config.arch}, tensors={len(self._shapes)})"


def _check_shapes(path: str, cfg: ModelConfig, found: dict, expected: Optional[dict] = None) -> dict:
    """Check that every expected tensor is in `found` (name -> shape) with the shape the config implies."""
    expected = hf_tensor_shapes(cfg) if expected is None else expected
    for name, shp in expected.items():
        if name not in found:
            raise TinyzqError(f"{path}: missing tensor {name!r}")
        got = tuple(int(x) for x in found[name])
        if got != tuple(shp):
            raise TinyzqError(f"{path}: tensor {name!r} has shape {got}, expected {tuple(shp)} from the config")
    return expected


def file_size(path: str) -> int:
    """Size in bytes of the file a loader is about to read, or a one-line TinyzqError."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        raise TinyzqError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise TinyzqError(f"{path}: cannot open: {e.strerror or e}") from None


def open_source(path) -> TensorSource:
    """Open a model for reading: a ``*.gguf`` file, or a Hugging Face directory
    (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .hf import HFSource
        return HFSource(path)
    if not os.path.exists(path):
        raise TinyzqError(f"{path}: no such file or directory")
    if path.lower().endswith(".gguf") or _has_gguf_magic(path):
        from .gguf import GGUFSource
        return GGUFSource(path)
    if os.path.basename(path) == "config.json":
        from .hf import HFSource
        return HFSource(os.path.dirname(path) or ".")
    raise TinyzqError(f"{path}: not a model (expected a .gguf file or a directory with config.json "
                      "and *.safetensors)")


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["TensorSource", "open_source", "hf_tensor_shapes"]
