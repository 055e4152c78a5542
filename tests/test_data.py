"""tinyzq.data: default corpus, train/validation split, reading text files, token windows."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyzq import data
from tinyzq.errors import TinyzqError

SETTINGS = settings(max_examples=50, deadline=None)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ default corpus
def test_default_text_is_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = data.default_text()
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000 and text.startswith(topics[sorted(topics)[0]])


def test_default_text_is_deterministic_across_processes():
    code = "import hashlib; from tinyzq import data; print(hashlib.sha256(data.default_text().encode()).hexdigest())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    import hashlib

    assert runs == {hashlib.sha256(data.default_text().encode()).hexdigest() + "\n"}


# ------------------------------------------------------------------------------ split
def test_split_default_corpus():
    text = data.default_text()
    train, val = data.split_text(text)
    assert train + "\n\n" + val == text  # contiguous: the head trains, the tail validates
    assert abs(len(val) / len(text) - 0.1) < 0.01
    assert data.split_text(text) == (train, val)  # deterministic


@SETTINGS
@given(paras=st.lists(st.text(alphabet="ab .\n", min_size=1, max_size=40), min_size=2, max_size=30),
       frac=st.floats(0.05, 0.5))
def test_split_is_contiguous_at_nearest_paragraph_boundary(paras, frac):
    text = "\n\n".join(paras)
    if len(text.strip()) < 2:
        with pytest.raises(TinyzqError):
            data.split_text(text, frac)
        return
    train, val = data.split_text(text, frac)
    assert train.strip() and val.strip()
    joined = [train + sep + val for sep in ("\n\n", "\n", "")]
    assert text in joined
    if text == train + "\n\n" + val:
        # no valid paragraph boundary is nearer to the target point
        target = round(len(text) * (1 - frac))
        p = len(train)
        for q in range(len(text) - 1):
            if text[q:q + 2] == "\n\n" and text[:q].strip() and text[q + 2:].strip():
                assert abs(p - target) <= abs(q - target)


def test_split_fallbacks_and_errors():
    assert data.split_text("line one\nline two", 0.5) == ("line one", "line two")
    tr, va = data.split_text("abcdefghij", 0.3)
    assert (tr, va) == ("abcdefg", "hij")
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(TinyzqError) as e:
            data.split_text("a\n\nb", bad)
        one_line(e)
    with pytest.raises(TinyzqError) as e:
        data.split_text(" x \n\n ")
    one_line(e)


# ------------------------------------------------------------------------------ read_text
def test_read_txt(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffhello\r\nwörld\n\nagain\n".encode())
    assert data.read_text(p) == "hello\nwörld\n\nagain\n"
    assert data.read_text(str(p)) == data.read_text(p)
    p2 = tmp_path / "notes"  # any other suffix is plain text
    p2.write_text("plain")
    assert data.read_text(p2) == "plain"


def test_read_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second\nline"}) + "\n")
    assert data.read_text(p) == "first\n\nsecond\nline"


def test_read_chat_jsonl(tmp_path):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(TinyzqError) as e:
        data.read_text(p)
    assert "line 1" in one_line(e) and "chat template" in one_line(e)

    def render(m):
        return "".join(f"<{x['role']}>{x['content']}" for x in m)

    assert data.read_text(p, render_chat=render) == "<user>hi<assistant>hello\n\nplain"

    def broken(m):
        raise KeyError("role")

    with pytest.raises(TinyzqError) as e:
        data.read_text(p, render_chat=broken)
    assert "line 1" in one_line(e)


@pytest.mark.parametrize("content, expect", [
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"ok text \xff\xfe more", "offset 8"),
])
def test_read_txt_errors(tmp_path, content, expect):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(TinyzqError) as e:
        data.read_text(p)
    msg = one_line(e)
    assert expect in msg and str(p) in msg


@pytest.mark.parametrize("lines, expect", [
    (['{"text": "a"}', "{not json"], "line 2"),
    (['{"text": "a"}', "", '{"body": "b"}'], "line 3"),
    (['["text"]'], "line 1"),
    (['{"text": 5}'], "line 1"),
    (['{"messages": "hi"}'], "line 1"),
    (["", "  "], "no records"),
])
def test_read_jsonl_errors(tmp_path, lines, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(TinyzqError) as e:
        data.read_text(p, render_chat=(lambda m: "x") if "messages" in lines[0] else None)
    msg = one_line(e)
    assert expect in msg and str(p) in msg


def test_read_missing_and_directory(tmp_path):
    with pytest.raises(TinyzqError) as e:
        data.read_text(tmp_path / "nope.txt")
    assert "not found" in one_line(e)
    with pytest.raises(TinyzqError) as e:
        data.read_text(tmp_path)
    assert "directory" in one_line(e)


# ------------------------------------------------------------------------------ windows
@SETTINGS
@given(n=st.integers(0, 500), ctx=st.integers(1, 64), max_windows=st.one_of(st.none(), st.integers(1, 20)),
       dtype=st.sampled_from([np.int32, np.int64, np.uint16]))
def test_windows_shapes_and_contents(n, ctx, max_windows, dtype):
    ids = (np.arange(n) * 7 % 1000).astype(dtype)
    if n < ctx:
        with pytest.raises(TinyzqError) as e:
            data.windows(ids, ctx, max_windows)
        msg = one_line(e)
        assert f"{n} tokens" in msg and str(ctx) in msg
        return
    w = data.windows(ids, ctx, max_windows)
    k = n // ctx if max_windows is None else min(n // ctx, max_windows)
    assert w.dtype == np.int32 and w.shape == (k, ctx) and w.flags.c_contiguous
    np.testing.assert_array_equal(w.ravel(), ids[:k * ctx])  # consecutive, non-overlapping, from the start
    w[:] = -1
    assert ids.min() >= 0  # a copy, not a view


def test_windows_accepts_lists_and_rejects_bad_input():
    np.testing.assert_array_equal(data.windows([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4]])
    for args in [([[1, 2], [3, 4]], 2), ([1.0, 2.0], 1), ([1, 2], 0), ([1, 2], 1, 0), ([-1, 2], 1),
                 ([], 4), (np.array([2**40]), 1)]:
        with pytest.raises(TinyzqError) as e:
            data.windows(*args)
        one_line(e)
