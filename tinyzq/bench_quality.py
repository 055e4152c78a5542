"""`tinyzq bench quality SRC [--bits …] [--groups …] [--methods …] --json OUT`: bits vs perplexity.

For every (bits, group, method) cell, and for the float model, a fresh subprocess loads SRC, quantizes
it (calibration text: --calib FILE, default the default corpus's training split; --calib-tokens N) and
measures the perplexity of the validation text (--text FILE, default the default corpus's validation
slice; the protocol of tinyzq.evaluate: --ctx, --max-windows). Each cell's quantization time (wall and
CPU) and peak RSS are its own process's (ru_maxrss right after quantizing: load + quantize, before
the evaluation). Writes JSON (machine, settings, float ppl, cells with ppl/float ratio) and an SVG of
bits per weight (codes + fp16 scale and zero per group) vs perplexity, log y, one line per method.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .errors import TinyzqError

DEFAULT_METHODS = "rtn,search,awq,gptq,awq+gptq"


def bits_per_weight(bits: int, group: int) -> float:
    """Storage of a decoder-linear weight: its code plus its share of one fp16 scale and one fp16 zero."""
    return bits + 32.0 / group


def _ints(s: str, what: str, allowed=None) -> list[int]:
    try:
        vals = [int(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise TinyzqError(f"--{what} must be comma-separated integers, not {s!r}") from None
    if not vals:
        raise TinyzqError(f"--{what} is empty")
    if allowed is not None and any(v not in allowed for v in vals):
        raise TinyzqError(f"--{what} entries must be among {', '.join(map(str, allowed))} (got {s})")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="float model: GGUF file, Hugging Face directory or float .tzq")
    p.add_argument("--bits", default="4,3,2", help="comma-separated bit widths (default 4,3,2)")
    p.add_argument("--groups", default="64", help="comma-separated group sizes (default 64)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods, each possibly a '+' combination (default {DEFAULT_METHODS})")
    p.add_argument("--text", help="validation text (.txt/.jsonl; default: the default corpus's validation slice)")
    p.add_argument("--calib", metavar="FILE", help="calibration text (default: the default corpus's training split)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N", help="calibration tokens (default 4096)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--json", required=True, metavar="OUT", help="write the results here (and OUT's .svg chart)")
    p.add_argument("--svg", default=None, help="chart path (default: the --json path with .svg)")


def _cell(spec: dict) -> dict:
    """Runs in a fresh process: load / quantize / evaluate one cell."""
    from . import api, data
    from .sysinfo import peak_rss_mb

    t0, c0 = time.perf_counter(), time.process_time()
    if spec["method"] == "float":
        m = api.load(spec["src"])
    else:
        m = api.quantize(spec["src"], None, spec["bits"], spec["group"], spec["method"], progress=False,
                         calib_file=spec.get("calib"), calib_tokens=spec.get("calib_tokens"))
    out = {"quantize_seconds": time.perf_counter() - t0, "quantize_cpu_seconds": time.process_time() - c0,
           "peak_rss_mb": peak_rss_mb()}
    text = data.read_text(spec["text"]) if spec.get("text") else data.split_text(data.default_text())[1]
    r = m.perplexity(text, ctx=spec["ctx"], max_windows=spec["max_windows"], progress=False)
    out.update({"ppl": r["ppl"], "nll": r["nll"], "eval_windows": r["windows"], "eval_seconds": r["seconds"]})
    return out


def _worker() -> None:
    """Entry of the cell subprocess: a JSON spec on stdin, one JSON line on stdout."""
    spec = json.loads(sys.stdin.read())
    try:
        res = _cell(spec)
    except TinyzqError as e:
        res = {"error": str(e)}
    sys.stdout.write("\n" + json.dumps(res) + "\n")


def _run_cell(spec: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", "from tinyzq.bench_quality import _worker; _worker()"],
                       input=json.dumps(spec), capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode != 0 or not lines:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise TinyzqError(f"bench quality: the {spec['method']} W{spec['bits']}g{spec['group']} cell failed: {last}")
    res = json.loads(lines[-1])
    if "error" in res:
        raise TinyzqError(res["error"])
    return res


def run(args) -> dict:
    from .cli import write_json
    from .plot import line_chart, write_svg
    from .quant.blockwise import parse_method
    from .sysinfo import machine

    bits = _ints(args.bits, "bits", (2, 3, 4, 8))
    groups = _ints(args.groups, "groups")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods:
        raise TinyzqError("--methods is empty")
    methods = [parse_method(m).name for m in methods]  # one-line error for unknown names, before any work
    for path, opt in ((args.src, "SRC"), (args.text, "--text"), (args.calib, "--calib")):
        if path is not None and not os.path.exists(path):
            raise TinyzqError(f"{path}: no such file or directory ({opt})")
    if args.text:
        from .data import read_text

        read_text(args.text)  # fail fast on an unreadable text
    if args.calib:
        from .data import read_text

        read_text(args.calib, render_chat=lambda msgs: "-")  # fail fast; each cell renders chat with SRC's template
    if args.ctx < 2 or args.max_windows < 1:
        raise TinyzqError("--ctx must be >= 2 and --max-windows >= 1")
    base = {"src": os.path.abspath(args.src), "text": args.text and os.path.abspath(args.text),
            "calib": args.calib and os.path.abspath(args.calib), "calib_tokens": args.calib_tokens,
            "ctx": args.ctx, "max_windows": args.max_windows}
    t_all = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say("bench quality: float")
    flt = _run_cell({**base, "method": "float", "bits": None, "group": None})
    say(f"  float ppl {flt['ppl']:.3f}")
    cells = []
    for g in groups:
        for b in bits:
            for meth in methods:
                say(f"bench quality: W{b}g{g} {meth}")
                r = _run_cell({**base, "method": meth, "bits": b, "group": g})
                r.update({"bits": b, "group": g, "method": meth, "bits_per_weight": bits_per_weight(b, g),
                          "ppl_ratio": r["ppl"] / flt["ppl"]})
                say(f"  ppl {r['ppl']:.3f} ({r['ppl_ratio']:.3f}x float), quantized in {r['quantize_seconds']:.1f} s "
                    f"(cpu {r['quantize_cpu_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MiB")
                cells.append(r)
    res = {"benchmark": "quality", "machine": machine(), "settings": {
        **{k: v for k, v in base.items()}, "bits": bits, "groups": groups, "methods": methods,
        "text_label": args.text or "default corpus (pydoc_data.topics), validation slice",
        "calib_label": args.calib or "default corpus, training split"},
        "float": flt, "cells": cells, "seconds": time.perf_counter() - t_all}
    write_json(args.json, res)
    series = {}
    for c in cells:
        label = c["method"] if len(groups) == 1 else f"{c['method']} g{c['group']}"
        series.setdefault(label, []).append((c["bits_per_weight"], c["ppl"]))
    xs = [c["bits_per_weight"] for c in cells] or [0.0, 1.0]
    series["float"] = [(min(xs), flt["ppl"]), (max(xs), flt["ppl"])]
    svg_path = args.svg or (os.path.splitext(args.json)[0] + ".svg")
    write_svg(svg_path, line_chart({k: sorted(v) for k, v in series.items()},
                                   f"perplexity vs bits per weight ({os.path.basename(args.src)})",
                                   "bits per weight (codes + fp16 scale/zero per group)", "perplexity (log)",
                                   logy=True))
    print(format_table(res))
    return res


def format_table(res: dict) -> str:
    cells = res["cells"]
    cols = sorted({(c["bits"], c["group"]) for c in cells}, key=lambda t: (-t[0], t[1]))
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["method"], c["bits"], c["group"]): c for c in cells}
    head = "| method | " + " | ".join(f"W{b}g{g}" for b, g in cols) + " |"
    lines = [f"float ppl {res['float']['ppl']:.3f}", head, "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        row = []
        for b, g in cols:
            c = by.get((m, b, g))
            row.append("" if c is None else f"{c['ppl']:.3f} ({c['quantize_seconds']:.0f} s, {c['peak_rss_mb']:.0f} MiB)")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse `tinyzq bench quality` arguments and run; errors propagate to tinyzq.cli.main, which turns
    them into one-line messages and exit codes for every command alike."""
    from .cli import _Parser

    p = _Parser(prog="tinyzq bench quality",
                description="perplexity of every (bits, group, method) cell plus float; JSON + SVG")
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["bench", "quality", *sys.argv[1:]]))
