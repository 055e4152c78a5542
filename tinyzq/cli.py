"""`tinyzq` command line: a thin layer over tinyzq.api. User mistakes are one-line errors (exit 2)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from .errors import TinyzqError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def parse(v):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
        return x
    return parse


def _nonneg(kind):
    def parse(v):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
        if x < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
        return x
    return parse


def write_json(path: str, obj) -> None:
    from .io.atomic import atomic_file

    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _eval_text(args):
    """The evaluation text: --text FILE, or the default corpus's validation slice."""
    from . import data

    if args.text:
        return data.read_text(args.text), args.text
    return data.split_text(data.default_text())[1], "default corpus (pydoc_data.topics), validation slice"


# --- subcommands -------------------------------------------------------------------------------------
def cmd_info(args):
    from . import kernels

    print(f"isa: {kernels.isa()}  (available: {', '.join(kernels.available_isas())}; force with TINYZQ_ISA)")
    print(f"threads: {kernels.get_threads()}  (set with TINYZQ_THREADS)")
    from .quant import packed

    prod = "int16 activations (gemm16)" if packed.use_gemm16(4, 64) else "fp32 BLAS on dequantized weights"
    print(f"many-row product: {prod}  (TINYZQ_PREFILL={packed.PREFILL}; auto, fp32 or int16)")
    feats = kernels.cpu_features()
    print("cpu features: " + (" ".join(k for k, v in sorted(feats.items()) if v) or "none"))
    if args.model:
        from .api import load

        for k, v in load(args.model).describe().items():
            print(f"{k}: {v}")


def cmd_convert(args):
    from .api import convert

    info = convert(args.src, args.out, dtype=args.dtype)
    print(f"wrote {args.out} ({info['params'] / 1e6:.1f} M parameters, {args.dtype})")


def cmd_quantize(args):
    from .api import quantize
    from .errors import TinyzqError

    if args.calib_tokens is not None and args.calib_windows is not None:
        raise TinyzqError("give --calib-tokens or --calib-windows, not both")
    from .quant.blockwise import parse_method

    plan, options = parse_method(args.method), {}
    if args.damp is not None or args.act_order:
        if not plan.base.startswith("gptq"):
            raise TinyzqError(f"--damp and --act-order apply to the gptq methods, not --method {args.method}")
        gopts = {"act_order": bool(args.act_order)}
        if args.damp is not None:
            gopts["damp"] = args.damp
        options["gptq_options"] = gopts
    if args.blockzo_steps is not None:
        if not plan.blockzo:
            raise TinyzqError(f"--blockzo-steps applies to the blockzo methods, not --method {args.method}")
        options["blockzo_options"] = {"steps": args.blockzo_steps}
    m = quantize(args.src, args.out, args.bits, args.group, args.method, calib_file=args.calib,
                 calib_windows=args.calib_windows, calib_tokens=args.calib_tokens, options=options or None)
    d = m.describe()
    print(f"wrote {args.out}: W{args.bits}g{args.group} {m.meta.get('method')}, {d['packed_tensors']} packed tensors, "
          f"{d['weight_mb']:.1f} MiB of weights, embeddings/lm_head 8-bit g32 "
          f"({m.meta.get('quantize_seconds')} s)")
    zo = [b["blockzo"] for b in m.meta.get("blocks") or [] if "blockzo" in b]
    if zo:
        gains = [100.0 * (1.0 - b["loss_after"] / b["loss_before"]) for b in zo if b["loss_before"] > 0]
        print(f"blockzo: lowered the block output error in {sum(b['kept'] for b in zo)} of {len(zo)} blocks "
              f"(median {statistics.median(gains) if gains else 0.0:.1f}%, largest {max(gains, default=0.0):.1f}%); "
              f"per-block losses in {args.out}/quant.json")


def cmd_eval(args):
    """Perplexity (--text, or the default corpus when no --tasks) and/or task accuracy (--tasks)."""
    from . import api

    items = None
    if args.tasks:  # a malformed task file fails before the model is loaded
        from .tasks import read_tasks

        items = read_tasks(args.tasks)
    m = api.load(args.model)
    r = {"model": args.model}
    if args.text or not args.tasks:  # --tasks alone scores only the tasks
        text, label = _eval_text(args)
        r.update(m.perplexity(text, ctx=args.ctx, max_windows=args.max_windows, batch=args.batch, progress=True))
        r["text"] = label
        print(f"ppl {r['ppl']:.4f}  ({r['windows']} windows x {r['ctx']} tokens, {r['tokens_per_s']:.0f} tok/s, "
              f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB)")
    if args.tasks:
        from .tasks import format_table

        a = m.score_tasks(items, limit=args.limit, progress=True)
        print(format_table(a))
        print(f"({a['items']} items, {a['options']} options, {a['items_per_s']:.2f} items/s, {a['seconds']:.1f} s, "
              f"peak RSS {a['peak_rss_mb']:.0f} MiB)")
        if "ppl" not in r:
            r.update({"seconds": a["seconds"]})
        r.update({"tasks_file": args.tasks, "limit": args.limit, "tasks": a["tasks"], "mean": a["mean"],
                  "items": a["items"], "options": a["options"], "truncated_items": a["truncated_items"],
                  "context_window": a["context_window"], "tasks_seconds": a["seconds"],
                  "items_per_s": a["items_per_s"], "peak_rss_mb": a["peak_rss_mb"]})
    if args.json:
        write_json(args.json, r)


def cmd_generate(args):
    from . import api

    m = api.load(args.model)
    for piece in m.stream(args.prompt, args.n, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          chat=args.chat, repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _gains(items):
    """--gain PART=X (repeatable) -> {part: X}; values are checked by the training config."""
    out = {}
    for it in items or []:
        part, sep, val = it.partition("=")
        if not sep:
            raise TinyzqError(f"--gain {it!r}: expected PART=X, e.g. --gain norms=4")
        try:
            out[part.strip()] = float(val)
        except ValueError:
            raise TinyzqError(f"--gain {it!r}: {val!r} is not a number") from None
    return out or None


def cmd_train(args):
    from . import api

    opts = {k: getattr(args, k) for k in ("lr", "eps", "n_dirs", "estimator", "dist", "schedule", "warmup", "clip", "layers_per_step", "layers_per_dir",
                                          "directions", "batch", "ctx", "seed", "eval_every", "val_windows", "save_every", "text",
                                          "teacher", "kd_topk", "kd_alpha")}
    opts["normalize"] = not args.raw_gradient
    opts["gains"] = _gains(args.gain)
    if args.resume:  # the run's own settings are kept; only the budget may change
        opts = {}
    elif not os.path.exists(args.model):
        raise TinyzqError(f"{args.model}: no such file or directory")
    r = api.train(args.model, args.out, steps=args.steps, minutes=args.minutes, train=args.train, resume=args.resume,
                  **opts)
    print(f"validation ppl {r['val_ppl_before']:.4f} -> {r['val_ppl_after']:.4f} after {r['steps']} steps "
          f"({r['train']}); trained model: {os.path.join(args.out, 'model')}; log, report.json and report.svg "
          f"in {args.out}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args)


def cmd_bench(args):
    from . import bench

    refs = [r for r, off in (("numpy_fp32", args.no_numpy), ("llama_cpp", args.no_llama_cpp)) if not off]
    res = bench.run(args.model, threads=args.threads, repeats=args.repeats, new_tokens=args.new_tokens,
                    prompt_tokens=args.prompt_tokens, train_batch=args.train_batch, train_ctx=args.train_ctx,
                    references=refs, gguf=args.gguf, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bench.format_table(res))
    if args.json:
        write_json(args.json, res)


def _bench_quality(argv) -> int:
    """`tinyzq bench quality ...`: a command with its own parser (tinyzq/bench_quality.py)."""
    from . import bench_quality

    return int(bench_quality.main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tinyzq", description="Run and train 2/3/4-bit LLMs on CPUs (NumPy + C kernels, no torch).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="CPU features, chosen kernel path, and a model's facts")
    s.add_argument("model", nargs="?")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="GGUF file or Hugging Face directory -> float .tzq directory")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("quantize", help="quantize decoder linears to 2/3/4 bits (embeddings 8-bit)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--bits", type=int, choices=[2, 3, 4, 8], required=True)
    s.add_argument("--group", type=_positive(int), default=64)
    s.add_argument("--method", default="search",
                   help="rtn | search | awq | gptq | blockzo, or a '+' combination such as awq+gptq, gptq+search, "
                        "awq+search, gptq+blockzo (default: search)")
    s.add_argument("--calib", metavar="FILE", help="calibration text for the calibrated methods (.txt/.jsonl; "
                   "default: the default corpus's training split)")
    s.add_argument("--calib-tokens", type=_positive(int), default=None, metavar="N",
                   help="tokens of calibration text, in windows of 512 (default 4096)")
    s.add_argument("--calib-windows", type=_positive(int), default=None,
                   help="windows of 512 tokens of calibration text (default 8)")
    s.add_argument("--damp", type=_positive(float), default=None, metavar="F",
                   help="gptq: damping added to the diagonal of XᵀX, as a fraction of its mean (default 0.3; the "
                        "paper's 0.01 fits the calibration text too closely); larger values trust it less")
    s.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns by decreasing XᵀX diagonal (group params fixed up front)")
    s.add_argument("--blockzo-steps", type=_positive(int), default=None, metavar="N",
                   help="blockzo: ZO steps per decoder block (default 64; time grows linearly)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity on a text (documented protocol) and/or accuracy on multiple-choice tasks")
    s.add_argument("model")
    s.add_argument("--text", help="UTF-8 .txt or .jsonl with a 'text' field (default: the default corpus's validation slice)")
    s.add_argument("--ctx", type=_positive(int), default=512)
    s.add_argument("--max-windows", type=_positive(int), default=64)
    s.add_argument("--batch", type=_positive(int), default=4, help="windows per forward pass")
    s.add_argument("--tasks", metavar="FILE.jsonl", help="zero-shot multiple-choice tasks to score (acc, acc_norm); "
                   "without --text only the tasks are scored")
    s.add_argument("--limit", type=_positive(int), default=None, help="score the first N items of each task")
    s.add_argument("--json", help="also write the result to this JSON file")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="stream a completion (temperature 0 = greedy, deterministic)")
    s.add_argument("model")
    s.add_argument("--prompt", required=True)
    s.add_argument("-n", type=_positive(int), default=128, help="new tokens at most")
    s.add_argument("--temperature", type=_nonneg(float), default=0.0)
    s.add_argument("--top-p", type=_positive(float), default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--repeat-penalty", type=_positive(float), default=1.0,
                   help="> 1 makes recent tokens less likely (1 = off; 1.1-1.3 stops small models looping)")
    s.add_argument("--repeat-last-n", type=int, default=64,
                   help="how many recent tokens (prompt included) the penalty sees; -1 = all")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("train", help="zeroth-order QAT of a packed model (forward passes only)")
    s.add_argument("model", help="packed .tzq model (from tinyzq quantize)")
    s.add_argument("out", help="run directory: model/, checkpoint/, log.jsonl, report.json, report.svg")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--steps", type=_nonneg(int), help="number of ZO steps")
    b.add_argument("--minutes", type=_positive(float), help="time budget instead of a number of steps")
    s.add_argument("--train", choices=["scales", "qv", "latent"], default="scales",
                   help="what is trained: scales (per-group scales/zeros + norms; default), qv (fp Q/V projections), "
                        "latent (fp latent weights + learnable clipping, re-quantized every forward)")
    s.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-3 scales, 1e-5 qv/latent per direction, times --n-dirs, "
                        "times sqrt(layer slots / --layers-per-dir))")
    s.add_argument("--eps", type=float, default=1e-3, help="perturbation size (relative for scales/norms)")
    s.add_argument("--n-dirs", type=_positive(int), default=None,
                   help="random directions averaged per step (default: 8 with --estimator forward, 1 with central)")
    s.add_argument("--estimator", choices=["forward", "central"], default="forward",
                   help="forward (default): the --n-dirs directions of a step share one unperturbed pass, "
                        "g = (L+ - L0)/eps, K+1 passes instead of 2K; central: two passes per direction, "
                        "g = (L+ - L-)/2eps")
    s.add_argument("--dist", choices=["gaussian", "rademacher"], default="gaussian")
    s.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine",
                   help="lr schedule; linear and cosine decay to 0 over --steps or the --minutes budget (default cosine)")
    s.add_argument("--warmup", type=_nonneg(int), default=0, help="linear warm-up steps")
    s.add_argument("--clip", type=_positive(float), default=3.0,
                   help="clip the projected gradient at CLIP x its running RMS (absolute with --raw-gradient)")
    s.add_argument("--raw-gradient", action="store_true",
                   help="use the raw projected gradient instead of normalising by its running RMS")
    s.add_argument("--layers-per-step", type=_nonneg(int), default=0,
                   help="perturb a random subset of this many decoder layers per step (0 = all)")
    s.add_argument("--layers-per-dir", type=_nonneg(int), default=None,
                   help="with --estimator forward: every direction perturbs its own random subset of this many "
                        "layer slots (decoder layers and the final norm) and its pass resumes from the shared "
                        "unperturbed pass below them (default 0 = all layers)")
    s.add_argument("--directions", choices=["dense", "rowcol"], default="dense",
                   help="random directions: dense (every value its own draw) or rowcol (a 2-D tensor's z is a "
                        "per-row plus a per-column draw: far fewer dimensions per direction)")
    s.add_argument("--gain", action="append", metavar="PART=X",
                   help="scale the random directions on one part of the trainable set by X (repeatable; parts: "
                        "scales, zeros, norms, final_norm, latent, weights; default 1): the expected update "
                        "there is X^2 times the gradient, a diagonal preconditioner")
    s.add_argument("--text", metavar="FILE", help=".txt, .jsonl with 'text', or chat .jsonl with 'messages' "
                   "(default: the default corpus); split 90/10 into training/validation")
    s.add_argument("--ctx", type=_positive(int), default=512)
    s.add_argument("--batch", type=_positive(int), default=2, help="windows per step")
    s.add_argument("--seed", type=_nonneg(int), default=0)
    s.add_argument("--eval-every", type=_nonneg(int), default=100, help="validation every N steps (0: start/end)")
    s.add_argument("--val-windows", type=_positive(int), default=64)
    s.add_argument("--save-every", type=_positive(int), default=50, help="checkpoint every N steps")
    s.add_argument("--resume", action="store_true", help="continue the run in OUT exactly where its checkpoint is")
    s.add_argument("--teacher", metavar="SRC", help="float model for knowledge distillation (top-k cached on disk)")
    s.add_argument("--kd-topk", type=_positive(int), default=16)
    s.add_argument("--kd-alpha", type=float, default=0.5, help="loss = (1-a) CE + a KL(teacher top-k || student)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("bench", help="decode/prefill/train-forward speed, peak RSS and memory bandwidth, with NumPy "
                       "fp32 and llama.cpp references measured in the same run (`bench quality SRC ...`: quality)")
    s.add_argument("model", help="a .tzq model directory (or GGUF / HF dir)")
    s.add_argument("--threads", type=_positive(int), default=None, help="threads (default: TINYZQ_THREADS or all cores)")
    s.add_argument("--json", help="also write the results to this JSON file (atomically)")
    s.add_argument("--repeats", type=_positive(int), default=3, help="best of this many runs per phase (default 3)")
    s.add_argument("--new-tokens", type=_positive(int), default=128, help="decoded tokens (default 128)")
    s.add_argument("--prompt-tokens", type=_positive(int), default=512, help="prefill prompt length (default 512)")
    s.add_argument("--train-batch", type=_positive(int), default=4, help="training-forward windows (default 4)")
    s.add_argument("--train-ctx", type=_positive(int), default=512, help="training-forward window length (default 512)")
    s.add_argument("--gguf", help="GGUF for the llama.cpp reference (default: the model's source, if a GGUF)")
    s.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp reference")
    s.add_argument("--no-numpy", action="store_true", help="skip the NumPy fp32 reference")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="the whole pipeline on the bundled SmolLM2-135M and the default text")
    s.add_argument("--out", default="demo-out")
    s.add_argument("--model", help="GGUF / HF dir to use instead of the bundled SmolLM2")
    s.add_argument("--bits", default="4,3,2", help="comma-separated bit widths (default 4,3,2)")
    s.add_argument("--group", type=_positive(int), default=64)
    s.add_argument("--method", default="search")
    s.add_argument("--ctx", type=_positive(int), default=512)
    s.add_argument("--max-windows", type=_positive(int), default=64)
    s.add_argument("-n", type=_positive(int), default=48, help="new tokens per answer")
    s.add_argument("--train-minutes", type=_nonneg(float), default=12.0,
                   help="zeroth-order training budget for the W3 model (0 = skip training; default 12)")
    s.add_argument("--train-batch", type=_positive(int), default=2, help="windows per training step (default 2)")
    s.add_argument("--train-ctx", type=_positive(int), default=256,
                   help="tokens per training window (default 256: twice the steps of 512 in the same time)")
    s.add_argument("--train-lr", type=_positive(float), default=None, help="training learning rate (default: tinyzq train's)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:2] == ["bench", "quality"]:  # a separate command with its own parser (tinyzq/bench_quality.py)
            return _bench_quality(argv[2:])
        args = build_parser().parse_args(argv)
        args.func(args)
    except TinyzqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:  # disk full, permissions, invalid values reaching the kernels
        if os.environ.get("TINYZQ_DEBUG"):
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
