"""The throughput benchmark: its workload generator, JSONL reader, a tiny end-to-end run on CPU,
and the HF baseline's batching (the HF run itself only where torch and transformers exist)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from paged_jax.bench import main
from paged_jax.bench_workload import MAX_LEN, MIN_LEN, make_workload, read_jsonl

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_bench_hf():
    spec = importlib.util.spec_from_file_location("bench_hf", SCRIPTS / "bench_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_is_deterministic_clipped_and_shaped_as_documented():
    workload = make_workload(1000, seed=0, vocab_size=512)
    assert workload == make_workload(1000, seed=0, vocab_size=512)
    assert workload != make_workload(1000, seed=1, vocab_size=512)
    assert make_workload(64, seed=0, vocab_size=512) == workload[:64]  # the HF baseline's slice
    prompt_lens = np.array([len(p) for p, _ in workload])
    output_lens = np.array([n for _, n in workload])
    for lens in (prompt_lens, output_lens):
        assert lens.min() >= MIN_LEN and lens.max() <= MAX_LEN
    assert 120 < prompt_lens.mean() < 180  # documented: about 148
    assert 250 < output_lens.mean() < 350  # documented: about 297
    assert all(0 <= t < 512 for p, _ in workload for t in p)
    short = make_workload(100, seed=0, max_len=64)
    assert max(max(len(p), n) for p, n in short) == 64


def test_read_jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt_token_ids": [1, 2, 3], "max_tokens": 5}\n\n{"prompt": "hi"}\n')
    assert read_jsonl(str(path), None) == [([1, 2, 3], 5), ("hi", 256)]
    assert read_jsonl(str(path), 7) == [([1, 2, 3], 7), ("hi", 7)]
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:1: needs exactly one"):
        read_jsonl(str(path), None)


def test_main_end_to_end_on_cpu(tmp_path):
    argv = [
        "--model", "random:tiny", "dtype=float32", "--num-requests", "6",
        "max_model_len=128", "max_num_seqs=8", "max_num_batched_tokens=32",
        "num_pages=48", "--warmup-requests", "2", "--copy-bytes", str(2**22),
        "--out", str(tmp_path), "--tag", "tiny", "warmup_progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    workload = make_workload(6, seed=0, vocab_size=512, max_len=64)  # max_model_len // 2
    assert result["output_tokens"] == sum(n for _, n in workload)
    assert result["workload"]["prompt_tokens"] == sum(len(p) for p, _ in workload)
    assert 0 < result["kv_utilization"] <= 1
    assert 0 < result["used_pages_frac"]["max"] <= 1
    assert result["compiles_after_warmup"] == 0
    assert result["warmup_seconds"] > 0 and result["warmup_buckets"] == 2
    assert result["requests_per_s"] > 0 and result["output_tokens_per_s"] > 0
    assert result["ttft_s"]["p50"] <= result["ttft_s"]["p99"]
    assert 0 < result["tpot_s"]["p50"] < result["latency_s"]["p50"]
    assert 0 < result["decode"]["mbu"] < 10 and math.isfinite(result["decode"]["mbu_device"])
    assert 0 <= result["host_overhead_share"] <= 1 and len(result["biggest_step_costs"]) == 3
    assert result["device"] and result["jax_version"] and result["args"]["seed"] == 0
    series = result["series"]
    assert len(series["t_s"]) == len(series["used_pages_frac"]) <= 120
    assert "| output tok/s |" in (tmp_path / "tiny.md").read_text()
    assert result["prefix_caching"] and result["prefix_cache"]["hits"] == 0  # random prompts
    assert result["prompt_tokens_computed"] == result["workload"]["prompt_tokens"]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "tiny.png").exists() == has_matplotlib


def test_shared_prefix_workload_and_config_chain(tmp_path):
    from paged_jax.bench_workload import make_shared_prefix_workload

    workload = make_shared_prefix_workload(50, seed=0, vocab_size=512, prefix_len=80)
    prefix = workload[0][0][:80]
    assert all(p[:80] == prefix and 16 <= len(p) - 80 <= 24 for p, _ in workload)
    assert all(20 <= n <= 60 for _, n in workload)
    assert len({tuple(p[80:]) for p, _ in workload}) == 50
    config = tmp_path / "engine.yaml"
    config.write_text("max_model_len: 256\nmax_num_seqs: 8\nmax_num_batched_tokens: 64\n")
    runs = {}
    for flag in ([], ["--no-prefix-caching"]):
        argv = ["--model", "random:tiny", "--config", str(config), "dtype=float32",
                "num_pages=96", "--workload", "shared-prefix", "--prefix-len", "80",
                "--num-requests", "12", "--warmup-requests", "0", "--copy-bytes", "0",
                "--out", str(tmp_path), "--tag", "sp", "warmup_progress=false", *flag]  # fmt: skip
        assert main(argv) == 0
        runs[bool(flag)] = json.loads((tmp_path / "sp.json").read_text())
    on, off = runs[False], runs[True]
    assert on["engine_options"]["max_model_len"] == 256  # from the yaml
    assert on["prefix_cache"]["hits"] > 0 and off["prefix_cache"]["queries"] == 0
    saved = on["prefix_cache"]["hits"]
    assert on["prompt_tokens_computed"] + saved == off["prompt_tokens_computed"]
    assert on["output_tokens"] == off["output_tokens"]


def test_main_reports_a_bad_input_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    assert main(["--model", "random:tiny", "--input", str(path), "--out", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_hf_batches_are_left_padded_and_count_useful_tokens():
    bench_hf = load_bench_hf()
    workload = [([5, 6], 3), ([7], 10), ([8, 9, 10], 1)]
    batches = bench_hf.make_batches(workload, batch_size=2)
    ids, mask, max_new, useful = batches[0]
    assert ids == [[5, 6], [bench_hf.PAD_ID, 7]] and mask == [[1, 1], [0, 1]]
    assert (max_new, useful) == (10, 13)
    assert batches[1] == ([[8, 9, 10]], [[1, 1, 1]], 1, 1)


@pytest.mark.gpu  # needs torch + transformers, which the GPU machine has and CI does not
def test_hf_baseline_runs(tmp_path):
    argv = ["--model", "random:tiny", "--num-requests", "5", "--batch-size", "2",
            "--max-len", "16", "--out", str(tmp_path)]  # fmt: skip
    assert load_bench_hf().main(argv) == 0
    result = json.loads((tmp_path / "hf-tiny.json").read_text())
    workload = make_workload(5, seed=0, vocab_size=512, max_len=16)
    assert result["useful_output_tokens"] == sum(n for _, n in workload)
    assert result["generated_tokens"] >= result["useful_output_tokens"]


def test_streaming_limit_is_the_best_of_copy_and_read():
    from paged_jax.runtime.bandwidth import streaming_limit

    r = streaming_limit(2**22, calls=3, rounds=2)
    assert r["bytes"] == 2**22 and r["calls"] == 3
    assert r["bytes_per_s"] == max(r["copy_bytes_per_s"], r["read_bytes_per_s"]) > 0
    with pytest.raises(ValueError, match="num_bytes"):
        streaming_limit(1024)
