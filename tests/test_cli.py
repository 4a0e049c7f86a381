"""``paged-jax generate`` in-process on the bundled SmolLM2 with a small CPU engine.

One engine serves every test here (building one costs a model load and compiles): the first
successful ``LLM(...)`` is kept and handed back to later calls with the same arguments.
"""

from __future__ import annotations

import json

import pytest

import paged_jax.llm as llm_module
from paged_jax.cli import main

SMALL = [
    "max_model_len=128",
    "max_num_seqs=4",
    "max_num_batched_tokens=32",
    "num_pages=64",
    "warmup=false",
]

# (record or raw line, what the output line must hold): "text" for a served line, or the
# substring its error must contain. None: a blank line, skipped.
LINES = [
    (
        {"id": "paris", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 6},
        "text",
    ),
    ({"id": "chat", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}, "text"),
    ('{"id": "broken", "prompt": "unterminated', "JSON"),
    ({"id": "cold", "prompt": "Hello", "temperature": -1}, "temperature"),
    ({"id": "extra", "prompt": "Hello", "colour": "blue"}, "colour"),
    ({"id": "long", "prompt": "word " * 300}, "max_model_len"),
    ({"id": "both", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, "prompt"),
    ("   ", None),
    ({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 4, "ignore_eos": True}, "text"),
    ({"id": 7, "prompt_token_ids": [100, 200, 300], "max_tokens": 3, "ignore_eos": True}, "text"),
    ({"id": "bad_ids", "prompt_token_ids": [1, 10**9]}, "prompt_token_ids"),
    ("[1, 2, 3]", "JSON object"),
]
NO_ID_LINE = 8  # file line index (0-based, the blank line counted) of the line without an id


@pytest.fixture(scope="module")
def shared_engine(smollm2_gguf):
    """Patch ``paged_jax.llm.LLM`` so equal constructions share one engine."""
    real = llm_module.LLM
    built: dict[str, object] = {}

    def make(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in built:
            built[key] = real(*args, **kwargs)  # may raise (bad config): nothing is kept
        return built[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_module, "LLM", make)
        yield built


def _write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x, _ in lines) + "\n")
    return path


def _run(tmp_path, capsys, lines, *extra):
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "sub" / "out.jsonl"  # a missing folder is created
    argv = ["generate", "--model", "smollm2-135m", "--input", str(inp), "--output", str(out)]
    code = main([*argv, *extra, *SMALL])
    captured = capsys.readouterr()
    results = [json.loads(x) for x in out.read_text().splitlines()]
    summaries = [x for x in captured.out.splitlines() if x.startswith("summary ")]
    assert len(summaries) == 1, captured.out
    return code, results, json.loads(summaries[0].removeprefix("summary ")), captured


def test_generate_every_line_kind(tmp_path, capsys, shared_engine):
    code, results, summary, captured = _run(tmp_path, capsys, LINES, "--print", "--quiet")
    assert code == 0, captured.err
    expected = [(i, x, want) for i, (x, want) in enumerate(LINES) if want is not None]
    assert len(results) == len(expected) == 11

    # Input order, ids from the line, the line index where there is none.
    # Malformed JSON (line 2) and a non-object (line 11): no readable id, so the line index.
    assert [r["id"] for r in results] == [
        "paris", "chat", "2", "cold", "extra", "long", "both", "8", "7", "bad_ids", "11"
    ]  # fmt: skip
    assert results[7]["id"] == str(NO_ID_LINE)

    served = errors = 0
    for (_, record, want), r in zip(expected, results, strict=True):
        if want == "text":
            served += 1
            assert set(r) == {"id", "text", "token_ids", "finish_reason"}, r
            assert r["finish_reason"] in ("stop", "length")
            assert 1 <= len(r["token_ids"]) <= record["max_tokens"]
            assert all(isinstance(t, int) for t in r["token_ids"])
            if record.get("ignore_eos"):
                assert len(r["token_ids"]) == record["max_tokens"]
                assert r["finish_reason"] == "length"
        else:
            errors += 1
            assert set(r) == {"id", "error"}, r
            assert want in r["error"], r
    assert results[0]["text"].startswith(" Paris"), results[0]
    assert results[1]["text"].strip(), results[1]  # the chat line got an answer
    assert "unknown field" in results[4]["error"]

    assert (summary["requests"], summary["errors"]) == (served, errors) == (4, 7)
    assert summary["output_tokens"] == sum(len(r.get("token_ids", [])) for r in results)
    for key in ("output_tok_s", "preemptions", "kv_utilization", "compiles_after_warmup"):
        assert key in summary, summary
    assert summary["output_tok_s"] > 0
    assert summary["preemptions"] >= 0 and 0 < summary["kv_utilization"] <= 1

    # --print: one block per output line, errors marked.
    assert captured.out.count("--- ") == len(results)
    assert "--- paris\n" + results[0]["text"] in captured.out
    assert f"--- extra\nERROR: {results[4]['error']}" in captured.out


def test_every_line_bad_still_writes_output(tmp_path, capsys, shared_engine):
    lines = [(x, want) for x, want in LINES if want not in ("text", None)]
    code, results, summary, captured = _run(tmp_path, capsys, lines, "--quiet")
    assert code == 0, captured.err
    assert [want in r["error"] for r, (_, want) in zip(results, lines, strict=True)] == [
        True
    ] * len(lines)
    assert (summary["requests"], summary["errors"], summary["output_tokens"]) == (
        0,
        len(lines),
        0,
    )


def test_blank_input_writes_empty_output(tmp_path, capsys, shared_engine):
    code, results, summary, _ = _run(tmp_path, capsys, [("", None), ("  ", None)], "--quiet")
    assert (code, results, summary["requests"], summary["errors"]) == (0, [], 0, 0)


def test_unknown_config_key_returns_2(tmp_path, capsys, shared_engine):
    inp = _write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--input", str(inp), "--output", str(out), "page_sise=8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "page_sise" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_config_file_returns_2(tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    config = tmp_path / "c.yaml"
    config.write_text("page_size: 8\npage_size: 16\n")
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "page_size" in err and "twice" in err


def test_missing_input_returns_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(missing), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.jsonl" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_input_is_a_directory_returns_2(tmp_path, capsys):
    assert main(["generate", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--output", "out.jsonl"])
    assert e.value.code == 2
    assert "--input" in capsys.readouterr().err
