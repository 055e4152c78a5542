"""`tinyzq train`: zeroth-order QAT of a packed model with forward passes only.

The loop sees a loss function and a ParamSet (zo/params.py); the loss is the model's own forward
(`Transformer.hidden` + tiled `token_nll`, the very code, kernels and packed weights that eval and
generate run), so what you train is what you run.

A step t: the batch is `batch` windows of the training split drawn by a generator seeded with
(seed, t); K directions with seeds derived from (seed, t, k); one unperturbed pass plus one pass per
direction (forward differences; with --layers-per-dir a direction perturbs its own random layer slots
and its pass resumes from the unperturbed one below them; `central`: two passes per direction, SPSA);
ZO-SGD update.
Everything a step does is a function of (checkpointed state, seed, t), so `--resume` continues
exactly: the per-step losses of a resumed run equal those of an uninterrupted one (same machine and
thread count: BLAS sums in a thread-dependent order).

OUT (a run directory):
  model/            the trained model (.tzq, scales/zeros in fp32) — `tinyzq eval OUT` works on it
  checkpoint/       model/ + trainable.npy (the fp32 trainable vector) + state.json, replaced atomically
                    every --save-every steps, at the end, and on Ctrl-C
  log.jsonl         one line per step: step, seed, g (projected gradient), g_hat, loss_plus, loss_minus,
                    loss, lr, seconds, tokens, rss_mb (forward estimator: loss_center, layers); and one
                    line per validation: step, val_ppl, val_nll
  report.json, report.svg   at the end: before/after validation perplexity, speed, memory, curves
  teacher/          --teacher: top-k log-probs of the teacher per training window (memory-mapped .npy)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from .errors import TinyzqError
from .sysinfo import peak_rss_mb

# Per direction over every trainable value, by estimator. Forward scales peak at 5e-4 under the cosine
# default: one-hour W3 runs (seed 0) at 5e-4 closed 29.0% of the gap, dense and with 4 layer slots per
# direction, against 25.2 / 25.4% at 1e-3 (seed 1 at 5e-4: 27.0%).
DEFAULT_LR = {"forward": {"scales": 5e-4, "qv": 1e-5, "latent": 1e-5},
              "central": {"scales": 1e-3, "qv": 1e-5, "latent": 1e-5}}
# The defaults of the options that depend on the estimator (a None in TrainConfig).
ESTIMATOR_DEFAULTS = {"forward": {"n_dirs": 8, "layers_per_dir": 0}, "central": {"n_dirs": 1, "layers_per_dir": 0}}
STATE_VERSION = 1
# Tests only: SIGKILL this process in the middle of step N (between its two loss evaluations, while the
# parameters are perturbed in place) — a deterministic stand-in for a power cut.
_SIGKILL_AT_STEP = int(os.environ.get("TINYZQ_TEST_SIGKILL_AT_STEP", "0") or 0)


def _die_on_second_call(fn):
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return wrapped


@dataclass
class TrainConfig:
    train: str = "scales"          # scales | qv | latent
    steps: int | None = None       # number of steps (or `minutes`)
    minutes: float | None = None   # time budget of this run (steps are then open-ended)
    horizon: int | None = None     # with minutes and a decaying schedule: its length in steps, fitted by the run
    lr: float | None = None        # default: see resolved()
    eps: float = 1e-3
    n_dirs: int | None = None      # directions per step (default: 8 forward, 1 central)
    estimator: str = "forward"     # forward (K directions share one L0) | central (L+ − L− per direction)
    dist: str = "gaussian"         # gaussian | rademacher
    schedule: str = "cosine"       # constant | linear | cosine (decays over --steps or the --minutes budget)
    warmup: int = 0
    clip: float | None = 3.0       # in RMS units when normalize, else absolute (ZeroQAT: 0.2/eps)
    normalize: bool = True
    layers_per_step: int = 0       # 0 = perturb every layer; k = a random subset of k layers per step
    layers_per_dir: int | None = None  # forward: each direction its own random k layer slots (0 = all)
    directions: str = "dense"      # dense | rowcol (z of a 2-D tensor = row draw + column draw)
    gains: dict | None = None      # {part: g}: directions scaled by g on that part (zo.params.PARTS)
    batch: int = 2
    ctx: int = 512
    seed: int = 0
    eval_every: int = 100          # validation every N steps (0 = only before and after)
    val_windows: int = 64
    save_every: int = 50
    text: str | None = None        # .txt / .jsonl (text or chat messages); default: the default corpus
    teacher: str | None = None     # float model for knowledge distillation
    kd_topk: int = 16
    kd_alpha: float = 0.5          # loss = (1 − α)·CE + α·KL(teacher ‖ student) on top-k + rest

    def check(self) -> None:
        from .zo.optim import SCHEDULES
        from .zo.params import MODES, check_directions, check_gains
        from .zo.spsa import ESTIMATORS

        if self.train not in MODES:
            raise TinyzqError(f"--train {self.train!r} is unknown; choose one of: {', '.join(MODES)}")
        if self.steps is None and self.minutes is None:
            raise TinyzqError("give --steps N or --minutes M")
        if self.steps is not None and (not isinstance(self.steps, (int, np.integer)) or self.steps < 0):
            raise TinyzqError(f"--steps must be an integer >= 0, not {self.steps!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise TinyzqError(f"--minutes must be > 0, not {self.minutes!r}")
        for name in ("eps", "lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise TinyzqError(f"--{name} must be a positive number, not {v!r}")
        check_directions(self.directions)
        check_gains(self.gains)
        if self.estimator not in ESTIMATORS:
            raise TinyzqError(f"--estimator {self.estimator!r} is unknown; choose one of: {', '.join(ESTIMATORS)}")
        if self.layers_per_dir and self.estimator != "forward":
            raise TinyzqError("--layers-per-dir needs --estimator forward (the directions resume from its shared pass)")
        if self.layers_per_dir and self.layers_per_step:
            raise TinyzqError("give --layers-per-step or --layers-per-dir, not both")
        if self.dist not in ("gaussian", "rademacher"):
            raise TinyzqError(f"--dist {self.dist!r} is unknown; choose gaussian or rademacher")
        if self.schedule not in SCHEDULES:
            raise TinyzqError(f"--schedule {self.schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
        if self.schedule != "constant" and self.steps is None and self.minutes is None:
            raise TinyzqError(f"--schedule {self.schedule} needs --steps or --minutes (the length of the decay)")
        for name, lo in (("n_dirs", 1), ("batch", 1), ("ctx", 2), ("val_windows", 1), ("save_every", 1),
                         ("warmup", 0), ("eval_every", 0), ("layers_per_step", 0), ("layers_per_dir", 0),
                         ("kd_topk", 1)):
            v = getattr(self, name)
            if v is None and name in ("n_dirs", "layers_per_dir"):
                continue
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise TinyzqError(f"--{name.replace('_', '-')} must be an integer >= {lo}, not {v!r}")
        if self.clip is not None and not self.clip > 0:
            raise TinyzqError(f"--clip must be > 0, not {self.clip!r}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise TinyzqError(f"--kd-alpha must be in [0, 1], not {self.kd_alpha!r}")
        if self.seed < 0 or self.seed >= 2**63:
            raise TinyzqError(f"--seed must be in [0, 2^63), not {self.seed}")
        for name in ("text", "teacher"):
            p = getattr(self, name)
            if p is not None and not os.path.exists(p):
                raise TinyzqError(f"--{name} {p}: no such file or directory")

    def resolved(self, n_slots: int) -> "TrainConfig":
        """This config with the defaults filled in (what a checkpoint stores). `n_slots`: the layer slots of
        the trainable set (decoder layers + the final norm).

        Default lr: DEFAULT_LR per direction, times K (the update averages the K directions), times
        √(slots/k) with k layer slots per direction: a direction over a fraction ρ of the values carries
        √ρ of a full direction's projected gradient (normalised away by ĝ) and ρ of its curvature, so the
        step that makes the same expected progress per direction is 1/√ρ longer."""
        d = ESTIMATOR_DEFAULTS[self.estimator]
        n_dirs = d["n_dirs"] if self.n_dirs is None else self.n_dirs
        per_dir = d["layers_per_dir"] if self.layers_per_dir is None else self.layers_per_dir
        if self.layers_per_step:
            per_dir = 0
        lr = self.lr
        if lr is None:
            k = min(per_dir, n_slots) if per_dir else n_slots
            lr = DEFAULT_LR[self.estimator][self.train] * n_dirs * math.sqrt(n_slots / max(1, k))
        return dataclasses.replace(self, n_dirs=n_dirs, layers_per_dir=per_dir, lr=lr)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.estimator][self.train]


# ------------------------------------------------------------------------------------------ data
def load_texts(tokenizer, path: str | None) -> tuple:
    """(train_ids, val_ids, label): --text FILE or the default corpus, split 90/10 at a paragraph."""
    from . import data

    if path is None:
        text, label = data.default_text(), "default corpus (pydoc_data.topics)"
    else:
        text, label = data.read_text(path, render_chat=tokenizer.chat_renderer()), path
    tr, va = data.split_text(text)
    return np.asarray(tokenizer.encode(tr)), np.asarray(tokenizer.encode(va)), label


HORIZON_PROBE_STEPS = 3  # steps timed before a time budget's decay length is fixed


def _horizon(step: int, left: float, step_seconds: float, val_seconds: float, eval_every: int) -> int:
    """Steps of a decaying schedule that fit `left` seconds: each step costs its time plus its share of
    the validations, and the final validation must fit too."""
    per_step = step_seconds + (val_seconds / eval_every if eval_every else 0.0)
    return step + max(1, int((left - val_seconds) / per_step))


def batch_indices(seed: int, step: int, n_windows: int, batch: int) -> np.ndarray:
    """The training windows of step `step`: a function of (seed, step) only."""
    rng = np.random.default_rng([int(seed), int(step), 0xBA7C4])
    return np.sort(rng.choice(n_windows, size=batch, replace=batch > n_windows))


# ------------------------------------------------------------------------------------------ losses
def nll_loss(net, tokens: np.ndarray, resume: tuple | None = None, keep: dict | None = None) -> float:
    """Mean next-token NLL of windows [B, T]: exactly what `Model.perplexity` / eval computes
    (`resume` / `keep`: from / keeping residual streams, see `Transformer.hidden`; the same bits)."""
    nll, n = net.sequence_nll(tokens, resume, keep)
    return nll / n


class TeacherCache:
    """Top-k log-probs of a float teacher for the training windows a run uses, on disk, memory-mapped.

    Files (in `folder`, keyed by a hash of the windows, the teacher path and k): `ids.npy` int32 and
    `logp.npy` float32 [windows, ctx−1, k], and `done.npy` (which windows are filled). Only the windows
    in `needed` are computed (all of them for a time budget); a resumed or longer run fills in the rest.
    The teacher is loaded only while windows are missing and freed before training starts, so training
    holds one model in memory."""

    def __init__(self, folder: str, teacher: str, windows: np.ndarray, k: int, needed=None, progress: bool = True):
        os.makedirs(folder, exist_ok=True)
        key = hashlib.sha256(windows.tobytes() + f"{os.path.abspath(teacher)}|{k}".encode()).hexdigest()[:16]
        ids_p, lp_p, done_p = (os.path.join(folder, f"{key}.{s}") for s in ("ids.npy", "logp.npy", "done.npy"))
        n, T = windows.shape
        if not (os.path.exists(ids_p) and os.path.exists(lp_p) and os.path.exists(done_p)):
            for p in (ids_p, lp_p, done_p):
                if os.path.exists(p):
                    os.unlink(p)
            np.lib.format.open_memmap(ids_p, mode="w+", dtype=np.int32, shape=(n, T - 1, k)).flush()
            np.lib.format.open_memmap(lp_p, mode="w+", dtype=np.float32, shape=(n, T - 1, k)).flush()
            np.save(done_p, np.zeros(n, bool))
        done = np.load(done_p)
        want = np.arange(n) if needed is None else np.unique(np.asarray(needed, dtype=np.int64))
        missing = want[~done[want]]
        if len(missing):
            self._compute(teacher, windows, k, ids_p, lp_p, done_p, done, missing, progress)
        self.ids = np.load(ids_p, mmap_mode="r")
        self.logp = np.load(lp_p, mmap_mode="r")

    @staticmethod
    def _compute(teacher, windows, k, ids_p, lp_p, done_p, done, missing, progress):
        import gc

        from tqdm import tqdm

        from . import api
        from .io.atomic import atomic_file

        t = api.load(teacher)
        T = windows.shape[1]
        ids = np.load(ids_p, mmap_mode="r+")
        lp = np.load(lp_p, mmap_mode="r+")
        for n_done, w in enumerate(tqdm(missing, desc="teacher top-k", unit="win", disable=not progress, leave=False)):
            h = t.net.hidden(windows[w:w + 1])[0, :-1]
            for a in range(0, T - 1, 128):
                z = t.net.logits(h[a:a + 128]).astype(np.float64)
                top = np.argpartition(-z, k - 1, axis=1)[:, :k]
                m = z.max(axis=1, keepdims=True)
                lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
                ids[w, a:a + 128] = top
                lp[w, a:a + 128] = np.take_along_axis(z, top, axis=1) - lse[:, None]
            done[w] = True
            if n_done % 32 == 31 or n_done == len(missing) - 1:  # data first, then the mask that vouches for it
                ids.flush()
                lp.flush()
                with atomic_file(done_p, "wb") as f:
                    np.save(f, done)
        del ids, lp, t
        gc.collect()


def kd_loss(net, tokens: np.ndarray, t_ids: np.ndarray, t_logp: np.ndarray, alpha: float,
            resume: tuple | None = None, keep: dict | None = None) -> float:
    """(1 − α)·CE + α·KL(teacher ‖ student) per token, over the teacher's top-k tokens plus one bucket
    for the rest of the vocabulary (teacher: 1 − its top-k mass; student: 1 − its mass on those ids).
    The bucket keeps KL's minimum at student = teacher; renormalising the teacher's top-k instead
    pulls the student's mass into those k tokens (measured on SmolLM2 W3g64: validation ppl rose).

    The student's log-probs at the teacher's ids come from the same hidden states and lm_head rows
    (gathered through the kernels) as its cross-entropy; [tokens, vocab] logits are never formed."""
    B, T = tokens.shape
    h = net.hidden(tokens, resume=resume, keep=keep)[:, :-1].reshape(-1, net.cfg.hidden_size)
    h = np.ascontiguousarray(h, dtype=np.float32)
    targets = tokens[:, 1:].reshape(-1)
    nll = net.token_nll(h, targets)
    ce = float(nll.mean())
    t_ids = np.asarray(t_ids).reshape(-1, t_ids.shape[-1])
    t_lp = np.asarray(t_logp, dtype=np.float64).reshape(t_ids.shape)
    pt = np.exp(t_lp)
    pt_rest = np.maximum(1.0 - pt.sum(axis=1), 0.0)
    kl = 0.0
    for a in range(0, h.shape[0], 256):
        b = min(h.shape[0], a + 256)
        rows = net.head.take(t_ids[a:b].astype(np.int64))          # [n, k, d]
        tgt = net.head.take(targets[a:b].astype(np.int64))        # [n, d]
        zk = np.einsum("nd,nkd->nk", h[a:b], rows).astype(np.float64)
        lse = nll[a:b] + np.einsum("nd,nd->n", h[a:b], tgt).astype(np.float64)
        ls = zk - lse[:, None]
        ps_rest = np.maximum(1.0 - np.exp(ls).sum(axis=1), 1e-30)
        kl += float((pt[a:b] * (t_lp[a:b] - ls)).sum())
        kl += float((pt_rest[a:b] * (np.log(pt_rest[a:b] + 1e-30) - np.log(ps_rest))).sum())
    kl /= h.shape[0]
    return (1.0 - alpha) * ce + alpha * kl


# ------------------------------------------------------------------------------------------ the run
def _step_loss(probes) -> float:
    """The step's training loss: L(θ) itself for the forward estimator, else the mean of (L+ + L−)/2."""
    if probes[0].loss_center is not None:
        return probes[0].loss_center
    return float(np.mean([(p.loss_plus + p.loss_minus) / 2 for p in probes]))


class _Stop:
    """First Ctrl-C: finish the step, save, exit. Second: abort at once (the last checkpoint stays)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[train] Ctrl-C: finishing this step, saving a checkpoint and stopping "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _save_model(path, model, meta_extra: dict) -> None:
    from .io import checkpoint

    meta = {k: v for k, v in model.meta.items()
            if k not in ("format", "version", "tensors", "scale_dtype", "float_dtype", "scheme")}
    meta.update(meta_extra)
    checkpoint.save(path, model.cfg, model.tokenizer, model.weights, meta, scale_dtype="float32")


def _save_checkpoint(out, model, params, opt, cfg, step, seconds, tokens, meta_extra) -> None:
    from .io.atomic import atomic_dir

    with atomic_dir(os.path.join(out, "checkpoint")) as tmp:
        _save_model(os.path.join(tmp, "model"), model, meta_extra)
        np.save(os.path.join(tmp, "trainable.npy"), params.flat)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"version": STATE_VERSION, "step": step, "seconds": seconds, "tokens": tokens,
                       "optimizer": opt.state(), "config": dataclasses.asdict(cfg),
                       "trainable_values": params.size}, f, indent=2)


def _read_log(path: str, upto: int | None = None) -> list:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if upto is None or r.get("step", 0) <= upto:
                    rows.append(r)
    return rows


def _rewrite_log(path: str, rows: list) -> None:
    from .io.atomic import atomic_file

    with atomic_file(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[train] {msg}", flush=True)


def run(model, out: str, cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True,
        **overrides) -> dict:
    """Train `model` (path or api.Model) into the run directory `out`. Returns the report dict."""
    from . import api, kernels
    from .data import windows as make_windows
    from .evaluate import perplexity
    from .zo import optim, params as zparams, spsa

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TinyzqError(f"unknown training option(s): {', '.join(bad)}")
    out = os.path.abspath(os.fspath(out))
    ck = os.path.join(out, "checkpoint")
    state = None
    if resume:
        sp = os.path.join(ck, "state.json")
        if not os.path.isfile(sp):
            raise TinyzqError(f"{out}: no checkpoint to resume from (missing {sp})")
        with open(sp) as f:
            state = json.load(f)
        if state.get("version") != STATE_VERSION:
            raise TinyzqError(f"{sp}: checkpoint version {state.get('version')!r} is not supported")
        saved = TrainConfig(**{"estimator": "central", **state["config"]})  # runs before `forward` existed
        budget = {k: overrides.get(k, getattr(cfg, k, None) if cfg is not None else None) for k in ("steps", "minutes")}
        if any(v is not None for v in budget.values()):  # the budget may change on resume; nothing else
            saved.steps, saved.minutes = budget["steps"], budget["minutes"]
        cfg = saved
        model = api.load(os.path.join(ck, "model"))
    else:
        cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
        cfg.check()
        if os.path.exists(os.path.join(ck, "state.json")):
            raise TinyzqError(f"{out} already holds a training run; continue it with --resume or choose another OUT")
        if isinstance(model, (str, os.PathLike)):
            model = api.load(api._check_path(model))
    cfg.check()
    os.makedirs(out, exist_ok=True)
    t_setup = time.perf_counter()

    train_ids, val_ids, label = load_texts(model.tokenizer, cfg.text)
    ctx = min(cfg.ctx, model.cfg.max_position_embeddings)
    if len(train_ids) < ctx:
        raise TinyzqError(f"the training text has {len(train_ids)} tokens, fewer than one window of --ctx {ctx}")
    train_win = make_windows(train_ids, ctx)
    val_win = make_windows(val_ids, ctx, cfg.val_windows) if len(val_ids) >= ctx else None
    if val_win is None:
        raise TinyzqError(f"the validation part of the text has {len(val_ids)} tokens, fewer than one window "
                          f"of --ctx {ctx}; use a longer text or a smaller --ctx")
    teacher = None
    if cfg.teacher:
        _say(f"teacher {cfg.teacher}: top-{cfg.kd_topk} log-probs of the training windows of this run "
             f"(computed once, cached in {os.path.join(out, 'teacher')})", progress)
        needed = None
        if cfg.steps is not None:
            needed = np.concatenate([batch_indices(cfg.seed, t, len(train_win), cfg.batch)
                                     for t in range(1, cfg.steps + 1)] or [np.zeros(0, np.int64)])
        teacher = TeacherCache(os.path.join(out, "teacher"), cfg.teacher, train_win, cfg.kd_topk, needed, progress)

    params = zparams.build(model, cfg.train, cfg.directions, cfg.gains)
    cfg = cfg.resolved(len(params.slots))
    opt = optim.ZOSGD(cfg.learning_rate, cfg.schedule, cfg.warmup, cfg.steps or cfg.horizon, cfg.normalize, cfg.clip)
    step, seconds, tokens = 0, 0.0, 0
    log_path = os.path.join(out, "log.jsonl")
    if state is not None:
        params.load_state(np.load(os.path.join(ck, "trainable.npy")))
        opt.load_state(state["optimizer"])
        step, seconds, tokens = int(state["step"]), float(state["seconds"]), int(state["tokens"])
        _rewrite_log(log_path, _read_log(log_path, step))  # drop what ran after the checkpoint
    elif os.path.exists(log_path):
        os.unlink(log_path)
    meta_extra = {"trained": {"mode": cfg.train, "config": dataclasses.asdict(cfg)}}
    layers_all = params.layers
    n_passes = spsa.forward_passes(cfg.n_dirs, cfg.estimator)
    n_layers_step = cfg.layers_per_step if 0 < cfg.layers_per_step < len(layers_all) else 0

    n_blocks = len(model.net.layers)

    def entry(slots):  # the first layer a direction's slots change (−1, the final norm: after the last)
        return min(n_blocks if s < 0 else s for s in slots)

    def loss_fn(tok, idx, layers, dir_layers):
        # Layers below the first perturbed one are the same in the + and − passes: run them once, before
        # perturbing (bit-identical to full passes, see Transformer.hidden), and resume both passes there.
        # With per-direction layers the forward estimator's unperturbed pass keeps the stream entering
        # each direction's first layer, and the direction's pass resumes there.
        first = min(layers) if layers else 0
        shared = (first, model.net.hidden(tok, stop=first)) if first > 0 else None
        kept = dict.fromkeys({entry(s) for s in dir_layers} - {0}) if dir_layers else None

        def one(resume, keep=None):
            if teacher is None:
                return nll_loss(model.net, tok, resume, keep)
            return kd_loss(model.net, tok, teacher.ids[idx], teacher.logp[idx], cfg.kd_alpha, resume, keep)

        def f(sign, own=None):
            if own is None:
                return one(shared, kept if sign == 0 else None)
            i = entry(own)
            return one((i, kept[i]) if i > 0 else None)
        return f

    def validate():
        t0 = time.perf_counter()
        r = perplexity(model.net, val_win.reshape(-1), ctx, None, batch=cfg.batch, progress=False)
        return r, time.perf_counter() - t0

    _say(f"model {model.path or '(in memory)'}: {model.meta.get('bits')}-bit g{model.meta.get('group')}; "
         f"training {cfg.train!r}: {params.size:,} fp32 values in {len(params.entries)} tensors "
         f"({params.flat.nbytes / 2**20:.1f} MiB), {cfg.directions} directions"
         + "".join(f", gain {k} {v:g}" for k, v in params.gains.items())
         + f"; lr {cfg.learning_rate:g}, eps {cfg.eps:g}, {cfg.n_dirs} "
         f"direction(s)/step ({cfg.estimator} differences"
         + (f", {cfg.layers_per_dir} of {len(params.slots)} layer slots each" if cfg.layers_per_dir else "")
         + f"), batch {cfg.batch}x{ctx}; text {label}: {len(train_win)} training windows, "
         f"{len(val_win)} validation windows; isa {kernels.isa()}, {kernels.get_threads()} threads", progress)
    val_hist = [r for r in _read_log(log_path) if "val_ppl" in r]
    r0, t_val = validate()
    if not val_hist or val_hist[-1]["step"] != step:
        row = {"step": step, "val_ppl": r0["ppl"], "val_nll": r0["nll"]}
        val_hist.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    _say(f"validation ppl at step {step}: {r0['ppl']:.4f} ({t_val:.0f} s)", progress)
    last_val = r0["ppl"]
    setup_seconds = time.perf_counter() - t_setup

    from tqdm import tqdm

    budget = cfg.minutes * 60.0 if cfg.minutes is not None else None
    t_run = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step if cfg.steps else 0, desc=f"train {cfg.train}", unit="step",
               disable=not progress, dynamic_ncols=True, leave=True)
    step_times: list = []
    fitted_here = False  # this run fixed the decay's length from its own step time (not a resumed run)
    last_saved = step
    interrupted = False
    logf = open(log_path, "a")
    try:
        with _Stop() as stop:
            while True:
                end = cfg.steps if cfg.steps is not None else cfg.horizon  # a time budget's decay ends the run too
                if end is not None and step >= end:
                    break
                if budget is not None:
                    el = time.perf_counter() - t_run
                    avg = np.mean(step_times[-10:]) if step_times else 0.0
                    if el + avg + t_val > budget:
                        break
                if stop.requested:
                    interrupted = True
                    break
                t0 = time.perf_counter()
                t = step + 1
                idx = batch_indices(cfg.seed, t, len(train_win), cfg.batch)
                tok = train_win[idx]
                layers = None
                if n_layers_step:
                    rng = np.random.default_rng([cfg.seed, t, 0x1A7E5])
                    layers = sorted(rng.choice(layers_all, size=n_layers_step, replace=False).tolist())
                dir_layers = None
                if cfg.layers_per_dir:
                    n_dir = min(cfg.layers_per_dir, len(params.slots))
                    dir_layers = [sorted(np.random.default_rng([cfg.seed, t, k, 0xD1A7E5])
                                         .choice(params.slots, size=n_dir, replace=False).tolist())
                                  for k in range(cfg.n_dirs)]
                lf = loss_fn(tok, idx, layers, dir_layers)
                if t == _SIGKILL_AT_STEP:
                    lf = _die_on_second_call(lf)
                probes = spsa.estimate(params, lf, cfg.seed, t, cfg.eps, cfg.n_dirs, cfg.dist, layers, cfg.estimator,
                                       dir_layers)
                lr, gh = opt.step(params, probes, t, cfg.dist, layers)
                dt = time.perf_counter() - t0
                step, seconds, tokens = t, seconds + dt, tokens + n_passes * tok.size
                step_times.append(dt)
                one = len(probes) == 1
                row = {"step": t, "seed": probes[0].seed if one else [p.seed for p in probes],
                       "g": probes[0].g if one else [p.g for p in probes],
                       "g_hat": gh[0] if one else gh,
                       "loss_plus": probes[0].loss_plus if one else [p.loss_plus for p in probes],
                       "loss_minus": probes[0].loss_minus if one else [p.loss_minus for p in probes],
                       "loss": _step_loss(probes),
                       "lr": lr, "seconds": round(seconds, 3), "tokens": tokens, "rss_mb": round(peak_rss_mb(), 1)}
                if cfg.estimator == "forward":
                    row["loss_center"] = probes[0].loss_center
                if layers is not None:
                    row["layers"] = layers
                if dir_layers is not None:
                    row["layers"] = dir_layers[0] if one else dir_layers
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                if cfg.eval_every and t % cfg.eval_every == 0:
                    rv, t_val = validate()
                    last_val = rv["ppl"]
                    vrow = {"step": t, "val_ppl": rv["ppl"], "val_nll": rv["nll"]}
                    val_hist.append(vrow)
                    logf.write(json.dumps(vrow) + "\n")
                    logf.flush()
                if t % cfg.save_every == 0:
                    if fitted_here and step < cfg.horizon:
                        # Steps that slow down (a warm or throttling device) would end the budget before
                        # the decay; re-fit its length to the time left, only here, so the checkpoint
                        # holds the schedule a resumed run continues exactly.
                        # (the mean since the last checkpoint: ten steps jitter by ±4%)
                        per = float(np.mean(step_times[-max(10, cfg.save_every):]))
                        h = _horizon(step, budget - (time.perf_counter() - t_run), per, t_val, cfg.eval_every)
                        if h != cfg.horizon:
                            if progress:
                                bar.write(f"[train] the decay now ends at step {h}, not {cfg.horizon} "
                                          f"({per:.2f} s per step)")
                            cfg.horizon = opt.total = bar.total = h
                    _save_checkpoint(out, model, params, opt, cfg, step, seconds, tokens, meta_extra)
                    last_saved = step
                avg = float(np.mean(step_times[-10:]))
                if (opt.total is None and cfg.schedule != "constant" and budget is not None
                        and len(step_times) == HORIZON_PROBE_STEPS):
                    cfg.horizon = opt.total = _horizon(step, budget - (time.perf_counter() - t_run), avg,
                                                       t_val, cfg.eval_every)
                    fitted_here = True
                    bar.total = cfg.horizon
                    if progress:  # above the bar, not inside its line
                        bar.write(f"[train] the {cfg.schedule} schedule decays over {cfg.horizon} steps (the time "
                                  f"budget at {avg:.1f} s per step)")
                eta = ""
                if cfg.steps is None and budget is not None:
                    eta = f"{max(0.0, budget - (time.perf_counter() - t_run)) / 60:.1f}m"
                bar.update(1)
                bar.set_postfix_str(f"loss {row['loss']:.4f}  val_ppl {last_val:.3f}  "
                                    f"{n_passes * tok.size / avg:.0f} tok/s  {avg:.1f} s/step"
                                    + (f"  left {eta}" if eta else ""))
            interrupted = interrupted or stop.requested
    finally:
        logf.close()
        bar.close()
    if interrupted:
        if step != last_saved:
            _save_checkpoint(out, model, params, opt, cfg, step, seconds, tokens, meta_extra)
        _say(f"stopped at step {step}; checkpoint saved in {ck}; continue with --resume", progress)
        raise KeyboardInterrupt

    # the end: final validation, checkpoint, model, report
    if not val_hist or val_hist[-1]["step"] != step:
        rv, _ = validate()
        vrow = {"step": step, "val_ppl": rv["ppl"], "val_nll": rv["nll"]}
        val_hist.append(vrow)
        with open(log_path, "a") as f:
            f.write(json.dumps(vrow) + "\n")
    if step != last_saved:
        _save_checkpoint(out, model, params, opt, cfg, step, seconds, tokens, meta_extra)
    meta_extra["trained"].update({"steps": step, "val_ppl": val_hist[-1]["val_ppl"], "config": dataclasses.asdict(cfg)})
    _save_model(os.path.join(out, "model"), model, meta_extra)
    report = _report(out, model, cfg, params, val_hist, _read_log(log_path), step, seconds, tokens, label,
                     len(train_win), ctx, setup_seconds)
    _say(f"validation ppl {report['val_ppl_before']:.4f} -> {report['val_ppl_after']:.4f} after {step} steps "
         f"({report['mean_step_seconds'] or 0:.2f} s/step, peak RSS {report['peak_rss_mb']:.0f} MiB); "
         f"model in {os.path.join(out, 'model')}", progress)
    return report


def _report(out, model, cfg, params, val_hist, rows, step, seconds, tokens, label, n_train_win, ctx,
            setup_seconds) -> dict:
    from .cli import write_json
    from .plot import line_chart, stack_svgs, write_svg
    from .sysinfo import machine

    steps_rows = [r for r in rows if "loss_plus" in r]
    dts = np.diff([0.0] + [r["seconds"] for r in steps_rows]) if steps_rows else np.array([])
    report = {
        "model": model.path, "out": out, "train": cfg.train, "steps": step, "tokens": tokens,
        "train_seconds": seconds, "setup_seconds": setup_seconds,
        "mean_step_seconds": float(np.mean(dts)) if len(dts) else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "val_ppl_before": val_hist[0]["val_ppl"], "val_ppl_after": val_hist[-1]["val_ppl"],
        "val_nll_before": val_hist[0]["val_nll"], "val_nll_after": val_hist[-1]["val_nll"],
        "val_history": [{"step": v["step"], "val_ppl": v["val_ppl"]} for v in val_hist],
        "trainable_values": params.size, "peak_rss_mb": peak_rss_mb(), "text": label,
        "train_windows": n_train_win, "ctx": ctx, "config": dataclasses.asdict(cfg), "machine": machine(),
        "bits": model.meta.get("bits"), "group": model.meta.get("group"),
    }
    write_json(os.path.join(out, "report.json"), report)
    loss = [(r["step"], r["loss"]) for r in steps_rows]
    k = max(1, len(loss) // 20)
    smooth = [(loss[i][0], float(np.mean([v for _, v in loss[max(0, i - k + 1):i + 1]]))) for i in range(len(loss))]
    a = line_chart({"loss (mean of L+, L-)": loss, f"moving average ({k})": smooth},
                   f"ZO training ({cfg.train}): training loss", "step", "loss (nats/token)")
    b = line_chart({"validation ppl": [(v["step"], v["val_ppl"]) for v in val_hist]},
                   "validation perplexity", "step", "perplexity")
    write_svg(os.path.join(out, "report.svg"), stack_svgs([a, b]))
    return report


# `tinyzq.train(...)` is the public API function (api.train) while `tinyzq.train` is also this module's
# name: importing the module sets the package attribute, so the module itself is made callable.
class _CallableModule(__import__("types").ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
