"""`tinyzq bench MODEL`: speed and memory of one model, with references measured in the same run.

What is measured (each phase in a fresh subprocess, so its peak RSS is its own; best of --repeats):
- decode:        `new_tokens` (128) greedy tokens after a short prompt (16 tokens, not timed): each token is
                 one forward of one position with the KV cache, the lm_head and an argmax;
- prefill:       a `prompt_tokens` (512) prompt through the model with a KV cache + last-token logits;
- train_forward: a batch of `train_batch` x `train_ctx` (4 x 512) windows with the loss
                 (Transformer.sequence_nll: vocab-tiled cross-entropy), as one ZO training pass does;
- bandwidth:     a threaded streaming read (csrc/membw.c) of a buffer 8x the last-level cache or 256 MiB;
- weight bytes read per decoded token: every decoder linear + the lm_head (codes, scales, zeros), and
  decode_bandwidth_fraction = weight_bytes_per_token * decode_tok_s / bandwidth.
References, same phases, same threads, same token ids:
- numpy_fp32: the same model with every packed linear dequantized to fp32 (FloatLinear) and the
  forward in plain NumPy/BLAS (the C attention step is switched off);
- llama_cpp:  llama.cpp through llama-cpp-python (optional extra `tinyzq[bench]`) on the model's
  original GGUF (quant.json's `source`, or --gguf), when importable; skipped with a reason otherwise.
Ratios are ours / reference. The JSON is written atomically. Tests never assert on timings.
settings.many_row_product says whether our prefill/train-forward linears ran the int16 product or fp32 BLAS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from .errors import TinyzqError

KEYS = ("decode_tok_s", "prefill_tok_s", "train_forward_tok_s", "peak_rss_mb")
DECODE_PROMPT = 16
PHASES = ("decode", "prefill", "train_forward")


# ------------------------------------------------------------------------------ inputs
def _token_ids(tokenizer, n: int, vocab: int) -> list:
    """n token ids of English text (the default corpus), repeated if it is short; the same in every phase."""
    from .data import default_text

    ids = tokenizer.encode(default_text()[:200_000]) if tokenizer is not None else []
    ids = [i for i in ids if 0 <= i < vocab] or list(range(min(vocab, 256)))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _weight_bytes(net) -> int:
    """Bytes of weights one decoded token reads: every decoder linear and the lm_head (+ one embedding row)."""
    seen, total = set(), 0
    for layer in net.layers:
        for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            if id(lin) not in seen:
                seen.add(id(lin))
                total += int(lin.nbytes)
    total += int(net.head.nbytes)
    emb = net.embed
    total += int(emb.nbytes) // max(1, emb.out_features)
    return total


def _loadavg():
    """1-minute load average (other processes share the cores: timings are only comparable within a run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _llc_bytes() -> int:
    try:
        best = 0
        base = "/sys/devices/system/cpu/cpu0/cache"
        for d in os.listdir(base):
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
        return best
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------------ phases (run in subprocesses)
def _load_ours(path: str, fp32: bool):
    from . import api, model
    from .model import FloatLinear

    m = api.load(path)
    if fp32:
        model._kernels = lambda: None  # the plain NumPy forward: no C attention step or element-wise ops
        w = {}
        for name, lin in m.weights.items():
            if hasattr(lin, "dequantize") and not isinstance(lin, FloatLinear):
                w[name] = FloatLinear(lin.dequantize(), getattr(lin, "bias", None))
            else:
                w[name] = lin
        m = api.Model(m.cfg, m.tokenizer, w, m.meta, path)
    return m


def _phase_ours(phase: str, a) -> dict:
    from .model import KVCache
    from .sysinfo import peak_rss_mb

    m = _load_ours(a.model, a.fp32)
    net, cfg = m.net, m.cfg
    out = {"weight_bytes_per_token": _weight_bytes(net)}
    if phase == "decode":
        ids = _token_ids(m.tokenizer, DECODE_PROMPT, cfg.vocab_size)
        n = a.new_tokens
        best, toks = float("inf"), []
        for _ in range(a.repeats):
            cache = KVCache(cfg, 1, DECODE_PROMPT + n + 1)
            h = net.hidden(np.asarray(ids, dtype=np.int64)[None], cache)[0, -1]
            t0 = time.perf_counter()
            toks = []
            for _ in range(n):
                tok = int(np.argmax(net.logits(h[None])[0]))
                toks.append(tok)
                h = net.hidden(np.asarray([[tok]], dtype=np.int64), cache)[0, -1]
            best = min(best, time.perf_counter() - t0)
        out.update(decode_tok_s=n / best, decode_seconds=best, tokens=toks)
    elif phase == "prefill":
        ids = _token_ids(m.tokenizer, a.prompt_tokens, cfg.vocab_size)
        best = float("inf")
        for _ in range(a.repeats):
            cache = KVCache(cfg, 1, len(ids))
            t0 = time.perf_counter()
            h = net.hidden(np.asarray(ids, dtype=np.int64)[None], cache)[0, -1]
            net.logits(h[None])
            best = min(best, time.perf_counter() - t0)
        out.update(prefill_tok_s=len(ids) / best, prefill_seconds=best)
    else:
        ids = _token_ids(m.tokenizer, a.train_batch * a.train_ctx, cfg.vocab_size)
        batch = np.asarray(ids, dtype=np.int64).reshape(a.train_batch, a.train_ctx)
        best, loss = float("inf"), None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            nll, cnt = net.sequence_nll(batch)
            best = min(best, time.perf_counter() - t0)
            loss = nll / cnt
        out.update(train_forward_tok_s=batch.size / best, train_forward_seconds=best, train_forward_loss=loss)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _llama_logits(llama_cpp, llm, rows: int) -> np.ndarray:
    """Logits of the last evaluated batch, [rows, vocab] (llama_get_logits; Llama.scores' row indexing
    differs between llama-cpp-python versions)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(rows, llm.n_vocab()))


def _phase_llama_run(llama_cpp, phase, a, peak_rss_mb) -> dict:
    kw = dict(n_threads=a.threads, n_threads_batch=a.threads, verbose=False, use_mmap=True)
    ids_all = json.loads(a.ids_json) if a.ids_json else None
    out = {"weight_bytes_per_token": os.path.getsize(a.gguf)}
    if phase == "decode":
        llm = llama_cpp.Llama(a.gguf, n_ctx=DECODE_PROMPT + a.new_tokens + 8, n_batch=64, **kw)
        ids = ids_all[:DECODE_PROMPT]
        best, toks = float("inf"), []
        for _ in range(a.repeats):
            llm.reset()
            llm.eval(ids)
            t0 = time.perf_counter()
            toks = []
            for _ in range(a.new_tokens):
                tok = int(np.argmax(_llama_logits(llama_cpp, llm, 1)[0]))
                toks.append(tok)
                llm.eval([tok])
            best = min(best, time.perf_counter() - t0)
        out.update(decode_tok_s=a.new_tokens / best, decode_seconds=best, tokens=toks)
    elif phase == "prefill":
        n = a.prompt_tokens
        llm = llama_cpp.Llama(a.gguf, n_ctx=n + 8, n_batch=n, n_ubatch=n, **kw)
        ids = ids_all[:n]
        best = float("inf")
        for _ in range(a.repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - t0)
        out.update(prefill_tok_s=n / best, prefill_seconds=best)
    else:
        B, T = a.train_batch, a.train_ctx
        llm = llama_cpp.Llama(a.gguf, n_ctx=T + 8, n_batch=T, n_ubatch=T, logits_all=True, **kw)
        batch = np.asarray(ids_all[:B * T], dtype=np.int64).reshape(B, T)
        best, loss = float("inf"), None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            nll, cnt = 0.0, 0
            for row in batch:
                llm.reset()
                llm.eval(row.tolist())
                z = _llama_logits(llama_cpp, llm, T)[: T - 1].astype(np.float64)
                mx = z.max(axis=1)
                lse = mx + np.log(np.exp(z - mx[:, None]).sum(axis=1))
                nll += float((lse - z[np.arange(T - 1), row[1:]]).sum())
                cnt += T - 1
            best = min(best, time.perf_counter() - t0)
            loss = nll / cnt
        out.update(train_forward_tok_s=B * T / best, train_forward_seconds=best, train_forward_loss=loss)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _phase_bandwidth(a) -> dict:
    from . import kernels
    from .sysinfo import peak_rss_mb

    k = kernels.get()
    size = max(256 * 2 ** 20, 8 * _llc_bytes())
    buf = np.ones(size // 8, dtype=np.uint64)  # touched: no first-touch page faults in the timing
    k.stream_read(buf)
    best = float("inf")
    for _ in range(max(5, 2 * a.repeats)):
        t0 = time.perf_counter()
        k.stream_read(buf)
        best = min(best, time.perf_counter() - t0)
    return {"bandwidth_gb_s": buf.nbytes / best / 1e9, "bandwidth_buffer_mb": buf.nbytes / 2 ** 20,
            "peak_rss_mb": peak_rss_mb()}


def _phase_main(argv) -> int:
    """Entry of a phase subprocess: prints one JSON line."""
    p = argparse.ArgumentParser(prog="tinyzq.bench phase")
    p.add_argument("phase")
    p.add_argument("--model")
    p.add_argument("--engine", default="ours", choices=["ours", "fp32", "llama_cpp"])
    p.add_argument("--gguf")
    p.add_argument("--ids-json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-ctx", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    a.fp32 = a.engine == "fp32"
    if a.phase == "bandwidth":
        r = _phase_bandwidth(a)
    elif a.engine == "llama_cpp":
        import llama_cpp

        from .sysinfo import peak_rss_mb
        r = _phase_llama_run(llama_cpp, a.phase, a, peak_rss_mb)
    else:
        r = _phase_ours(a.phase, a)
    sys.stdout.write("\n" + json.dumps(r) + "\n")
    return 0


# ------------------------------------------------------------------------------ the driver
def _run_phase(phase: str, engine: str, opts: dict, threads: int, ids=None) -> dict:
    env = dict(os.environ)
    for var in ("TINYZQ_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, "-m", "tinyzq.bench", phase, "--engine", engine, "--threads", str(threads)]
    for k, v in opts.items():
        if v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    if ids is not None:
        cmd += ["--ids-json", json.dumps(ids)]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise TinyzqError(f"bench phase {phase} ({engine}) failed: {err}")
    return json.loads(lines[-1])


def _find_gguf(model_path: str, meta: dict, given: str | None):
    if given:
        if not os.path.isfile(given):
            raise TinyzqError(f"--gguf {given}: no such file")
        return given, None
    for cand in (meta.get("source"), model_path):
        if cand and os.path.isfile(cand) and cand.lower().endswith(".gguf"):
            return cand, None
    return None, "the model's source is not a GGUF file (give one with --gguf)"


def _many_row_product(meta: dict) -> str:
    """Which product our prefill/train-forward linears use (quant/packed.py PREFILL): int16 or fp32."""
    from .quant import packed

    bits, group = meta.get("bits"), meta.get("group")
    if bits not in (2, 3, 4, 8) or not group:
        return "fp32"  # a float model: no packed linears
    return "int16" if packed.use_gemm16(int(bits), int(group)) else "fp32"


def _summary(phases: dict) -> dict:
    s = {k: phases[p][k] for p, k in (("decode", "decode_tok_s"), ("prefill", "prefill_tok_s"),
                                       ("train_forward", "train_forward_tok_s")) if p in phases}
    s["peak_rss_mb"] = phases["decode"]["peak_rss_mb"] if "decode" in phases else None
    s["peak_rss_mb_by_phase"] = {p: r["peak_rss_mb"] for p, r in phases.items()}
    if "decode" in phases:
        s["weight_bytes_per_token"] = phases["decode"]["weight_bytes_per_token"]
        s["decode_tokens"] = phases["decode"].get("tokens")
    if "train_forward" in phases:
        s["train_forward_loss"] = phases["train_forward"]["train_forward_loss"]
    return s


def run(model: str, threads: int | None = None, repeats: int = 3, new_tokens: int = 128, prompt_tokens: int = 512,
        train_batch: int = 4, train_ctx: int = 512, references=("numpy_fp32", "llama_cpp"), gguf: str | None = None,
        progress=print) -> dict:
    """Run the benchmark; returns the result dict (see the module doc and README "Benchmarks")."""
    from . import api, kernels, sysinfo

    if not os.path.exists(model):
        raise TinyzqError(f"{model}: no such file or directory")
    threads = int(threads or kernels.get_threads())
    m = api.load(model)
    ctx = m.cfg.max_position_embeddings
    prompt_tokens = min(prompt_tokens, ctx)
    train_ctx = min(train_ctx, ctx)
    new_tokens = min(new_tokens, ctx - DECODE_PROMPT - 1)
    need = max(DECODE_PROMPT, prompt_tokens, train_batch * train_ctx)
    ids = _token_ids(m.tokenizer, need, m.cfg.vocab_size)
    meta = dict(m.meta)
    label = f"W{meta['bits']}g{meta['group']}" if meta.get("bits") else "float"
    del m
    opts = dict(model=os.path.abspath(model), new_tokens=new_tokens, prompt_tokens=prompt_tokens,
                train_batch=train_batch, train_ctx=train_ctx, repeats=repeats)
    mach = sysinfo.machine()
    mach["threads"] = threads
    res = {"model": os.path.abspath(model), "label": label, "bits": meta.get("bits"), "group": meta.get("group"),
           "machine": mach, "settings": {"threads": threads, "repeats": repeats, "decode_prompt_tokens": DECODE_PROMPT,
                                         "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                                         "train_batch": train_batch, "train_ctx": train_ctx,
                                         "many_row_product": _many_row_product(meta)}}
    t_start = time.perf_counter()
    res["loadavg_start"] = _loadavg()
    progress(f"bench {label} {model}: {threads} threads, best of {repeats}")
    bw = _run_phase("bandwidth", "ours", opts, threads)
    ours = {}
    for ph in PHASES:
        progress(f"  tinyzq {ph} ...")
        ours[ph] = _run_phase(ph, "ours", opts, threads)
    res.update(_summary(ours))
    res["bandwidth_gb_s"] = bw["bandwidth_gb_s"]
    res["bandwidth_buffer_mb"] = bw["bandwidth_buffer_mb"]
    res["decode_bandwidth_fraction"] = res["weight_bytes_per_token"] * res["decode_tok_s"] / (bw["bandwidth_gb_s"] * 1e9)
    res["reference"], res["ratios"] = {}, {}
    for ref in references:
        if ref == "numpy_fp32":
            phases = {}
            for ph in PHASES:
                progress(f"  numpy fp32 {ph} ...")
                phases[ph] = _run_phase(ph, "fp32", opts, threads)
        elif ref == "llama_cpp":
            path, why = _find_gguf(model, meta, gguf)
            if path is not None:
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    why = "llama-cpp-python is not installed (pip install 'tinyzq[bench]')"
            if why:
                res["reference"][ref] = {"skipped": why}
                progress(f"  llama.cpp skipped: {why}")
                continue
            phases = {}
            o = dict(opts, gguf=os.path.abspath(path), model=None)
            try:
                for ph in PHASES:
                    progress(f"  llama.cpp {ph} ...")
                    phases[ph] = _run_phase(ph, "llama_cpp", o, threads, ids)
            except TinyzqError as e:  # an optional reference: record why, keep our results
                res["reference"][ref] = {"skipped": f"failed: {e}"}
                progress(f"  llama.cpp failed: {e}")
                continue
        else:
            raise TinyzqError(f"unknown reference {ref!r}")
        r = _summary(phases)
        r["decode_bandwidth_fraction"] = r["weight_bytes_per_token"] * r["decode_tok_s"] / (bw["bandwidth_gb_s"] * 1e9)
        if ref == "llama_cpp":
            r["gguf"] = os.path.abspath(path)
            import llama_cpp

            r["version"] = getattr(llama_cpp, "__version__", None)
        res["reference"][ref] = r
        res["ratios"][ref] = {k: res[k] / r[k] for k in KEYS if res.get(k) and r.get(k)}
    res["seconds"] = time.perf_counter() - t_start
    res["loadavg_end"] = _loadavg()
    return res


def format_table(res: dict) -> str:
    rows = [(f"tinyzq {res['label']} ({res['machine']['isa']})", res)]
    names = {"numpy_fp32": "NumPy fp32 (same weights)", "llama_cpp": "llama.cpp (GGUF)"}
    for k, r in res["reference"].items():
        if "skipped" not in r:
            rows.append((names.get(k, k), r))
    w = max(len(n) for n, _ in rows)
    head = f"{'':{w}}  {'decode tok/s':>12}  {'prefill tok/s':>13}  {'train-fwd tok/s':>15}  {'peak RSS MiB':>12}  " \
           f"{'MB/token':>8}  {'BW used':>7}"
    lines = [head]
    for n, r in rows:
        lines.append(f"{n:{w}}  {r['decode_tok_s']:12.1f}  {r['prefill_tok_s']:13.1f}  {r['train_forward_tok_s']:15.1f}  "
                     f"{r['peak_rss_mb']:12.0f}  {r['weight_bytes_per_token'] / 1e6:8.1f}  "
                     f"{100 * r['decode_bandwidth_fraction']:6.0f}%")
    for k, rat in res["ratios"].items():
        lines.append(f"tinyzq / {names.get(k, k)}: " + ", ".join(f"{key.replace('_tok_s', '')} {v:.2f}x"
                                                                 for key, v in rat.items()))
    for k, r in res["reference"].items():
        if "skipped" in r:
            lines.append(f"{names.get(k, k)}: skipped ({r['skipped']})")
    lines.append(f"memory bandwidth (streaming read, {res['settings']['threads']} threads): "
                 f"{res['bandwidth_gb_s']:.1f} GB/s; decode reaches {100 * res['decode_bandwidth_fraction']:.0f}% of it "
                 f"(load average {res.get('loadavg_start')} -> {res.get('loadavg_end')})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_phase_main(sys.argv[1:]))
