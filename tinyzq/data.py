"""Text -> token windows: the default corpus, reading text files, a train/validation split, windows.

- `default_text()`: Python's own help topics (`pydoc_data.topics.topics`), values joined with a blank
  line in sorted key order: ~465 K characters of English technical prose that every Python has, so the
  default corpus needs no download and is identical on every machine with the same Python version.
- `split_text(text, val_fraction)`: a contiguous split at the paragraph boundary ("\\n\\n") nearest to
  the (1 − val_fraction) point: the head trains, the tail validates. Never shuffled, so no training
  window overlaps a validation window.
- `read_text(path)`: UTF-8 `.txt` (any other suffix is read as plain text too), or `.jsonl` with a
  "text" field per line (records joined with a blank line); chat records ("messages") need a
  `render_chat(messages) -> str` callable (a tokenizer's chat template).
- `windows(ids, ctx, max_windows)`: non-overlapping windows of `ctx` tokens from the start; the
  incomplete tail is dropped.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from .errors import TinyzqError

PARAGRAPH = "\n\n"


@lru_cache(maxsize=1)
def default_text() -> str:
    """The default corpus: `pydoc_data.topics.topics` values, sorted by key, joined with "\\n\\n"."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise TinyzqError("the default corpus needs Python's pydoc_data module, which this Python lacks; "
                          "pass a text file instead") from None
    return PARAGRAPH.join(topics[k] for k in sorted(topics))


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last ~val_fraction of `text` (in characters) is validation.

    The cut is the paragraph boundary "\\n\\n" nearest to the (1 − val_fraction) point, and
    `train + "\\n\\n" + val == text`. Without any usable paragraph boundary the cut falls back to the
    nearest line break (`train + "\\n" + val == text`), then to the exact character position
    (`train + val == text`). Both parts are non-empty.
    """
    if not isinstance(text, str):
        raise TinyzqError(f"split_text: expected a str, got {type(text).__name__}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise TinyzqError(f"the validation fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    if len(text.strip()) < 2:
        raise TinyzqError(f"the text is too short to split into training and validation parts "
                          f"({len(text)} characters)")
    target = int(round(len(text) * (1.0 - float(val_fraction))))
    first = len(text) - len(text.lstrip())  # first non-whitespace character
    last = len(text.rstrip()) - 1  # last one
    for sep in (PARAGRAPH, "\n"):
        # boundaries that leave non-blank text on both sides; the nearest to the target wins
        ok = [m.start() for m in re.finditer(f"(?={re.escape(sep)})", text)
              if first < m.start() and m.start() + len(sep) <= last]
        if ok:
            p = min(ok, key=lambda q: (abs(q - target), q))
            return text[:p], text[p + len(sep):]
    target = min(max(target, first + 1), last)
    return text[:target], text[target:]


def _decode(path: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinyzqError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte offset {e.start})") \
            from None
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark
        text = text[1:]
    return text.replace("\r\n", "\n")


def _jsonl_records(path: str, text: str, render_chat: Callable[[list], str] | None) -> list[str]:
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinyzqError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise TinyzqError(f'{path} line {n}: expected a JSON object with a "text" field, '
                              f"got {type(rec).__name__}")
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise TinyzqError(f'{path} line {n}: "text" must be a string, got {type(rec["text"]).__name__}')
            out.append(rec["text"])
        elif "messages" in rec:
            if render_chat is None:
                raise TinyzqError(f'{path} line {n}: chat records ("messages") need a tokenizer chat template to '
                                  f'become text; give plain "text" records, or render them with the model\'s template')
            msgs = rec["messages"]
            if not isinstance(msgs, list):
                raise TinyzqError(f'{path} line {n}: "messages" must be a list of {{"role", "content"}} objects')
            try:
                rendered = render_chat(msgs)
            except TinyzqError as e:
                raise TinyzqError(f"{path} line {n}: {e}") from None
            except Exception as e:  # a template error: name the record, keep one line
                raise TinyzqError(f"{path} line {n}: cannot render the chat messages ({type(e).__name__}: {e})") \
                    from None
            if not isinstance(rendered, str):
                raise TinyzqError(f"{path} line {n}: the chat renderer returned {type(rendered).__name__}, not text")
            out.append(rendered)
        else:
            keys = ", ".join(map(str, list(rec)[:8])) or "none"
            raise TinyzqError(f'{path} line {n}: no "text" field (keys: {keys})')
    return out


def read_text(path, render_chat: Callable[[list], str] | None = None) -> str:
    """The text of a UTF-8 text file, or of a `.jsonl` file's "text" records joined with "\\n\\n".

    Line endings are normalised to "\\n" and a UTF-8 byte order mark is dropped. `render_chat`
    turns a jsonl record's "messages" list into text (e.g. a tokenizer's chat template).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TinyzqError(f"{path}: file not found")
    if os.path.isdir(path):
        raise TinyzqError(f"{path}: is a directory; expected a .txt or .jsonl file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TinyzqError(f"{path}: cannot read ({e.strerror or e})") from None
    text = _decode(path, raw)
    if path.lower().endswith(".jsonl"):
        records = _jsonl_records(path, text, render_chat)
        if not records:
            raise TinyzqError(f"{path}: no records (the file is empty or has only blank lines)")
        text = PARAGRAPH.join(records)
    if not text.strip():
        raise TinyzqError(f"{path}: no text (empty or whitespace only)")
    return text


def windows(ids: np.ndarray | Sequence[int], ctx: int, max_windows: int | None = None) -> np.ndarray:
    """int32 [n, ctx]: consecutive non-overlapping windows of `ctx` tokens from the start of `ids`.

    The incomplete tail is dropped; n = min(len(ids) // ctx, max_windows). A new array (not a view).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise TinyzqError(f"token ids must be a 1-D sequence, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TinyzqError(f"token ids must be integers, got dtype {ids.dtype}")
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 1:
        raise TinyzqError(f"the context length must be a positive integer, not {ctx!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, (int, np.integer))
                                    or max_windows < 1):
        raise TinyzqError(f"the number of windows must be a positive integer (or None for all), not {max_windows!r}")
    ctx = int(ctx)
    n = len(ids) // ctx
    if n == 0:
        raise TinyzqError(f"the text has {len(ids)} tokens, but one window of ctx={ctx} needs {ctx}; "
                          f"use a longer text or a smaller context")
    if max_windows is not None:
        n = min(n, int(max_windows))
    ids = ids[: n * ctx]
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise TinyzqError(f"token ids must be in [0, 2^31), got values in [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32).reshape(n, ctx)  # astype copies


__all__ = ["default_text", "split_text", "read_text", "windows"]
