#!/usr/bin/env python3
"""GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants) -> float .tzq directory, tokenizer included.

    python convert/gguf_to_tzq.py model.gguf out.tzq [--dtype float16]

A thin wrapper over tinyzq.api.convert (same as `tinyzq convert`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import is_gguf, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], is_gguf))
