"""The `.tzq` model directory: config.json, tokenizer files, model.safetensors, quant.json.

Quantized linear `NAME` (a Hugging Face weight name) is stored as `NAME.codes` (uint8, docs/FORMAT.md),
`NAME.scales` and `NAME.zeros`; everything else (norms, biases, float weights) under its own name.
quant.json records the format version and, per quantized tensor, bits/group/shape. Written atomically;
read back with every shape, dtype and version checked against the config.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..config import ModelConfig
from ..errors import TinyzqError
from ..model import FloatLinear, weight_shapes
from ..quant.packed import PackedLinear
from .atomic import atomic_dir

FORMAT = "tinyzq"
VERSION = 1
SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


def is_tzq_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "quant.json"))


def save(path: str, cfg: ModelConfig, tokenizer, weights: dict, meta: dict | None = None,
         scale_dtype: str = "float16", float_dtype: str = "float32") -> None:
    """Write a model directory atomically. `weights`: name -> PackedLinear | FloatLinear | ndarray."""
    from safetensors.numpy import save_file

    tensors, qinfo = {}, {}
    fdt = SCALE_DTYPES[float_dtype]
    for name, w in weights.items():
        if isinstance(w, PackedLinear):
            tensors[name + ".codes"] = w.codes
            tensors[name + ".scales"] = w.scales.astype(SCALE_DTYPES[scale_dtype])
            tensors[name + ".zeros"] = w.zeros.astype(SCALE_DTYPES[scale_dtype])
            qinfo[name] = {"bits": w.bits, "group": w.group, "shape": [w.out_features, w.in_features]}
        elif isinstance(w, FloatLinear):
            tensors[name] = w.weight.astype(fdt)
        else:
            tensors[name] = np.asarray(w, dtype=np.float32)
        bias = getattr(w, "bias", None)
        if bias is not None:
            tensors[name[: -len("weight")] + "bias"] = bias.astype(np.float32)
    quant = {"format": FORMAT, "version": VERSION, "scheme": "asymmetric-groupwise",
             "scale_dtype": scale_dtype, "float_dtype": float_dtype, "tensors": qinfo, **(meta or {})}
    with atomic_dir(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": FORMAT})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf(), f, indent=2)
        with open(os.path.join(tmp, "quant.json"), "w") as f:
            json.dump(quant, f, indent=2)
        tokenizer.save(tmp)


def read_quant_json(path: str) -> dict:
    qpath = os.path.join(path, "quant.json")
    try:
        with open(qpath) as f:
            quant = json.load(f)
    except FileNotFoundError:
        raise TinyzqError(f"{path}: not a tinyzq model directory (no quant.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyzqError(f"{qpath}: not valid JSON ({e})") from None
    if not isinstance(quant, dict) or quant.get("format") != FORMAT:
        raise TinyzqError(f"{qpath}: field 'format' must be {FORMAT!r}")
    if quant.get("version") != VERSION:
        raise TinyzqError(f"{qpath}: format version {quant.get('version')!r} is not supported (this tinyzq reads {VERSION})")
    if not isinstance(quant.get("tensors"), dict):
        raise TinyzqError(f"{qpath}: field 'tensors' must be an object")
    return quant


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64}


def _direct_reader(st_path: str):
    """key -> array read with plain file reads (None for what it cannot read: the caller then uses
    safetensors). safe_open's get_tensor copies out of a mmap of the file, so every page of the file is
    resident next to the copies while a model loads: reading directly keeps the peak RSS of loading at
    about the model's size (SmolLM2 W4: 265 -> ~180 MiB)."""
    import struct

    try:
        fh = open(st_path, "rb")
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        base = 8 + n
    except (OSError, ValueError, struct.error):
        return None

    def read(key):
        info = header.get(key)
        dt = _ST_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dt is None:
            return None
        a0, a1 = info["data_offsets"]
        arr = np.empty(info["shape"], dtype=dt)
        if arr.nbytes != a1 - a0:
            return None
        fh.seek(base + a0)
        if fh.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            return None
        return arr

    read.close = fh.close
    return read


def load(path: str):
    """Read a `.tzq` directory -> (config, tokenizer, weights dict for Transformer, quant meta)."""
    from safetensors import safe_open

    from ..tokenizer import Tokenizer

    quant = read_quant_json(path)
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except FileNotFoundError:
        raise TinyzqError(f"{cfg_path}: missing") from None
    except json.JSONDecodeError as e:
        raise TinyzqError(f"{cfg_path}: not valid JSON ({e})") from None
    st_path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(st_path):
        raise TinyzqError(f"{st_path}: missing")
    shapes = weight_shapes(cfg)
    qinfo = quant["tensors"]
    try:
        f = safe_open(st_path, framework="numpy")
        stored = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise TinyzqError(f"{st_path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None

    direct = _direct_reader(st_path)

    def get(key, shape, dtypes):
        if key not in stored:
            raise TinyzqError(f"{st_path}: tensor {key} is missing")
        try:
            a = direct(key) if direct is not None else None
            if a is None:
                a = f.get_tensor(key)
        except Exception as e:
            raise TinyzqError(f"{st_path}: tensor {key} unreadable ({str(e).splitlines()[0]})") from None
        if tuple(a.shape) != tuple(shape):
            raise TinyzqError(f"{st_path}: tensor {key} has shape {list(a.shape)}, expected {list(shape)}")
        if a.dtype not in dtypes:
            raise TinyzqError(f"{st_path}: tensor {key} has dtype {a.dtype}, expected {' or '.join(map(str, dtypes))}")
        return a

    floats = (np.dtype(np.float32), np.dtype(np.float16))
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            continue
        bias_name = name[: -len("weight")] + "bias"
        bias = get(bias_name, shapes[bias_name], floats).astype(np.float32) if bias_name in shapes else None
        if name in qinfo:
            info = qinfo[name]
            bits, group = info.get("bits"), info.get("group")
            if bits not in (2, 3, 4, 8) or not isinstance(group, int) or group <= 0 or len(shape) != 2 \
                    or shape[1] % group or list(info.get("shape", [])) != list(shape):
                raise TinyzqError(f"{os.path.join(path, 'quant.json')}: entry for {name} is inconsistent "
                                  f"(bits {bits}, group {group}, shape {info.get('shape')}; model needs {list(shape)})")
            out, inp = shape
            codes = get(name + ".codes", (out, inp * bits // 8), (np.dtype(np.uint8),))
            scales = get(name + ".scales", (out, inp // group), floats)
            zeros = get(name + ".zeros", (out, inp // group), floats)
            weights[name] = PackedLinear(codes, scales, zeros, bits, group, inp, bias=bias)
        else:
            a = get(name, shape, floats).astype(np.float32)
            weights[name] = FloatLinear(a, bias) if len(shape) == 2 else a
    if direct is not None:
        direct.close()
    tokenizer = Tokenizer.load(path)
    return cfg, tokenizer, weights, quant
