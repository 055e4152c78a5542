"""Two-point SPSA with seeded in-place perturbations (MeZO / ZeroQAT style).

One direction k of step t: seed = direction_seed(run_seed, t, k); live = base + ε·z → L+;
live = base − ε·z → L−; live = base (restore); g = (L+ − L−) / (2ε) is the projected gradient
(the directional derivative along z). z is regenerated from the seed by csrc/rng.c, never stored.

Exactness: perturbations are always computed from the untouched base values (ParamSet), and restore
copies the base back, so after a probe the model's parameters are bit-for-bit what they were, even
if the loss raised (the restore runs in a `finally`). The estimate E_z[g·z] = ∇L + O(ε²) for Gaussian
or Rademacher z (for a quadratic L the central difference is exact: g = zᵀ∇L).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import kernels

_SEED_STREAM = 0x5EED_0000_0000_0000  # tensor-id space of the direction seeds (never a parameter id)


@dataclass
class Probe:
    seed: int
    g: float
    loss_plus: float
    loss_minus: float


def direction_seed(run_seed: int, step: int, k: int = 0) -> int:
    """The seed of direction k at step t of a run: a 64-bit draw of the same counter-based generator."""
    return kernels.rng_bits(run_seed, _SEED_STREAM + k, step)


def probe(params, loss_fn: Callable[..., float], seed: int, eps: float, dist: str = "gaussian",
          layers=None) -> Probe:
    """One two-point estimate along z(seed). loss_fn(sign) returns the loss of the current live params
    (sign = +1 / −1 tells which pass it is, for losses that reuse work between the two passes)."""
    try:
        params.perturb(seed, eps, dist, layers)
        lp = float(loss_fn(+1))
        params.perturb(seed, -eps, dist, layers)
        lm = float(loss_fn(-1))
    finally:
        params.restore(layers)
    return Probe(int(seed), (lp - lm) / (2.0 * eps), lp, lm)


def estimate(params, loss_fn, run_seed: int, step: int, eps: float, n_dirs: int = 1, dist: str = "gaussian",
             layers=None) -> list:
    """K = n_dirs probes of step `step` (the update averages them)."""
    return [probe(params, loss_fn, direction_seed(run_seed, step, k), eps, dist, layers) for k in range(n_dirs)]
