"""Batch jobs that survive a kill: ``paged-jax generate`` writes each result as it finishes and
``--resume`` serves only the lines not in ``--output`` yet. A real subprocess is SIGKILLed
half-way and started again; the result file must then hold every input line exactly once, in
input order, equal to an uninterrupted run's. Plus the result file's own rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paged_jax.io.jsonl import ResultFile, decode_lines, json_objects, split_lines

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["max_model_len=64", "max_num_seqs=2", "max_num_batched_tokens=32", "num_pages=64",
          "warmup=false"]  # fmt: skip
NUM_LINES = 30


def job_lines() -> list[bytes]:
    lines = []
    for i in range(NUM_LINES):
        record = {"id": f"r{i}", "prompt_token_ids": [1 + i, 2 + i, 3], "max_tokens": 12,
                  "ignore_eos": True, "detokenize": False}  # fmt: skip
        record.update({"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i})
        lines.append(json.dumps(record).encode())
    lines[4] = b'{"id": "bad-utf8", "prompt_token_ids": [1], "x": "\xff"}'  # its line's error
    lines[9] = json.dumps({"id": "cold", "prompt_token_ids": [1], "temperature": -1}).encode()
    return lines


def start(inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "paged_jax.cli", "generate", "--model", "random:tiny",
            "--input", str(inp), "--output", str(out), "--quiet", *extra, *ENGINE]  # fmt: skip
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    return log


def complete_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_bytes().split(b"\n")[:-1]]


def test_killed_job_resumes_with_every_line_once_in_input_order(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(job_lines()) + b"\n")
    want_ids = [f"r{i}" for i in range(NUM_LINES)]
    want_ids[4], want_ids[9] = "5", "cold"  # a line that is not UTF-8 is known by its number
    # The uninterrupted run, alongside the one to be killed.
    whole = start(inp, tmp_path / "whole.jsonl")
    out = tmp_path / "out.jsonl"
    killed = start(inp, out)
    deadline = time.monotonic() + 240
    while len(complete_lines(out)) < 8:  # results appear one by one as requests finish
        assert killed.poll() is None, killed.communicate()[0].decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    partial = complete_lines(out)
    assert 8 <= len(partial) < NUM_LINES, len(partial)
    assert len({r["id"] for r in partial}) == len(partial)
    log = finish(start(inp, out, "--resume"))
    summary = json.loads(log.split("summary ")[-1])
    assert summary["resumed"] == len(partial)
    finish(whole)
    got, expected = complete_lines(out), complete_lines(tmp_path / "whole.jsonl")
    assert [r["id"] for r in got] == want_ids == [r["id"] for r in expected]
    assert got == expected
    assert got[4]["error"].endswith(":5: not UTF-8 (byte 0xff at column 51)")
    assert "temperature" in got[9]["error"]
    assert all(len(r["token_ids"]) == 12 for r in got if "error" not in r)


def test_result_file_drops_a_cut_line_and_sorts_at_the_end(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    f = ResultFile(path)  # creates the folder
    f.write({"id": "b", "text": "B"})
    f.write({"id": "a", "text": "A"})
    with pytest.raises(ValueError, match="'a' written twice"):
        f.write({"id": "a", "text": "again"})
    f.close()
    path.write_bytes(path.read_bytes() + b'{"id": "c", "te')  # a kill in mid-write
    f = ResultFile(path, resume=True)
    assert "a" in f and "b" in f and "c" not in f and f.num_resumed == 2
    f.write({"id": "c", "text": "C\u2028D"})
    f.finish(["a", "b", "c"])
    assert [r["id"] for r in complete_lines(path)] == ["a", "b", "c"]
    assert complete_lines(path)[2]["text"] == "C\u2028D"
    f = ResultFile(path)  # without resume: starts empty
    assert len(f) == 0 and path.read_bytes() == b""
    f.close()


def test_result_file_checks_the_path_first(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        ResultFile(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        ResultFile(tmp_path / "file" / "out.jsonl")  # a file where a folder must be


def test_lines_split_on_newline_only():
    text = '{"a": "x\u2028y\u2029z\x85w"}\r\n{"a": 2}\n\n'
    assert split_lines(text) == ['{"a": "x\u2028y\u2029z\x85w"}', '{"a": 2}', ""]
    assert [n for n, _ in json_objects(text, "f")] == [1, 2]
    lines = list(decode_lines(b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}', "in.jsonl"))
    assert lines[0] == (1, '{"a": 1}') and lines[2] == (3, '{"a": 3}')
    assert isinstance(lines[1][1], ValueError)
    assert str(lines[1][1]) == "in.jsonl:2: not UTF-8 (byte 0xff at column 8)"
