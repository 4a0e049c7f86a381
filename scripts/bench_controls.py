"""What vLLM's logits controls cost per decode step: every option on against all off.

Two measurements, one JSON line per case and a markdown table:

1. engine: the bundled SmolLM2 decoding a batch of S requests (greedy, ignore_eos,
   decode_steps 1 so no case gets bursts the others lack), mean wall time of a decode step
   from the engine's timeline, for: off; penalties (repetition, frequency, presence);
   all (penalties + a 64-entry logit_bias + allowed_token_ids of half the vocabulary +
   bad_words); all + a grammar (a regex any text matches: a host mask every step). The host
   seconds of the grammar / bad-words masks are reported apart.
2. device: the controls executable alone (``runtime.controls``) at vocab 49,152 and 128,256,
   S rows of max_model_len tokens each, and the step's own logits for scale.

    PYTHONPATH=$PWD python scripts/bench_controls.py [--seqs 8 32] [--out docs/controls.md]

For the GPU: the same script runs there with ``--model random:llama-1b`` for (1) (random
weights, no tokenizer: the bad_words and grammar cases are then skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax import LLM, SamplingParams, StructuredOutputsParams
from paged_jax.engine.plan import StepPlan
from paged_jax.runtime.controls import make_process, pack_controls

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def case_params(name: str, vocab: int, tokens: int, has_tokenizer: bool) -> SamplingParams | None:
    base = dict(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=has_tokenizer)
    penalties = dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5)
    rng = np.random.default_rng(0)
    every = dict(
        **penalties,
        logit_bias={int(t): 1.0 for t in rng.choice(vocab, 64, replace=False)},
        allowed_token_ids=list(range(0, vocab, 2)),
    )
    if name == "off":
        return SamplingParams(**base)
    if name == "penalties":
        return SamplingParams(**base, **penalties)
    if not has_tokenizer and name != "all":
        return None
    if name == "all":
        extra = {"bad_words": ["sea", "lighthouse keeper"]} if has_tokenizer else {}
        return SamplingParams(**base, **every, **extra)
    grammar = StructuredOutputsParams(regex=r"(.|\n)*")  # min_tokens: EOS would end the grammar
    return SamplingParams(
        **base, **every, min_tokens=tokens, bad_words=["sea"], structured_outputs=grammar
    )


def bench_engine(model: str, seqs: list[int], tokens: int) -> list[dict]:
    llm = LLM(
        model,
        max_model_len=512,
        max_num_seqs=max(seqs),
        max_num_batched_tokens=512,
        decode_steps=1,
        warmup=True,
        warmup_progress=False,
    )
    vocab = llm.model_config.vocab_size
    has_tok = llm.tokenizer is not None
    prompt = PROMPT if has_tok else list(range(1, 40))
    rows = []
    for num_seqs in seqs:
        for name in ("off", "penalties", "all", "all+grammar"):
            params = case_params(name, vocab, tokens, has_tok)
            if params is None:
                continue
            llm.generate([prompt] * num_seqs, params, use_tqdm=False)  # caches, lazy compiles
            llm.reset_stats()
            mask_before = llm.stats()["mask_seconds"]  # host seconds making token masks
            llm.generate([prompt] * num_seqs, params, use_tqdm=False)
            decode = [r for r in llm.timeline if r.num_tokens == r.num_seqs == num_seqs]
            step_ms = statistics.mean(r.step_s for r in decode) * 1e3
            mask_s = llm.stats()["mask_seconds"] - mask_before
            row = {
                "part": "engine",
                "model": model,
                "seqs": num_seqs,
                "case": name,
                "decode_steps": len(decode),
                "step_ms": round(step_ms, 2),
                "host_mask_ms_per_step": round(mask_s / max(len(llm.timeline), 1) * 1e3, 3),
                "compiles_after_warmup": llm.stats()["compiles_after_warmup"],
            }
            print(json.dumps(row))
            rows.append(row)
    off = {r["seqs"]: r["step_ms"] for r in rows if r["case"] == "off"}
    for r in rows:
        r["x_off"] = round(r["step_ms"] / off[r["seqs"]], 3)
    llm.close()
    return rows


def bench_device(seqs: list[int], max_len: int = 512, page_size: int = 16) -> list[dict]:
    rows = []
    for vocab in (49152, 128256):
        process = jax.jit(make_process((0,), vocab))
        for num_seqs in seqs:
            pages_per_seq = max_len // page_size
            num_pages = num_seqs * pages_per_seq + 1
            rng = np.random.default_rng(0)
            token_pages = jnp.asarray(rng.integers(0, vocab, (num_pages, page_size)), jnp.int32)
            tables = np.arange(1, num_pages, dtype=np.int32).reshape(num_seqs, pages_per_seq)
            inputs = {
                "page_tables": jnp.asarray(tables),
                "kv_lens": jnp.full(num_seqs, max_len, jnp.int32),
                "suppress_eos": jnp.zeros(num_seqs, bool),
            }
            controls = jax.device_put(pack_controls(StepPlan(()), {}, num_seqs, vocab))
            logits = jnp.asarray(rng.normal(size=(num_seqs, vocab)), jnp.float32)
            jax.block_until_ready(process(logits, token_pages, inputs, controls))
            times = []
            for _ in range(10):
                start = time.perf_counter()
                jax.block_until_ready(process(logits, token_pages, inputs, controls))
                times.append(time.perf_counter() - start)
            row = {
                "part": "device",
                "vocab": vocab,
                "seqs": num_seqs,
                "tokens_per_row": max_len,
                "controls_ms": round(min(times) * 1e3, 3),
            }
            print(json.dumps(row))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqs", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--out", default=None, help="markdown table to write")
    args = parser.parse_args()
    rows = bench_device(args.seqs) + bench_engine(args.model, args.seqs, args.tokens)
    if args.out:
        with open(args.out, "w") as f:
            for part in ("device", "engine"):
                chosen = [r for r in rows if r["part"] == part]
                keys = [k for k in chosen[0] if k != "part"]
                f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
                for r in chosen:
                    f.write("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |\n")
                f.write("\n")


if __name__ == "__main__":
    main()
