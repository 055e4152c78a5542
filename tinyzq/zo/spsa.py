"""Two-point SPSA with seeded in-place perturbations (MeZO / ZeroQAT style).

One direction k of step t: seed = direction_seed(run_seed, t, k); live = base + ε·z → L+;
live = base − ε·z → L−; live = base (restore); g = (L+ − L−) / (2ε) is the projected gradient
(the directional derivative along z). z is regenerated from the seed by csrc/rng.c, never stored.

`forward` estimator: the K directions of a step share one unperturbed pass L0 on the same batch,
g_k = (L(θ + ε·z_k) − L0) / ε — K + 1 forward passes instead of 2K. Its error against the directional
derivative is ε/2·zᵀHz + O(ε²): even in z, so E_z[g·z] is still ∇L + O(ε²) for symmetric z, and
it only adds variance (measured on SmolLM2: see the README's Training section).

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
    loss_minus: float | None            # None for the forward estimator
    loss_center: float | None = None    # L(θ), forward estimator only
    layers: tuple | None = None         # the direction's own layer slots (exact), if it has them

ESTIMATORS = ("central", "forward")


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


def forward_probes(params, loss_fn, seeds: list, eps: float, dist: str = "gaussian", layers=None,
                   dir_layers=None) -> list:
    """One-sided estimates along z(seed) for every seed, against one unperturbed pass, loss_fn(0).

    dir_layers[k] (optional): the exact layer slots direction k perturbs (−1 = the units outside the
    layers); its pass is then loss_fn(+1, dir_layers[k]), so the loss can resume from the unperturbed
    pass's residual stream below the direction's first layer."""
    l0 = float(loss_fn(0))
    out = []
    try:
        for k, seed in enumerate(seeds):
            own = tuple(int(x) for x in dir_layers[k]) if dir_layers is not None else None
            if own is None:
                params.perturb(seed, eps, dist, layers)  # from base: no restore needed between directions
                lp = float(loss_fn(+1))
            else:
                params.perturb(seed, eps, dist, own, exact=True)
                lp = float(loss_fn(+1, own))
                params.restore(own, exact=True)
            out.append(Probe(int(seed), (lp - l0) / eps, lp, None, l0, own))
    finally:
        params.restore(layers)
    return out


def forward_passes(n_dirs: int, estimator: str = "central") -> int:
    return n_dirs + 1 if estimator == "forward" else 2 * n_dirs


def estimate(params, loss_fn, run_seed: int, step: int, eps: float, n_dirs: int = 1, dist: str = "gaussian",
             layers=None, estimator: str = "central", dir_layers=None) -> list:
    """K = n_dirs probes of step `step` (the update averages them)."""
    seeds = [direction_seed(run_seed, step, k) for k in range(n_dirs)]
    if estimator == "forward":
        return forward_probes(params, loss_fn, seeds, eps, dist, layers, dir_layers)
    if dir_layers is not None:
        raise ValueError("per-direction layers need the forward estimator")
    if estimator != "central":
        raise ValueError(f"unknown estimator {estimator!r}")
    return [probe(params, loss_fn, s, eps, dist, layers) for s in seeds]
