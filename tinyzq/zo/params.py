"""Registry of trainable tensors for a training mode (`--train scales|qv|latent`).

Every trainable tensor has a *base* value (fp32, a view into one flat vector owned by the ParamSet)
and a *live* array that the model actually reads (a PackedLinear's scales/zeros, an RMSNorm weight, a
FloatLinear's weight). The model never sees the base directly:

- perturb(seed, a):  live = base + a·z          ("add" tensors: zeros in code units, fp weights)
                     live = base + (a·z)·base    ("mult" tensors: scales, norm weights — a relative step,
                                                  i.e. a step in log space to first order)
  with z = f(seed, tensor_id, index) regenerated in C (csrc/rng.c), never stored;
- restore():         live = base (a copy), so perturb → restore is exact bit for bit, whatever was
                     perturbed and in whatever order (the live values are always recomputed from the
                     base, never by subtracting a perturbation);
- update(seed, c):   base = base + c·z (or base + (c·z)·base), then live = base.

Perturbing by +ε then −ε thus means live = base ± ε·z, symmetric around the same base.

Modes (DESIGN §4):
- `scales` (default): per-group scales ("mult") and zeros ("add", code units) of every decoder-block
  PackedLinear, and every RMSNorm weight ("mult"); integer codes frozen. Embeddings/lm_head (8-bit)
  are not trained. 2 values per group + norms: 3.35 M for SmolLM2 at g64 (13 MiB base copy).
- `qv`: the Q and V projections become full-precision FloatLinears initialised to their dequantized
  packed weights (so step 0 is the quantized model) and are trained ("add"); the rest stays packed.
- `latent` (ZeroQAT): fp32 latent weights W (initialised to the dequantized weights) plus the learnable
  clipping of each group (its scale and zero) and the norms; after every change the codes are
  re-quantized, q = clip(rint(W/s + z), 0, 2^b − 1), and packed into the same PackedLinear that
  eval/generate use. The latent weights are never modified by perturbations (a scratch buffer holds
  W ± εz while its codes are built), so they cost one fp32 copy of the linears (425 MiB for SmolLM2).

Tensors carry the index of their decoder layer (−1 = not in a layer, e.g. the final norm) so a step
may perturb a random subset of layers.
"""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..errors import TinyzqError
from ..model import BLOCK_LINEARS, FloatLinear
from ..quant.packed import PackedLinear

MODES = ("scales", "qv", "latent")


DIRECTIONS = ("dense", "rowcol")
# Tensor-id spaces of the row and column draws of `rowcol` directions (never a tensor id or a direction seed).
_ROW_STREAM, _COL_STREAM = 0x50C0_0000_0000_0000, 0xC01C_0000_0000_0000
_SQRT_HALF = np.float32(math.sqrt(0.5))


def check_directions(directions: str) -> None:
    if directions not in DIRECTIONS:
        raise TinyzqError(f"--directions {directions!r} is unknown; choose one of: {', '.join(DIRECTIONS)}")


# Parts of a trainable set that may get their own direction gain (`--gain PART=X`).
PARTS = ("scales", "zeros", "norms", "final_norm", "latent", "weights")


def part_of(name: str) -> str:
    """The part a trainable tensor belongs to, from its name."""
    if name == "model.norm.weight":
        return "final_norm"
    if name.endswith("layernorm.weight"):
        return "norms"
    for p in ("scales", "zeros", "latent"):
        if name.endswith("." + p):
            return p
    return "weights"


def check_gains(gains) -> dict:
    """{part: gain > 0}, validated (one-line errors)."""
    out = {}
    for k, v in dict(gains or {}).items():
        if k not in PARTS:
            raise TinyzqError(f"--gain {k}=...: unknown part; choose among: {', '.join(PARTS)}")
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TinyzqError(f"--gain {k}={v!r}: not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise TinyzqError(f"--gain {k}={v}: must be a positive number")
        out[k] = v
    return out


class Entry:
    __slots__ = ("name", "tid", "base", "live", "mult", "shape", "rowcol", "gain")

    def __init__(self, name, tid, base, live, mult, rowcol=False, gain=1.0):
        self.name, self.tid, self.base, self.live, self.mult = name, tid, base, live, mult
        self.shape = base.shape
        self.rowcol = bool(rowcol) and base.ndim == 2
        self.gain = float(gain)  # the direction's scale on this tensor: z ~ N(0, gain²)


def rowcol_z(e: Entry, seed: int, dist: str) -> np.ndarray:
    """The structured direction of a [rows, groups] tensor: z[r, c] = (a[r] + b[c]) / √2 with a, b drawn
    from the C generator (streams keyed on the tensor id), so every entry has unit variance but a direction
    has only rows + groups degrees of freedom: a per-output-channel plus a per-input-group change."""
    a = kernels.rng_fill(e.shape[0], seed, _ROW_STREAM + e.tid, dist)
    b = kernels.rng_fill(e.shape[1], seed, _COL_STREAM + e.tid, dist)
    z = a[:, None] + b[None, :]
    z *= _SQRT_HALF
    return z


def _axpy(e: Entry, src: np.ndarray, dst: np.ndarray, seed: int, a: float, dist: str) -> None:
    """dst = src + a·gain·z (mult: src + (a·gain·z)·src) with the entry's kind of direction. Perturbation
    and update both go through here, so a gain g makes the expected update g²·∇ on that tensor (a
    diagonal preconditioner) and its perturbation g·ε."""
    a = a * e.gain
    if not e.rowcol:
        kernels.rng_axpy(src, dst, seed, e.tid, a, dist, e.mult)
        return
    az = rowcol_z(e, seed, dist)
    az *= np.float32(a)
    if e.mult:
        az *= src
    np.add(src, az, out=dst)


class Unit:
    """Tensors that change together (one linear's scales+zeros(+latent), one norm), in one layer."""
    __slots__ = ("layer", "entries", "requant")

    def __init__(self, layer, entries, requant=None):
        self.layer, self.entries, self.requant = layer, entries, requant


class ParamSet:
    def __init__(self, specs: list, mode: str = "custom", directions: str = "dense", gains: dict | None = None):
        """specs: list of (layer, [(name, live_array_or_None, init_values, mult)], requant_fn_or_None).
        directions: `dense` (z i.i.d. per value) or `rowcol` (2-D tensors draw z[r, c] = (a[r] + b[c])/√2).
        gains: {part: g} scales the directions on that part's tensors (see part_of; default 1)."""
        check_directions(directions)
        gains = check_gains(gains)
        self.mode, self.directions, self.gains = mode, directions, gains
        total = sum(int(np.asarray(v).size) for _, ents, _ in specs for _, _, v, _ in ents)
        self.flat = np.empty(total, np.float32)
        self.units, self.entries = [], []
        off = 0
        scratch = 0
        for layer, ents, requant in specs:
            es = []
            for name, live, init, mult in ents:
                init = np.asarray(init, dtype=np.float32)
                base = self.flat[off:off + init.size].reshape(init.shape)
                base[...] = init
                off += init.size
                if live is not None and (live.dtype != np.float32 or not live.flags.c_contiguous
                                         or live.shape != init.shape):
                    raise ValueError(f"{name}: live tensor must be C-contiguous float32 {init.shape}")
                if live is None:
                    scratch = max(scratch, init.size)
                e = Entry(name, len(self.entries), base, live, bool(mult), directions == "rowcol",
                          gains.get(part_of(name), 1.0))
                es.append(e)
                self.entries.append(e)
            self.units.append(Unit(int(layer), es, requant))
        self._scratch = np.empty(scratch, np.float32) if scratch else None
        self.layers = sorted({u.layer for u in self.units if u.layer >= 0})
        # what a direction may be restricted to: every layer, and −1 for the units outside the layers
        self.slots = self.layers + ([-1] if any(u.layer < 0 for u in self.units) else [])

    @property
    def size(self) -> int:
        return int(self.flat.size)

    def _units(self, layers, exact=False):
        """Units of `layers` plus those outside any layer (final norm); exact: only those listed (−1 names
        the units outside the layers)."""
        if layers is None:
            return self.units
        keep = set(layers)
        return [u for u in self.units if u.layer in keep or (u.layer < 0 and not exact)]

    def _write(self, unit, seed, a, dist):
        w = None
        for e in unit.entries:
            if e.live is None:
                w = self._scratch[:e.base.size].reshape(e.shape)
                dst = w
            else:
                dst = e.live
            if a == 0.0:
                np.copyto(dst, e.base)
            else:
                _axpy(e, e.base, dst, seed, a, dist)
        if unit.requant is not None:
            unit.requant(w)

    def perturb(self, seed: int, a: float, dist: str = "gaussian", layers=None, exact: bool = False) -> None:
        """live = base + a·z (relative for mult tensors) for the units of `layers` (None: all)."""
        for u in self._units(layers, exact):
            self._write(u, seed, float(a), dist)

    def restore(self, layers=None, exact: bool = False) -> None:
        """live = base exactly."""
        for u in self._units(layers, exact):
            self._write(u, 0, 0.0, "gaussian")

    def update(self, seed: int, coef: float, dist: str = "gaussian", layers=None, exact: bool = False) -> None:
        """base += coef·z (relative for mult tensors), then live = base."""
        for u in self._units(layers, exact):
            for e in u.entries:
                _axpy(e, e.base, e.base, seed, float(coef), dist)
            self._write(u, 0, 0.0, "gaussian")

    def state(self) -> np.ndarray:
        return self.flat.copy()

    def load_state(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float32).reshape(-1)
        if flat.size != self.flat.size:
            raise TinyzqError(f"the saved trainable state has {flat.size} values, this model's {self.mode!r} "
                              f"set has {self.flat.size}")
        self.flat[...] = flat
        self.restore()

    def describe(self) -> dict:
        return {"mode": self.mode, "directions": self.directions, "values": self.size, "tensors": len(self.entries),
                "base_mib": self.flat.nbytes / 2**20, "gains": dict(self.gains)}


# ------------------------------------------------------------------------------------------ modes
def _layer_of(name: str) -> int:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return -1


def _norm_specs(weights: dict, cfg) -> list:
    specs = []
    for i in range(cfg.num_hidden_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{n}.weight"
            specs.append((i, [(name, weights[name], weights[name], True)], None))
    specs.append((-1, [("model.norm.weight", weights["model.norm.weight"], weights["model.norm.weight"], True)], None))
    return specs


def _block_linears(weights: dict, cfg):
    for i in range(cfg.num_hidden_layers):
        for s in BLOCK_LINEARS:
            name = f"model.layers.{i}.{s}.weight"
            yield i, s, name, weights[name]


def _requantizer(lin: PackedLinear):
    top = float((1 << lin.bits) - 1)
    out, inp, g = lin.out_features, lin.in_features, lin.group

    def requant(w):
        x = w.reshape(out, inp // g, g) / lin.scales[:, :, None]
        x += lin.zeros[:, :, None]
        np.rint(x, out=x)
        np.clip(x, 0.0, top, out=x)
        lin.codes[...] = kernels.pack(x.reshape(out, inp).astype(np.uint8), lin.bits)
    return requant


def build(model, mode: str = "scales", directions: str = "dense", gains: dict | None = None) -> ParamSet:
    """The trainable set of `model` (an api.Model whose decoder linears are packed) for `mode`.

    `qv` replaces the Q and V PackedLinears of model.weights by FloatLinears and rebuilds model.net.
    """
    if mode not in MODES:
        raise TinyzqError(f"--train {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    cfg, weights = model.cfg, model.weights
    packed = [n for _, _, n, w in _block_linears(weights, cfg) if isinstance(w, PackedLinear)]
    if not packed and mode != "qv":
        raise TinyzqError("this model has no packed decoder linears to train; quantize it first "
                          "(tinyzq quantize SRC OUT --bits 3 --group 64)")
    specs = []
    if mode == "scales":
        for i, _, name, w in _block_linears(weights, cfg):
            if isinstance(w, PackedLinear):
                specs.append((i, [(name + ".scales", w.scales, w.scales, True),
                                  (name + ".zeros", w.zeros, w.zeros, False)], None))
        specs += _norm_specs(weights, cfg)
    elif mode == "qv":
        changed = False
        for i, s, name, w in _block_linears(weights, cfg):
            if s not in ("self_attn.q_proj", "self_attn.v_proj"):
                continue
            if isinstance(w, PackedLinear):
                w = FloatLinear(w.dequantize(), w.bias)
                weights[name] = w
                changed = True
            specs.append((i, [(name, w.weight, w.weight, False)], None))
        if changed:
            from ..model import Transformer
            model.net = Transformer(cfg, weights)
    else:  # latent
        for i, _, name, w in _block_linears(weights, cfg):
            if isinstance(w, PackedLinear):
                specs.append((i, [(name + ".latent", None, w.dequantize(), False),
                                  (name + ".scales", w.scales, w.scales, True),
                                  (name + ".zeros", w.zeros, w.zeros, False)], _requantizer(w)))
        specs += _norm_specs(weights, cfg)
    return ParamSet(specs, mode, directions, gains)


def from_arrays(arrays: dict, mult: dict | None = None, directions: str = "dense",
                gains: dict | None = None) -> ParamSet:
    """A ParamSet over plain fp32 arrays (tests, custom objectives): each array is its own unit."""
    mult = mult or {}
    return ParamSet([(-1, [(k, v, v, mult.get(k, False))], None) for k, v in arrays.items()], "custom", directions,
                    gains)
