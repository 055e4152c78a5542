#!/usr/bin/env python3
"""Hugging Face model directory (config.json, *.safetensors, tokenizer.json) -> float .tzq directory.

    python convert/hf_to_tzq.py path/to/hf_model out.tzq [--dtype float16]

A thin wrapper over tinyzq.api.convert (same as `tinyzq convert`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import is_hf_dir, run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], is_hf_dir))
