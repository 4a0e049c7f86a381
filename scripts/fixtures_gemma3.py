"""HF transformers references for Gemma 3 and a Mistral-style sliding-window model; run through
``python scripts/make_fixtures.py --only gemma3`` / ``--only tiny-mistral`` (same venv).

* ``tests/data/logits_gemma3-270m.npz`` + ``tests/data/gemma3_270m.json``: the bundled Gemma 3
  270M GGUF (Q4_K_M, dequantized to float32 by transformers, eager attention, CPU). Prompts: three
  short texts and a long one (the first ``LONG_TOKENS`` tokens of the eval text, longer than the
  512-token window). Per prompt ``prompt_<i>`` int32[T]; at positions ``pos_<i>`` (every 64th and
  the last) ``sub_logits_<i>`` float32[P, len(cols)] over the fixed vocabulary columns ``cols``
  (top-1 ids of those rows included) and ``top_ids_<i>`` / ``top_vals_<i>`` [P, 20];
  ``greedy_<i>`` the greedy continuation (``GEMMA_NEW_TOKENS``). The json holds the texts, HF's
  encodings (tokenizer check), the perplexity of the long prompt and versions.
* ``tests/data/tiny-mistral/`` + ``logits_tiny-mistral.npz``: a tiny random MistralForCausalLM
  with ``sliding_window`` = 8 (every layer), prompts longer than the window; the same arrays as
  the other tiny checkpoints.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import torch

GEMMA_NEW_TOKENS = 12
LONG_TOKENS = 600  # > the 512 window; also the perplexity text (one engine pass serves both)
NUM_COLS = 2048
GEMMA_TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
TOKENIZER_TEXTS = GEMMA_TEXT_PROMPTS + [
    "Café naïve résumé 東京 😀",
    "  two leading spaces\n\nand\ttabs",
    "x=42; y = [1, 2,3]",
]


def _positions(num_tokens: int) -> np.ndarray:
    return np.unique(np.r_[np.arange(0, num_tokens, 64), num_tokens - 1]).astype(np.int32)


@torch.no_grad()
def make_gemma3(gguf_path: Path, data: Path, helpers) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = helpers.load_eager(AutoModelForCausalLM, folder, gguf_file=fname)
    helpers.disable_eos(model)
    if type(model).__name__ != "Gemma3ForCausalLM":
        raise RuntimeError(f"expected Gemma3ForCausalLM, got {type(model).__name__}")
    text = (helpers.ROOT / helpers.PPL_TEXT).read_text(encoding="utf-8")
    text_ids = tok(text)["input_ids"]
    if len(text_ids) < LONG_TOKENS:
        raise RuntimeError(f"eval text has only {len(text_ids)} tokens")
    prompts = [tok(t)["input_ids"] for t in GEMMA_TEXT_PROMPTS] + [text_ids[:LONG_TOKENS]]
    cols = np.random.default_rng(0).choice(model.config.vocab_size, NUM_COLS, replace=False)
    arrays: dict[str, np.ndarray] = {}
    meta_prompts = []
    for i, ids in enumerate(prompts):
        logits = helpers.full_logits(model, ids)  # f32[T, V]
        pos = _positions(len(ids))
        cols = np.union1d(cols, np.argmax(logits[pos], axis=-1))
        new, gap = helpers.greedy(model, ids, GEMMA_NEW_TOKENS)
        top = torch.topk(torch.from_numpy(logits[pos]), helpers.TOP_K, dim=-1)
        arrays[f"prompt_{i}"] = np.asarray(ids, np.int32)
        arrays[f"pos_{i}"] = pos
        arrays[f"top_ids_{i}"] = top.indices.numpy().astype(np.int32)
        arrays[f"top_vals_{i}"] = top.values.numpy().astype(np.float32)
        arrays[f"greedy_{i}"] = new
        arrays[f"_full_{i}"] = logits[pos]
        decoded = tok.decode(new.tolist())
        meta_prompts.append(
            {
                "text": GEMMA_TEXT_PROMPTS[i] if i < len(GEMMA_TEXT_PROMPTS) else None,
                "num_tokens": len(ids),
                "greedy_text": decoded,
                "min_greedy_top2_gap": gap,
            }
        )
        print(f"gemma3 prompt {i}: T={len(ids)} gap={gap:.4f} -> {decoded!r}")
    arrays["cols"] = cols.astype(np.int32)
    for i in range(len(prompts)):
        arrays[f"sub_logits_{i}"] = arrays.pop(f"_full_{i}")[:, cols].astype(np.float32)
    np.savez_compressed(data / "logits_gemma3-270m.npz", **arrays)

    # Perplexity of the long prompt (BOS first; BOS itself is not scored)
    ppl_ids = text_ids[:LONG_TOKENS]
    out = model(torch.tensor([ppl_ids]), labels=torch.tensor([ppl_ids]))
    nll = float(out.loss) * (len(ppl_ids) - 1)
    helpers.write_json(
        data / "gemma3_270m.json",
        {
            "source": "bundled GGUF (paged_jax.io.bundled, alias gemma3-270m)",
            "gguf_file": fname,
            "gguf_sha256": helpers.sha256(gguf_path),
            "logits": "tests/data/logits_gemma3-270m.npz",
            "architecture": type(model).__name__,
            "dtype": "float32 (GGUF dequantized by transformers), eager attention, CPU",
            "sliding_window": model.config.sliding_window,
            "layer_types": model.config.layer_types,
            "new_tokens": GEMMA_NEW_TOKENS,
            "prompts": meta_prompts,
            "tokenizer": [{"text": t, "ids": tok(t)["input_ids"]} for t in TOKENIZER_TEXTS],
            "ppl": {
                "text": helpers.PPL_TEXT,
                "num_tokens": len(ppl_ids),
                "scored_tokens": len(ppl_ids) - 1,
                "nll_sum": nll,
                "perplexity": float(np.exp(nll / (len(ppl_ids) - 1))),
            },
            "versions": helpers.versions(),
            "date": datetime.date.today().isoformat(),
            "command": "python scripts/make_fixtures.py --only gemma3",
        },
    )


def make_tiny_mistral(data: Path, helpers, seed: int = 1100) -> dict:
    """A tiny all-layer sliding-window Mistral, prompts longer than its window of 8."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(seed)
    config = MistralConfig(**helpers.TINY_COMMON, rope_theta=10000.0, sliding_window=8)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    helpers.randomize_(model, seed + 1)
    out_dir = data / "tiny-mistral"
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in out_dir.glob("generation_config.json"):
        extra.unlink()
    model = helpers.load_eager(AutoModelForCausalLM, out_dir)
    helpers.disable_eos(model)
    if json.loads((out_dir / "config.json").read_text()).get("sliding_window") != 8:
        raise RuntimeError("tiny-mistral: config.json lost sliding_window")
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, length in enumerate((5, 30)):
        for _ in range(100):
            ids = rng.integers(3, helpers.TINY_VOCAB, size=length).astype(np.int32)
            new, gap = helpers.greedy(model, ids.tolist())
            if gap >= helpers.MIN_GREEDY_GAP:
                break
        else:
            raise RuntimeError(f"tiny-mistral: no clear greedy path for length {length}")
        arrays[f"prompt_{i}"] = ids
        arrays[f"logits_{i}"] = helpers.full_logits(model, ids.tolist()).astype(np.float32)
        arrays[f"greedy_{i}"] = new
        print(f"tiny-mistral prompt {i}: T={length} min gap={gap:.4f}")
    # The window must matter: the same model without it gives other logits.
    ids = arrays["prompt_1"].tolist()
    model.config.sliding_window = None
    no_window = helpers.full_logits(model, ids)
    if np.abs(no_window - arrays["logits_1"]).max() < 1e-2:
        raise RuntimeError("tiny-mistral: the sliding window does not change the logits")
    np.savez_compressed(data / "logits_tiny-mistral.npz", **arrays)
    return {
        "path": "tests/data/tiny-mistral",
        "logits": "tests/data/logits_tiny-mistral.npz",
        "architecture": type(model).__name__,
        "sliding_window": 8,
        "prompt_lengths": [5, 30],
        "new_tokens": helpers.NEW_TOKENS,
        "seed": seed,
        "versions": helpers.versions(),
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/make_fixtures.py --only tiny-mistral",
    }
