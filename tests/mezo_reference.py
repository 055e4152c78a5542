"""tinyzq's ZO step against a PyTorch fp32 MeZO step on the same model, batch and machine, in one run.

    python tests/mezo_reference.py MODEL [--batch 4] [--ctx 512] [--steps 3] [--threads 2] [--json OUT]

MODEL is a packed .tzq directory. Both sides see the same function: the PyTorch model
(transformers' LlamaForCausalLM, fp32) gets the packed model's dequantized weights, and both score the
same training windows of the default corpus. Ours is `tinyzq.train` itself (per-group scales/zeros +
norms, two forwards per step); the reference is MeZO as published (Malladi et al. 2023): perturb every
parameter in place with z from a seeded generator, two losses, restore, update, z regenerated each time.
Each side runs `--steps` steps after one warm-up step; the JSON gives the mean step seconds, their
ratio, and both models' loss on the batch (they must agree: same weights, same windows).

This is a benchmark, not a test (pytest does not collect it; tests/test_mezo_reference.py runs it on a
tiny model). It needs torch and transformers (the [test] extra); tinyzq itself never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def torch_model(m):
    """transformers' Llama with the dequantized weights of tinyzq model `m`."""
    import torch
    import transformers

    cfg = {k: v for k, v in m.cfg.to_dict().items() if k not in ("architectures", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    sd = {}
    for name in hf.state_dict():
        w = m.weights.get(name, m.weights.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        if w is None:
            raise SystemExit(f"{name}: missing from the tinyzq model")
        a = w.dequantize() if hasattr(w, "dequantize") else getattr(w, "weight", w)
        sd[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    hf.load_state_dict(sd, strict=True)
    return hf


def mezo_steps(hf, x, steps: int, eps: float = 1e-3, lr: float = 1e-6, seed: int = 0) -> tuple[float, float]:
    """Mean seconds of `steps` MeZO steps (after one warm-up), and the loss before the first."""
    import torch

    params = [p for p in hf.parameters() if p.requires_grad]
    ids = torch.from_numpy(x.astype(np.int64))

    def perturb(s: int, scale: float):
        g = torch.Generator().manual_seed(s)
        for p in params:
            p.data.add_(torch.normal(0.0, 1.0, size=p.shape, generator=g), alpha=scale)

    def loss() -> float:
        return float(hf(input_ids=ids, labels=ids).loss)

    times = []
    with torch.no_grad():
        l0 = loss()
        for t in range(steps + 1):
            t0 = time.perf_counter()
            s = seed + t
            perturb(s, eps)
            lp = loss()
            perturb(s, -2 * eps)
            lm = loss()
            perturb(s, eps)
            perturb(s, -lr * (lp - lm) / (2 * eps))
            if t:
                times.append(time.perf_counter() - t0)
    return float(np.mean(times)), l0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    os.environ["TINYZQ_THREADS"] = str(a.threads)
    import torch

    import tinyzq
    from tinyzq import data, train as ztrain

    torch.set_num_threads(a.threads)
    m = tinyzq.load(a.model)
    train_ids, _, _ = ztrain.load_texts(m.tokenizer, None)
    x = data.windows(train_ids, a.ctx)[: a.batch]
    nll, n = m.net.sequence_nll(x)
    loss_ours = nll / n

    with tempfile.TemporaryDirectory() as tmp:  # our step: the trainer itself, one warm-up step excluded
        rep = tinyzq.train(m, os.path.join(tmp, "run"), steps=a.steps + 1, batch=a.batch, ctx=a.ctx, eval_every=0,
                           estimator="central", n_dirs=1,  # MeZO's step: one direction, two passes
                           val_windows=1, save_every=10**6, progress=False)
        with open(os.path.join(tmp, "run", "log.jsonl")) as f:
            secs = np.diff([0.0] + [r["seconds"] for r in map(json.loads, f) if "g" in r])  # cumulative -> per step
    ours = float(np.mean(secs[1:])) if len(secs) > 1 else float(rep["mean_step_seconds"])
    del m

    hf = torch_model(tinyzq.load(a.model))
    mezo, loss_torch = mezo_steps(hf, x, a.steps)
    res = {"model": os.path.abspath(a.model), "batch": a.batch, "ctx": a.ctx, "threads": a.threads, "steps": a.steps,
           "zo_step_s": ours, "mezo_torch_step_s": mezo, "ratio": ours / mezo,
           "loss_ours": loss_ours, "loss_torch": loss_torch, "torch": torch.__version__,
           "loadavg": os.getloadavg()}
    print(f"ZO step {ours:.2f} s (tinyzq, trainable scales) vs {mezo:.2f} s (PyTorch fp32 MeZO) = {ours / mezo:.2f}x; "
          f"loss {loss_ours:.5f} vs {loss_torch:.5f}")
    if a.json:
        from tinyzq.cli import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
