"""``paged-jax generate`` in-process on the bundled SmolLM2 with a small CPU engine.

One engine serves every test here (building one costs a model load and compiles): the first
successful ``LLM(...)`` is kept and handed back to later calls with the same arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

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

    # Input order, ids from the line, the line number (from 1) where there is none.
    # Malformed JSON (line 3) and a non-object (line 12): no readable id, so the line number.
    assert [r["id"] for r in results] == [
        "paris", "chat", "3", "cold", "extra", "long", "both", "9", "7", "bad_ids", "12"
    ]  # fmt: skip
    assert results[7]["id"] == str(NO_ID_LINE + 1)  # its line number, from 1

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


# ----------------------------------------------------------------------------- n > 1 and beams

PARIS = "The capital of France is"


def _engine(shared_engine):
    """The SmolLM2 engine that every ``_run`` shares."""
    (llm,) = [x for x in shared_engine.values() if x.config.model == "smollm2-135m"]
    return llm


def test_n_line_writes_every_completion_in_order(tmp_path, capsys, shared_engine):
    from paged_jax import SamplingParams
    from paged_jax.engine.sequence import completion_seed

    lines = [
        (
            {"id": "two", "prompt": PARIS, "n": 2, "seed": 5, "max_tokens": 6, "ignore_eos": True},
            "text",
        ),  # fmt: skip
        (
            {
                "id": "one",
                "prompt": PARIS,
                "seed": completion_seed(5, 1),
                "max_tokens": 6,
                "ignore_eos": True,
            },
            "text",
        ),  # fmt: skip
        ({"id": "greedy3", "prompt": "Hello", "n": 3, "temperature": 0, "max_tokens": 4}, "text"),
    ]
    code, results, summary, captured = _run(tmp_path, capsys, lines, "--quiet")
    assert code == 0, captured.err
    two, one, greedy3 = results
    assert [r["id"] for r in results] == ["two", "one", "greedy3"]
    assert set(two) == {"id", "text", "token_ids", "finish_reason", "outputs"}
    assert "outputs" not in one
    assert len(two["outputs"]) == 2
    for c in two["outputs"]:
        assert set(c) == {"text", "token_ids", "finish_reason"}
        assert len(c["token_ids"]) == 6 and c["finish_reason"] == "length"
    assert {k: two[k] for k in ("text", "token_ids", "finish_reason")} == two["outputs"][0]
    # In order: completion 1 is the lone request seeded like it.
    assert two["outputs"][1]["token_ids"] == one["token_ids"]
    assert two["outputs"][1]["text"] == one["text"]
    assert two["outputs"][0]["token_ids"] != two["outputs"][1]["token_ids"]
    (want,) = _engine(shared_engine).generate(
        PARIS, SamplingParams(n=2, seed=5, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert [c["token_ids"] for c in two["outputs"]] == [c.token_ids for c in want.outputs]
    assert [c["text"] for c in two["outputs"]] == [c.text for c in want.outputs]
    assert len(greedy3["outputs"]) == 3
    assert all(c == greedy3["outputs"][0] for c in greedy3["outputs"])
    # Every completion's tokens are counted.
    assert summary["output_tokens"] == 2 * 6 + 6 + sum(
        len(c["token_ids"]) for c in greedy3["outputs"]
    )


def _check_beams(r, width):
    assert set(r) == {"id", "text", "token_ids", "beams"}, r
    assert len(r["beams"]) == width
    for b in r["beams"]:
        assert set(b) == {"text", "token_ids", "score"}
    scores = [b["score"] for b in r["beams"]]
    assert scores == sorted(scores, reverse=True)
    assert (r["text"], r["token_ids"]) == (r["beams"][0]["text"], r["beams"][0]["token_ids"])


def test_beam_line_writes_beams_best_first(tmp_path, capsys, shared_engine):
    from paged_jax.engine.beam import BeamSearchParams

    lines = [
        ({"id": "beam", "prompt": PARIS, "beam_width": 2, "max_tokens": 5}, "beams"),
        ({"id": "hot", "prompt": PARIS, "beam_width": 2, "temperature": 0.5}, "temperature"),
        ({"id": "n", "prompt": PARIS, "beam_width": 2, "n": 2}, "'n'"),
        ({"id": "wide", "prompt": PARIS, "beam_width": 0}, "beam_width"),
        ({"id": "plain", "prompt": PARIS, "temperature": 0, "max_tokens": 3}, "text"),
        (
            {
                "id": "beam2",
                "prompt_token_ids": [100, 200, 300],
                "beam_width": 2,
                "max_tokens": 3,
                "ignore_eos": True,
            },
            "beams",
        ),  # fmt: skip
    ]
    code, results, summary, captured = _run(tmp_path, capsys, lines, "--quiet")
    assert code == 0, captured.err
    assert [r["id"] for r in results] == [x["id"] for x, _ in lines]
    for (_, want), r in zip(lines, results, strict=True):
        if want == "beams":
            _check_beams(r, 2)
        elif want == "text":
            assert set(r) == {"id", "text", "token_ids", "finish_reason"}, r
        else:
            assert set(r) == {"id", "error"} and want in r["error"], r
    assert "beam search" in results[1]["error"]
    assert (summary["requests"], summary["errors"]) == (3, 3)
    llm = _engine(shared_engine)
    (want,) = llm.beam_search(PARIS, BeamSearchParams(beam_width=2, max_tokens=5), use_tqdm=False)
    assert [b["token_ids"] for b in results[0]["beams"]] == [s.token_ids for s in want.sequences]
    assert [b["text"] for b in results[0]["beams"]] == [s.text for s in want.sequences]
    assert all(len(b["token_ids"]) == 3 for b in results[5]["beams"])  # ignore_eos


def test_beam_width_flag_applies_to_every_line(tmp_path, capsys, shared_engine):
    lines = [
        ({"id": "a", "prompt": PARIS, "max_tokens": 4}, "beams"),
        ({"id": "b", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}, "beams"),
        ({"id": "own", "prompt": "Hello", "beam_width": 3, "max_tokens": 3}, 3),
        ({"id": "hot", "prompt": "Hello", "temperature": 0.5}, "temperature"),
    ]
    code, results, summary, captured = _run(tmp_path, capsys, lines, "--quiet",
                                            "--beam-width", "2")  # fmt: skip
    assert code == 0, captured.err
    a, b, own, hot = results
    _check_beams(a, 2)
    _check_beams(b, 2)
    assert all(len(x["token_ids"]) == 3 for x in b["beams"])
    _check_beams(own, 3)  # a line's own beam_width wins over the flag
    assert set(hot) == {"id", "error"} and "temperature" in hot["error"]
    assert (summary["requests"], summary["errors"]) == (3, 1)


def test_n_above_max_num_seqs_is_a_line_error(tmp_path, capsys, shared_engine):
    lines = [
        ({"id": "ok", "prompt": PARIS, "temperature": 0, "max_tokens": 2}, "text"),
        ({"id": "many", "prompt": PARIS, "n": 5}, "max_num_seqs"),  # SMALL: max_num_seqs=4
    ]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", "smollm2-135m", "--input", str(inp), "--output", str(out)]
    code = main([*argv, "--quiet", *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert "text" in results[0] and "max_num_seqs" in results[1]["error"]


def test_tokenizerless_model_line_needs_detokenize_false(tmp_path, capsys, shared_engine):
    lines = [
        (
            {"id": "ok", "prompt_token_ids": [1, 2, 3], "max_tokens": 2, "detokenize": False},
            "text",
        ),  # fmt: skip
        ({"id": "detok", "prompt_token_ids": [1, 2, 3], "max_tokens": 2}, "detokenize"),
    ]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--model",
        "random:tiny",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--quiet",
        "dtype=float32",
        "max_model_len=32",
        "num_pages=8",
        "warmup=false",
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert "token_ids" in results[0] and "detokenize" in results[1]["error"]


def test_json_extraction_example(tmp_path, capsys, shared_engine):
    """examples/extract.jsonl through the CLI: every record parses and fits its schema; a line
    with an unsatisfiable schema is an error for that line only; logprobs, prompt_logprobs and
    stop_reason are written when a line asks for them."""
    import jsonschema  # a dev dependency the GPU image lacks: import here

    example = Path(__file__).parent.parent / "examples" / "extract.jsonl"
    records = [json.loads(x) for x in example.read_text().splitlines()]
    bad = {
        **records[0],
        "id": "impossible",
        "structured_outputs": {"json": {"type": "integer", "minimum": 2, "maximum": 1}},
    }
    scored = {
        "id": "scored",
        "prompt": "The capital of France is",
        "temperature": 0,
        "max_tokens": 4,
        "logprobs": 2,
        "prompt_logprobs": 1,
        "stop": ["\n"],
    }
    lines = [(r, "text") for r in records] + [(bad, "unsatisfiable"), (scored, "text")]
    code, results, summary, captured = _run(tmp_path, capsys, lines, "--quiet")
    assert code == 0, captured.err
    for record, r in zip(records, results, strict=False):
        assert r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["text"]), record["structured_outputs"]["json"])
    assert results[0]["id"] == "ada" and json.loads(results[0]["text"])["name"] == "Ada Lovelace"
    assert "unsatisfiable" in results[-2]["error"]
    r = results[-1]
    assert len(r["logprobs"]) == len(r["token_ids"]) and "stop_reason" in r
    first = r["logprobs"][0][str(r["token_ids"][0])]
    assert first["rank"] == 1 and first["decoded_token"] == " Paris"  # greedy: the top token
    chosen = [e[str(t)]["logprob"] for e, t in zip(r["logprobs"], r["token_ids"], strict=True)]
    assert abs(r["cumulative_logprob"] - sum(chosen)) < 1e-4
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == 5
    assert summary["errors"] == 1


# ----------------------------------------------------------------------------- found by new users


def test_line_separators_inside_a_string_keep_one_line(tmp_path, capsys, shared_engine):
    # U+2028, U+2029 and NEL are text inside a JSON string (str.splitlines would split there)
    sep = '{"id": "sep", "prompt": "Hello\u2028world\u2029 and\x85 more", "max_tokens": 2}'
    code, results, summary, captured = _run(tmp_path, capsys, [(sep, "text")], "--quiet")
    assert code == 0, captured.err
    assert [r["id"] for r in results] == ["sep"] and "text" in results[0], results
    assert summary["errors"] == 0


def test_repeated_id_is_the_later_lines_error(tmp_path, capsys, shared_engine):
    line = {"id": "a", "prompt": "Hello", "max_tokens": 2}
    code, results, _, captured = _run(tmp_path, capsys, [(line, "text"), (line, "id")], "--quiet")
    assert code == 0, captured.err
    assert results[0]["id"] == "a" and "text" in results[0]
    assert results[1] == {"id": "a (line 2)", "error": "line 2: id 'a' is also line 1's"}


def test_bad_output_fails_before_the_model_loads(tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    # a model that does not exist: had it been loaded first, that would be the error
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--input", str(inp)]
    assert main([*argv, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output ") and "is a directory" in err, err


def test_version_and_plain_help(capsys):
    from paged_jax import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"paged-jax {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "generate" in out and "--version" in out
