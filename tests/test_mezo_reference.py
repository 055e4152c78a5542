"""tests/mezo_reference.py (the issue-5 step-time benchmark against PyTorch MeZO) runs, and both sides
score the same function: the PyTorch model built from the packed model's dequantized weights gives
tinyzq's loss on the same windows."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mezo_reference_runs_and_losses_agree(tiny_w3, tmp_path):
    out = tmp_path / "mezo.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "mezo_reference.py"), tiny_w3, "--batch", "2", "--ctx", "32",
                        "--steps", "2", "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["zo_step_s"] > 0 and res["mezo_torch_step_s"] > 0
    assert res["ratio"] == pytest.approx(res["zo_step_s"] / res["mezo_torch_step_s"])
    assert abs(res["loss_ours"] - res["loss_torch"]) <= 1e-4 * abs(res["loss_torch"])
    assert "ZO step" in r.stdout
