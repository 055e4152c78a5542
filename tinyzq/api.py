"""The public Python API: load / convert / quantize, and a Model with generate, stream, perplexity, score.

Everything the CLI does is a call here, so an app can do it in three lines.
"""
from __future__ import annotations

import os
import time
from typing import Iterator

import numpy as np

from .errors import TinyzqError
from .model import FloatLinear, Transformer, is_block_linear, weight_shapes

EMBED_BITS, EMBED_GROUP = 8, 32  # embeddings / lm_head stay 8-bit: they are 21% of SmolLM2 and sensitive


class Model:
    """A loaded model (float or packed) with its tokenizer."""

    def __init__(self, cfg, tokenizer, weights: dict, meta: dict | None = None, path: str | None = None):
        self.cfg, self.tokenizer, self.weights = cfg, tokenizer, weights
        self.meta = meta or {}
        self.path = path
        self.net = Transformer(cfg, weights)

    # --- text in, text out ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.tokenizer.chat_template:
                raise TinyzqError("this model has no chat template; drop --chat")
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        if self.tokenizer.add_bos and self.tokenizer.bos_id is not None and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        if not ids:
            raise TinyzqError("the prompt is empty")
        return ids

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, chat: bool = False, repeat_penalty: float = 1.0,
               repeat_last_n: int = 64) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (repeat_penalty 1 = none; > 1 makes the
        last repeat_last_n tokens, −1 = all, less likely: CTRL's penalty, as in llama.cpp)."""
        from .generate import generate_ids, stream_text

        ids = self.encode_prompt(prompt, chat)
        if len(ids) >= self.cfg.max_position_embeddings:
            raise TinyzqError(f"the prompt has {len(ids)} tokens; the model's context is {self.cfg.max_position_embeddings}")
        gen = generate_ids(self.net, ids, max_new_tokens, temperature, top_p, seed, stop_ids=self.tokenizer.eos_ids,
                           repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
        yield from stream_text(self.tokenizer, gen)

    def generate(self, prompt: str, max_new_tokens: int = 128, **kw) -> str:
        return "".join(self.stream(prompt, max_new_tokens, **kw))

    # --- scoring ----------------------------------------------------------------------------------
    def perplexity(self, text: str, ctx: int = 512, max_windows: int | None = 64, batch: int = 4,
                   progress: bool = False) -> dict:
        """Perplexity by the protocol of tinyzq.evaluate (non-overlapping windows, no carried context)."""
        from .evaluate import perplexity

        return perplexity(self.net, self.tokenizer.encode(text), ctx, max_windows, batch, progress)

    def score(self, texts: list[str]) -> list[float]:
        """Summed next-token NLL (nats) of each text, scored on its own."""
        out = []
        for t in texts:
            ids = self.tokenizer.encode(t)
            out.append(self.net.sequence_nll(np.asarray(ids)[None])[0] if len(ids) > 1 else 0.0)
        return out

    def score_tasks(self, tasks, limit: int | None = None, max_length: int | None = None, progress: bool = False,
                    details: bool = False, reuse_cache: bool = True) -> dict:
        """Zero-shot multiple-choice accuracy (lm-evaluation-harness rules, see tinyzq.tasks).

        `tasks`: a task JSONL path, or a list of items in that format. `limit`: first N items per task.
        `max_length`: context window (default: the model's). Returns per-task and mean acc/acc_norm."""
        from .tasks import as_items, limit_items, score_items

        items = limit_items(as_items(tasks), limit)
        return score_items(self.net, self.tokenizer, items, max_length, reuse_cache, progress, details)

    # --- facts --------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(getattr(w, "nbytes", 0) for w in self.weights.values())

    def describe(self) -> dict:
        from .quant.packed import PackedLinear

        packed = [w for w in self.weights.values() if isinstance(w, PackedLinear)]
        n_params = sum(int(np.prod(s)) for s in weight_shapes(self.cfg).values())
        return {"arch": self.cfg.arch, "layers": self.cfg.num_hidden_layers, "hidden": self.cfg.hidden_size,
                "params": n_params, "bits": self.meta.get("bits"), "group": self.meta.get("group"),
                "method": self.meta.get("method"), "packed_tensors": len(packed), "weight_mb": self.nbytes / 2**20}

    def save(self, path: str, scale_dtype: str = "float16") -> None:
        from .io import checkpoint

        meta = {k: v for k, v in self.meta.items() if k not in ("format", "version", "tensors", "scale_dtype", "float_dtype", "scheme")}
        checkpoint.save(path, self.cfg, self.tokenizer, self.weights, meta, scale_dtype=scale_dtype)


# --- opening sources ---------------------------------------------------------------------------------
def _float_weights(cfg, get) -> dict:
    """Assemble Transformer weights from a getter of fp32 arrays by Hugging Face name."""
    shapes = weight_shapes(cfg)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            continue
        if len(shape) == 2:
            bias = name[: -len("weight")] + "bias"
            weights[name] = FloatLinear(get(name), get(bias) if bias in shapes else None)
        else:
            weights[name] = np.ascontiguousarray(get(name), dtype=np.float32)
    return weights


def _check_path(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TinyzqError(f"{path}: no such file or directory")
    return path


def load(path: str) -> Model:
    """Open a `.tzq` directory, a GGUF file or a Hugging Face model directory."""
    from .io import checkpoint

    path = _check_path(path)
    if not checkpoint.is_tzq_dir(path) and checkpoint.is_tzq_dir(os.path.join(path, "model")):
        path = os.path.join(path, "model")  # a `tinyzq train` run directory: its trained model
    if checkpoint.is_tzq_dir(path):
        cfg, tok, weights, meta = checkpoint.load(path)
        return Model(cfg, tok, weights, meta, path)
    src = _open_source(path)
    return Model(src.config, src.tokenizer, _float_weights(src.config, src.get), {"source": os.path.abspath(path)}, path)


def _open_source(path: str):
    from .io import open_source

    return open_source(path)


def convert(src: str, out: str, dtype: str = "float32") -> dict:
    """GGUF / HF directory -> float `.tzq` directory."""
    src = _check_path(src)
    m = load(src)
    if m.meta.get("tensors"):
        raise TinyzqError(f"{src}: already a quantized tinyzq model; convert takes a GGUF file or a Hugging Face directory")
    from .io import checkpoint

    checkpoint.save(out, m.cfg, m.tokenizer, m.weights, {"source": os.path.abspath(src)}, float_dtype=dtype)
    return {"out": out, "params": m.describe()["params"]}


def calibrate(model: "Model | str", text: str | None = None, windows: int | None = None,
              ctx: int | None = None, progress: bool = False) -> dict:
    """Mean x² per input channel of every decoder linear (the `x_stats` of the search quantizer),
    from a float forward over `windows` windows of `text` (default: the default corpus's training split,
    never its validation slice)."""
    from .data import default_text, split_text
    from .quant.calibrate import CALIB_CTX, CALIB_WINDOWS, calib_windows, collect_x_stats

    m = load(model) if isinstance(model, (str, os.PathLike)) else model
    if text is None:
        text = split_text(default_text())[0]
    if not text.strip():
        raise TinyzqError("the calibration text is empty")
    ctx = min(ctx or CALIB_CTX, m.cfg.max_position_embeddings)
    wins = calib_windows(m.tokenizer.encode(text), ctx, windows or CALIB_WINDOWS)
    return collect_x_stats(m.net, wins, progress)


def calib_token_windows(m: "Model", text: str | None = None, windows: int | None = None,
                        tokens: int | None = None, ctx: int | None = None):
    """Calibration windows [N, ctx] of `text` (default: the default corpus's training split): `tokens`
    tokens (rounded down to whole windows; a text shorter than one window is used whole) or `windows`
    windows, spread evenly over the text. Default 8 windows of 512 tokens."""
    from .data import default_text, split_text
    from .quant.calibrate import CALIB_CTX, CALIB_WINDOWS, calib_windows

    if text is None:
        text = split_text(default_text())[0]
    if not text.strip():
        raise TinyzqError("the calibration text is empty")
    ctx = min(ctx or CALIB_CTX, m.cfg.max_position_embeddings)
    if tokens is not None:
        if tokens < 16:
            raise TinyzqError(f"--calib-tokens must be at least 16, not {tokens}")
        ctx = min(ctx, int(tokens))
        windows = max(1, int(tokens) // ctx)
    return calib_windows(m.tokenizer.encode(text), ctx, windows or CALIB_WINDOWS)


def quantize(src: str, out: str | None, bits: int, group: int = 64, method: str = "search",
             progress: bool = True, calib_text: str | None = None, calib_windows: int | None = None,
             x_stats: dict | None = None, calib_tokens: int | None = None, options: dict | None = None,
             calib_file: str | None = None) -> Model:
    """Quantize the decoder linears of SRC (GGUF / HF dir / float .tzq) to `bits`; embeddings/lm_head to 8 bits.

    `method`: rtn, search, awq, gptq, blockzo or a '+' combination (tinyzq.quant.blockwise). Calibrated
    methods run block by block on calibration text (`calib_text`, default the default corpus's training
    split, or the file `calib_file`: .txt, .jsonl with "text", or chat .jsonl rendered with SRC's chat
    template; `calib_tokens` tokens or `calib_windows` windows of 512). `search` with precomputed `x_stats`
    (from `calibrate`) uses those float-model statistics instead. `options`: keyword options for the
    block-wise driver (gptq_options, awq_options, blockzo_options). Returns the quantized Model; writes it
    to `out` when given.
    """
    from tqdm import tqdm

    from .quant import quantizer
    from .quant.calibrate import collect_x_stats
    from .quant.packed import PackedLinear

    if bits not in (2, 3, 4, 8):
        raise TinyzqError(f"--bits must be 2, 3, 4 or 8, not {bits}")
    from .quant.blockwise import parse_method

    method = parse_method(method).name  # one-line error for unknown methods; canonical spelling
    # `search` alone keeps the float-forward statistics (one forward, then every linear independently: the
    # fast default); every other calibrated method runs block by block (tinyzq.quant.blockwise)
    blockwise = method not in ("rtn", "search")
    m = load(src)
    if m.meta.get("tensors"):
        raise TinyzqError(f"{src}: already quantized ({m.meta.get('bits')}-bit); quantize from the float source")
    if calib_file is not None:
        if calib_text is not None:
            raise TinyzqError("give calib_text or calib_file, not both")
        from .data import read_text

        calib_text = read_text(calib_file, render_chat=m.tokenizer.chat_renderer())
    cfg = m.cfg
    for name, shape in weight_shapes(cfg).items():  # check every width before spending minutes
        if is_block_linear(name):
            quantizer.check_group(shape[1], group, name)
    t0 = time.perf_counter()
    calib, blocks = None, None
    if blockwise:
        from .quant.blockwise import quantize_blocks

        wins = calib_token_windows(m, calib_text, calib_windows, calib_tokens)
        blocks = quantize_blocks(m.net, wins, bits, group, method, progress=progress, **(options or {}))["blocks"]
        calib = ("default corpus (train split)" if calib_text is None else "user text") + \
            f", {wins.size} tokens, block-wise"
        x_stats = None
    elif method == "search" and x_stats is None:
        x_stats = calibrate(m, calib_text, calib_windows, progress=progress) if calib_tokens is None else \
            collect_x_stats(m.net, calib_token_windows(m, calib_text, tokens=calib_tokens), progress)
        calib = "default corpus (train split)" if calib_text is None else "user text"
    elif method == "search":
        calib = "given x_stats"
    names = [n for n, w in m.weights.items() if isinstance(w, FloatLinear)]
    for name in tqdm(names, desc=f"quantize W{bits}g{group} {method}", unit="tensor", disable=not progress,
                     leave=False, dynamic_ncols=True):
        lin = m.weights[name]
        if is_block_linear(name):
            b, g, meth = bits, group, method
            xs = x_stats.get(name) if (x_stats and method == "search") else None
        else:  # embeddings and an untied lm_head: 8-bit RTN
            b, g, meth, xs = EMBED_BITS, EMBED_GROUP, "rtn", None
            quantizer.check_group(lin.in_features, g, name)
        q, s, z = quantizer.quantize(lin.weight, b, g, method=meth, x_stats=xs, name=name)
        # scales/zeros are stored as fp16: round them now so the returned model is the saved model
        s, z = s.astype(np.float16).astype(np.float32), z.astype(np.float16).astype(np.float32)
        m.weights[name] = PackedLinear.from_codes(q, s, z, b, g, bias=lin.bias)
        del lin, q
    meta = {"bits": bits, "group": group, "method": method, "embed_bits": EMBED_BITS, "embed_group": EMBED_GROUP,
            "source": os.path.abspath(src), "calibration": calib, "quantize_seconds": round(time.perf_counter() - t0, 2)}
    if blocks is not None:  # per-block notes of the block-wise methods (awq's alpha, blockzo's losses) for quant.json
        meta["blocks"] = blocks
    qm = Model(cfg, m.tokenizer, m.weights, meta, out)
    if out is not None:
        from .io import checkpoint

        qm.save(out)
        qm.meta = checkpoint.read_quant_json(out)
    return qm


def train(model: "Model | str", out: str, steps: int | None = None, minutes: float | None = None,
          train: str = "scales", resume: bool = False, progress: bool = True, **options) -> dict:
    """Zeroth-order QAT of a packed model (forward passes only) into the run directory `out`.

    `train`: 'scales' (per-group scales/zeros + norms), 'qv' or 'latent'; `options`: the fields of
    tinyzq.train.TrainConfig (lr, eps, n_dirs, estimator, dist, schedule, warmup, clip, normalize,
    layers_per_step, layers_per_dir, directions, gains, batch, ctx, seed, eval_every, val_windows, save_every, text,
    teacher, kd_topk, kd_alpha).
    The trained model is `out/model` (`tinyzq.load(out)` opens it). Returns the report dict."""
    from .train import run

    return run(model, out, resume=resume, progress=progress, steps=steps, minutes=minutes, train=train, **options)
