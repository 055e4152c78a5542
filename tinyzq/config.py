"""Model hyper-parameters: `ModelConfig`, built from a Hugging Face ``config.json`` (or GGUF metadata).

Only decoder-only llama-family models are supported: ``llama``, ``qwen2`` and ``mistral`` (RMSNorm,
RoPE, grouped-query attention, SwiGLU MLP). Unknown keys in ``config.json`` are ignored; a missing
required key or an unsupported architecture is a one-line `TinyzqError`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from .errors import TinyzqError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")

# HF `architectures[0]` class name and `model_type` for each supported arch.
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_CLASS_TO_ARCH = {v: k for k, v in _HF_CLASS.items()}

# Defaults of the corresponding transformers config classes, for optional keys.
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Hyper-parameters of a llama-family decoder (HF naming)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF format, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have biases (always True for qwen2)
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, list, None] = None
    sliding_window: Optional[int] = field(default=None)  # informational (mistral / qwen2); not applied

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise TinyzqError(
                f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TinyzqError(f"config: {k} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise TinyzqError(
                f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise TinyzqError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rt not in _ROPE_TYPES:
                raise TinyzqError(
                    f"config: unsupported rope_scaling type {rt!r} (supported: {', '.join(_ROPE_TYPES)})")
            if rt == "default":
                self.rope_scaling = None
        self.rms_norm_eps = float(self.rms_norm_eps)
        self.rope_theta = float(self.rope_theta)

    # ------------------------------------------------------------------ derived
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_ids(self) -> list:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)]

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, cfg: dict, path: Optional[str] = None) -> "ModelConfig":
        """Build from a parsed HF ``config.json``. `path` (the file) is only used in error messages."""
        where = f"{path}: " if path else "config.json: "
        if not isinstance(cfg, dict):
            raise TinyzqError(f"{where}expected a JSON object, got {type(cfg).__name__}")
        arch = _arch_of(cfg, where)
        missing = [k for k in _REQUIRED if cfg.get(k) is None]
        if missing:
            raise TinyzqError(f"{where}missing required key {missing[0]!r}")

        def geti(key, default=None):
            v = cfg.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                raise TinyzqError(f"{where}{key} must be an integer, got {v!r}")
            return int(v)

        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise TinyzqError(f"{where}unsupported hidden_act {act!r} (only silu is supported)")
        if cfg.get("mlp_bias"):
            raise TinyzqError(f"{where}mlp_bias=true is not supported")

        d = _DEFAULTS[arch]
        n_heads = geti("num_attention_heads")
        hidden = geti("hidden_size")
        head_dim = geti("head_dim")
        if head_dim is None:
            if hidden % n_heads:
                raise TinyzqError(f"{where}hidden_size {hidden} is not divisible by num_attention_heads {n_heads}"
                                  " and head_dim is not given")
            head_dim = hidden // n_heads

        # rope: transformers <5 writes rope_theta + rope_scaling; >=5 writes rope_parameters
        rope_params = cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        if isinstance(rope_params, dict):
            rp = dict(rope_params)
            if rope_theta is None:
                rope_theta = rp.get("rope_theta")
            rp.pop("rope_theta", None)
            if rope_scaling is None and rp.get("rope_type", rp.get("type", "default")) != "default":
                rope_scaling = rp
        if rope_theta is None:
            rope_theta = d["rope_theta"]
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise TinyzqError(f"{where}rope_scaling must be an object, got {rope_scaling!r}")
            rope_scaling = dict(rope_scaling)
            rope_scaling.pop("rope_theta", None)
            if "rope_type" not in rope_scaling and "type" in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")

        sliding = None
        if arch == "mistral":
            sliding = cfg.get("sliding_window")
        elif arch == "qwen2" and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")

        eos = cfg.get("eos_token_id", d["eos_token_id"])
        bos = cfg.get("bos_token_id", d["bos_token_id"])
        try:
            return cls(
                arch=arch,
                vocab_size=geti("vocab_size"),
                hidden_size=hidden,
                intermediate_size=geti("intermediate_size"),
                num_hidden_layers=geti("num_hidden_layers"),
                num_attention_heads=n_heads,
                num_key_value_heads=geti("num_key_value_heads", n_heads),
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", d["rms_norm_eps"])),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                max_position_embeddings=geti("max_position_embeddings", d["max_position_embeddings"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", d["tie_word_embeddings"])),
                attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
                bos_token_id=None if bos is None else int(bos),
                eos_token_id=eos,
                sliding_window=None if sliding is None else int(sliding),
            )
        except TinyzqError as e:
            msg = str(e)
            raise TinyzqError(msg if path is None or msg.startswith(path) else f"{where}{msg}") from None
        except (TypeError, ValueError) as e:
            raise TinyzqError(f"{where}invalid value: {e}") from None

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        """Read a ``config.json`` file (or a directory containing one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise TinyzqError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TinyzqError(f"{path}: cannot read: {e}") from None
        except json.JSONDecodeError as e:
            raise TinyzqError(f"{path}: invalid JSON: {e}") from None
        return cls.from_hf(cfg, path)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads as the matching *ForCausalLM."""
        out: dict[str, Any] = {
            "architectures": [_HF_CLASS[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": copy.deepcopy(self.eos_token_id),
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if self.arch == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        elif self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        elif self.arch == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _arch_of(cfg: dict, where: str) -> str:
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if mt in SUPPORTED_ARCHS:
        return mt
    for a in archs:
        if a in _CLASS_TO_ARCH:
            return _CLASS_TO_ARCH[a]
    name = mt if mt is not None else (archs[0] if archs else None)
    if name is None:
        raise TinyzqError(f"{where}missing required key 'model_type' (supported: {', '.join(SUPPORTED_ARCHS)})")
    raise TinyzqError(f"{where}unsupported architecture {name!r} (supported: {', '.join(SUPPORTED_ARCHS)})")


__all__ = ["ModelConfig", "SUPPORTED_ARCHS"]
