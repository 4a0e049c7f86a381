"""Data parallel ``paged-jax generate``: 2 CPU processes joined by ``jax.distributed`` on
127.0.0.1, each serving every other input line, must write the same merged file as one process
(every line once, in input order, the bad line still reported); plus the pieces on their own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from paged_jax import distributed

ROOT = Path(__file__).resolve().parents[1]
ENGINE = [
    "page_size=4",
    "num_pages=64",
    "max_model_len=64",
    "max_num_seqs=8",
    "max_num_batched_tokens=16",
    "warmup=false",
]


def _lines() -> list[str]:
    greedy = {"max_tokens": 6, "temperature": 0.0, "detokenize": False}
    lines = [
        json.dumps({"prompt_token_ids": [1 + i, 7, 30 + 3 * i][: 2 + i % 2], **greedy})
        for i in range(5)
    ]
    lines.insert(2, "")  # blank: no output line
    lines.insert(4, '{"prompt_token_ids": [1, 2], "max_tokens": 0}')  # bad: max_tokens
    lines.append(
        json.dumps(
            {
                "id": "s",
                "prompt_token_ids": [9, 9],
                "seed": 5,
                "n": 2,
                "max_tokens": 4,
                "detokenize": False,
            }
        )
    )
    return lines


def _generate(tmp: Path, output: str, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "paged_jax.cli",
        "generate",
        "--model",
        "random:tiny",
        "--input",
        str(tmp / "in.jsonl"),
        "--output",
        str(tmp / output),
        "--quiet",
        *extra,
        *ENGINE,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_process_writes(tmp_path):
    (tmp_path / "in.jsonl").write_text("\n".join(_lines()) + "\n")
    address = f"127.0.0.1:{_free_port()}"
    procs = [_generate(tmp_path, "single.jsonl")]
    procs += [
        _generate(
            tmp_path,
            "dp.jsonl",
            "--coordinator-address",
            address,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single = (tmp_path / "single.jsonl").read_text()
    assert (tmp_path / "dp.jsonl").read_text() == single
    records = [json.loads(line) for line in single.splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "4", "5", "6", "7", "s"]  # line numbers
    assert "max_tokens" in records[3]["error"]
    assert all(len(r["token_ids"]) == 6 for i, r in enumerate(records[:-1]) if i != 3)
    assert len(records[-1]["outputs"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.jsonl", "in.jsonl", "single.jsonl"]
    summaries = [
        [json.loads(line[8:]) for line in out.splitlines() if line.startswith("summary")]
        for out, _ in outs
    ]
    assert [s[0].get("process") for s in summaries] == [None, "0/2", "1/2"]
    assert sum(s[0]["requests"] for s in summaries[1:]) == summaries[0][0]["requests"] == 6


def test_pieces_without_processes(tmp_path):
    group = distributed.ProcessGroup(1, 3)
    assert distributed.local_items(list(range(8)), group) == [1, 4, 7]
    assert distributed.initialize() == distributed.SINGLE
    with pytest.raises(ValueError, match="process_id=2 must be in"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    out = tmp_path / "o.jsonl"
    distributed.write_merged(out, [(3, {"a": 3}), (1, {"a": 1})], [1, 3], distributed.SINGLE)
    assert out.read_text() == '{"a": 1}\n{"a": 3}\n'
    assert distributed.part_path(out, group).name == "o.jsonl.part-00001-of-00003"


def test_merge_checks_every_line_once(tmp_path):
    """Process 0's merge, in one process (the runtime's barrier is then trivial)."""
    out, group = tmp_path / "o.jsonl", distributed.ProcessGroup(0, 2)
    other = distributed.part_path(out, group, 1)
    other.write_text('[1, {"id": "b"}]\n')
    distributed.write_merged(out, [(0, {"id": "a"}), (2, {"id": "c"})], [0, 1, 2], group)
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]
    other.write_text('[1, {"id": "b"}]\n[0, {"id": "a"}]\n')
    with pytest.raises(ValueError, match=r"input lines \[3\] missing, 1 twice"):
        distributed.write_merged(out, [(0, {"id": "a"})], [0, 1, 3], group)
