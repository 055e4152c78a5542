"""Shared body of the convert/ scripts: argument parsing and one-line errors around tinyzq.api.convert."""
from __future__ import annotations

import argparse
import os
import sys


def run(description: str, check, argv=None) -> int:
    """`check(src) -> str | None` rejects a source of the wrong kind with a message."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("src")
    p.add_argument("out", help="output .tzq directory (written atomically)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = p.parse_args(argv)
    from tinyzq.api import convert
    from tinyzq.errors import TinyzqError

    try:
        problem = check(args.src)
        if problem:
            raise TinyzqError(f"{args.src}: {problem}")
        info = convert(args.src, args.out, dtype=args.dtype)
    except (TinyzqError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({info['params'] / 1e6:.1f} M parameters, {args.dtype})")
    return 0


def is_hf_dir(path: str) -> str | None:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return "not a Hugging Face model directory (no config.json)"
    if os.path.exists(path) and not os.path.isdir(path):
        return "not a directory; use gguf_to_tzq.py for a GGUF file"
    return None


def is_gguf(path: str) -> str | None:
    if os.path.isdir(path):
        return "is a directory; use hf_to_tzq.py for a Hugging Face model directory"
    return None
