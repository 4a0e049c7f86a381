"""Host time per decode step of a grammar's token mask: llguidance against outlines-core.

For vocabularies of 49,152 (the bundled SmolLM2's own) and 128,256 tokens (SmolLM2's plus
79,104 made by joining two of its word tokens: a Llama-3-sized vocabulary with the same kind
of entries, since no 128k tokenizer lies on this machine), it walks a JSON document, a regex
match and a choice token by token, timing the mask of every step (what the engine does before
each step of a row with a grammar) and the grammar's compile. xgrammar is not measured: it
requires torch (and transformers, triton) at install, which the engine must not depend on.

    PYTHONPATH=$PWD python scripts/bench_grammar.py [--out docs/grammar_bench.md]

outlines-core is optional (``pip install outlines-core==0.2.14``, here into
``--outlines-path``); the case is reported as skipped without it. One JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from paged_jax.io.bundled import bundled_path
from paged_jax.io.loader import load_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
DOC = '{"name": "Alice Smith", "age": 34, "city": "Paris", "tags": ["engineer", "runner"]}'
REGEX = r"[A-Z][a-z]+ [0-9]{2,3}-[0-9]{4}"
REGEX_TEXT = "Anna 123-4567"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]


def vocabularies(large: int = 128256) -> tuple[list[bytes], list[bytes], list[int], int]:
    """(49k token bytes, 128k token bytes, a tokenizer for the texts, eos id)."""
    tok = load_model(str(bundled_path("smollm2-135m")), "float32").tokenizer
    llt = llguidance.LLTokenizer(tok.backend.tok.to_str(), eos_token=list(tok.eos_token_ids))
    small = [llt.decode_bytes([i]) for i in range(tok.vocab_size)]
    rng = np.random.default_rng(0)
    words = [t for t in small if len(t) >= 3 and t.strip().isalpha()]
    seen, extra = set(small), []
    while len(small) + len(extra) < large:
        a, b = rng.integers(0, len(words), 2)
        t = words[a] + words[b].strip()
        if t not in seen:
            seen.add(t)
            extra.append(t)
    return small, small + extra, tok, tok.eos_token_ids[0]


class _Wrapper:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS, and an encoder (bytewise)."""

    def __init__(self, tokens: list[bytes], eos: int) -> None:
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos, None
        self.special_token_ids = [eos]
        self._byte = {t[0]: i for i, t in enumerate(tokens) if len(t) == 1}

    def __call__(self, s: bytes) -> list[int]:
        return [self._byte[b] for b in s]


def walk(mask_fn, consume_fn, ids: list[int]) -> list[float]:
    times = []
    for t in ids:
        start = time.perf_counter()
        mask_fn()
        times.append(time.perf_counter() - start)
        consume_fn(t)
    return times


def bench_llguidance(tokens, eos, grammar: str, ids: list[int]) -> dict:
    llt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(tokens, eos)))
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(llt, grammar)
    compile_s = time.perf_counter() - start
    mask = llg_numpy.allocate_token_bitmask(1, len(tokens))
    times = walk(
        lambda: llg_numpy.fill_next_token_bitmask(matcher, mask, 0), matcher.consume_token, ids
    )
    assert not matcher.is_error(), matcher.get_error()
    return {"compile_s": compile_s, "times": times}


def bench_outlines(tokens, eos, regex: str, ids: list[int]) -> dict:
    import outlines_core

    vocab: dict[bytes, list[int]] = {}
    for i, t in enumerate(tokens):
        if i != eos and t:
            vocab.setdefault(t, []).append(i)
    start = time.perf_counter()
    index = outlines_core.Index(regex, outlines_core.Vocabulary(eos, vocab))
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - start
    mask = np.zeros((len(tokens) + 31) // 32, np.int32)
    times = walk(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4), guide.advance, ids)
    return {"compile_s": compile_s, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="markdown table to write")
    parser.add_argument("--outlines-path", default="/tmp/oc_site")
    args = parser.parse_args()
    sys.path.append(args.outlines_path)
    small, large, tok, eos = vocabularies()
    from outlines_core.json_schema import build_regex_from_schema  # noqa: E402

    cases = {
        "json": (
            llguidance.LLMatcher.grammar_from_json_schema(PERSON),
            build_regex_from_schema(json.dumps(PERSON), r"[ ]?"),
            DOC,
        ),
        "regex": (llguidance.LLMatcher.grammar_from_regex(REGEX), REGEX, REGEX_TEXT),
        "choice": (
            llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in CHOICES)
            ),
            "(" + "|".join(CHOICES) + ")",
            CHOICES[3],
        ),
    }
    rows = []
    for vocab_name, tokens in (("49k", small), ("128k", large)):
        for case, (grammar, regex, text) in cases.items():
            ids = tok.encode(text, add_bos=False)
            for lib, fn, spec in (
                ("llguidance 1.9.1", bench_llguidance, grammar),
                ("outlines-core 0.2.14", bench_outlines, regex),
            ):
                try:
                    r = fn(tokens, eos, spec, ids)
                except ImportError as e:
                    print(json.dumps({"lib": lib, "skipped": str(e)}))
                    continue
                t = sorted(r["times"])
                row = {
                    "lib": lib,
                    "vocab": vocab_name,
                    "case": case,
                    "steps": len(t),
                    "compile_ms": round(r["compile_s"] * 1e3, 2),
                    "mask_mean_us": round(statistics.mean(t) * 1e6, 1),
                    "mask_p50_us": round(t[len(t) // 2] * 1e6, 1),
                    "mask_max_us": round(t[-1] * 1e6, 1),
                }
                print(json.dumps(row))
                rows.append(row)
    if args.out:
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
