"""`tinyzq demo`, the README's main command, end to end on the bundled SmolLM2 with a small budget. Marked `real`."""
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.real


def test_demo_runs_the_whole_pipeline(smollm2_gguf, tmp_path):
    out = tmp_path / "demo-out"
    p = subprocess.run([sys.executable, "-m", "tinyzq", "demo", "--out", str(out), "--bits", "3", "--ctx", "128",
                        "--max-windows", "2", "-n", "8", "--train-minutes", "0.4", "--train-ctx", "128"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    for stage in ("1. convert", "2. float model", "3. quantize W3g64 (search)", "zeroth-order training", "summary"):
        assert stage in p.stdout, stage  # it says what it is doing at every stage

    rep = json.loads((out / "report.json").read_text())
    assert rep["source"] == smollm2_gguf
    names = [r["model"] for r in rep["results"]]
    assert names == ["float", "W3g64 search", "W3g64 search + ZO scales"]
    ppl = {r["model"]: r["ppl"] for r in rep["results"]}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["float"] < ppl["W3g64 search"]  # 3 bits cost perplexity on held-out text
    for r in rep["results"]:
        assert r["windows"] == 2 and set(r["answers"]) and all(isinstance(a, str) for a in r["answers"].values())
    t = rep["training"]
    assert t["bits"] == 3 and t["steps"] >= 1 and t["peak_rss_mb"] > 0
    assert t["ppl_before"] == ppl["W3g64 search"] and t["ppl_after"] == ppl["W3g64 search + ZO scales"]
    assert math.isclose(t["ppl_change_pct"], 100 * (t["ppl_after"] / t["ppl_before"] - 1))
    assert (out / "w3g64-trained" / "model").is_dir()  # the trained model is kept and loadable by path

    svg = ET.fromstring((out / "report.svg").read_text())
    assert svg.tag.endswith("svg")
    text = " ".join(e.text or "" for e in svg.iter() if e.tag.endswith("text"))
    assert "before / after" in text and f"{t['ppl_after']:.3f}" in text
