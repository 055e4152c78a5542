"""ZO-SGD: θ ← θ − lr_t · ĝ · z for each probe (averaged over the K directions of a step).

ĝ is the projected gradient g after clipping:
- normalised (default; the measured starting point of NOTES.md): keep the running RMS of every g seen
  so far (r = sqrt(mean g²), the current one included), clip g to ±clip·r (clip = 3) and divide by r,
  so ĝ is dimensionless (|ĝ| ≤ clip) and lr is the size of a step in units of z;
- raw (normalize=False): ĝ = clip(g, ±clip) (ZeroQAT clips at ±0.2/ε), or g itself if clip is None.

The update is applied to the ParamSet's base values by the same C routine as the perturbation
(`base += c·z`, relative for scale-like tensors), with c = −lr_t·ĝ/K in fp32.

Schedules: constant, linear and cosine (from the peak at the first step after warm-up to 0 one step
after the last); linear warm-up over `warmup` steps
from lr/warmup. linear/cosine need the number of steps; until it is known (a time budget's first
steps) they give the peak lr.
"""
from __future__ import annotations

import math

from ..errors import TinyzqError

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup: int = 0, total: int | None = None) -> float:
    """Learning rate of step `step` (1-based)."""
    if schedule not in SCHEDULES:
        raise TinyzqError(f"--schedule {schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    if not total:  # a time budget's first steps, before the run fixes the decay's length
        return lr
    # step warmup+1 takes the peak and the last step still moves (the decay reaches 0 one step later)
    frac = min(1.0, max(0.0, (step - warmup - 1) / max(1, total - warmup)))
    if schedule == "linear":
        return lr * (1.0 - frac)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class ZOSGD:
    def __init__(self, lr: float, schedule: str = "constant", warmup: int = 0, total: int | None = None,
                 normalize: bool = True, clip: float | None = 3.0):
        self.lr, self.schedule, self.warmup, self.total = float(lr), schedule, int(warmup), total
        self.normalize, self.clip = bool(normalize), clip
        self.g2_sum, self.g_count = 0.0, 0
        lr_at(1, self.lr, schedule, self.warmup, total)  # validate now

    def project(self, g: float) -> float:
        """ĝ from g (updates the running RMS when normalising)."""
        if not math.isfinite(g):
            raise FloatingPointError(f"the projected gradient is {g} (the loss is not finite)")
        if self.normalize:
            self.g2_sum += g * g
            self.g_count += 1
            r = math.sqrt(self.g2_sum / self.g_count)
            if r == 0.0:
                return 0.0
            c = self.clip if self.clip is not None else math.inf
            return max(-c * r, min(c * r, g)) / r
        if self.clip is not None:
            return max(-self.clip, min(self.clip, g))
        return g

    def step(self, params, probes: list, step: int, dist: str = "gaussian", layers=None) -> tuple:
        """Apply the update of `probes` (step is 1-based). Returns (lr, [ĝ per probe])."""
        lr = lr_at(step, self.lr, self.schedule, self.warmup, self.total)
        gh = [self.project(p.g) for p in probes]
        for p, h in zip(probes, gh):
            c = -lr * h / len(probes)
            if c != 0.0:
                if p.layers is not None:  # the direction's own layers
                    params.update(p.seed, c, dist, p.layers, exact=True)
                else:
                    params.update(p.seed, c, dist, layers)
        return lr, gh

    def state(self) -> dict:
        return {"g2_sum": self.g2_sum, "g_count": self.g_count}

    def load_state(self, st: dict) -> None:
        self.g2_sum, self.g_count = float(st["g2_sum"]), int(st["g_count"])
