"""Produce the HF transformers reference fixtures under ``tests/data/``.

Run in a venv with torch==2.13.0, transformers, accelerate, gguf (plus safetensors, tokenizers,
sentencepiece), from the repository root::

    python scripts/make_fixtures.py

It writes, deterministically (fixed seeds, CPU, float32, eager attention):

* ``tests/data/tiny-{llama3,qwen2,qwen3}/``: tiny random HF checkpoints (config.json +
  safetensors; tiny-llama3 is sharded with an index file).
* ``tests/data/logits_tiny-*.npz``: per prompt ``prompt_<i>`` int32[T], ``logits_<i>``
  float32[T, V] and ``greedy_<i>`` int32[32].
* ``tests/data/logits_smollm2-135m.npz``: the bundled SmolLM2-135M-Instruct GGUF run through
  transformers: ``prompt_<i>``, ``top_ids_<i>`` int32[T, 20], ``top_vals_<i>`` float32[T, 20],
  ``last_logits_<i>`` float32[V], ``greedy_<i>`` int32[32].
* ``tests/data/smollm2_tokenizer.json``: tokenizer encode / chat-template cases.
* ``tests/data/fixtures_meta.json``: versions, date, GGUF sha256, per-model details.
* ``tests/data/ppl_smollm2.json``: SmolLM2's perplexity on the eval text fixture, over the same
  rolling windows as the engine's perplexity task (``paged_jax.eval.scoring``). Only this one:
  ``python scripts/make_fixtures.py --only ppl``.
* ``tests/data/beams_smollm2.json``: transformers beam-search references on the bundled SmolLM2
  (``num_beams`` = ``num_return_sequences`` in 2..4, with / without EOS, a few length
  penalties and ``early_stopping`` modes): per case the prompt ids and, best first, each
  hypothesis's generated ids and ``sequences_scores``. Only this one:
  ``python scripts/make_fixtures.py --only beams``.
* Gemma 3 270M (bundled GGUF) logits, greedy, tokenizer and perplexity references, and the
  tiny sliding-window Mistral checkpoint: ``--only gemma3`` / ``--only tiny-mistral``
  (``scripts/fixtures_gemma3.py`` says what they hold).

The bundled GGUF is found (and fetched on first use) via ``paged_jax.io.bundled``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

from paged_jax.io.bundled import bundled_path  # noqa: E402  (pure stdlib module)

NEW_TOKENS = 32
TOP_K = 20
TINY_PROMPT_LENGTHS = (1, 7, 33, 100)
TINY_VOCAB = 256
MIN_GREEDY_GAP = 0.02  # smallest top1-top2 logit gap allowed on tiny greedy paths

SMOLLM2_TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
SMOLLM2_CHAT_PROMPT = [{"role": "user", "content": "What is 2+2?"}]

TOKENIZER_CASES = [
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé",
    "I ❤️ 🦙 and 👩‍👩‍👧",
    "東京は日本の首都です。",
    "3.14159 and 2026-11-25, 1234567890",
    "a  b   c\t\td\n\n\ne    ",
    " leading space",
    "   three leading spaces",
    "def add(a, b):\n    if a:\n        return a + b\n    return b\n",
    "Mixed: naïve café 東京 😀 x=42; y = [1, 2,3]\n\tdone!",
    "Hello<|im_end|> world",
    "",
]
TOKENIZER_CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "11"},
        ],
        "add_generation_prompt": False,
    },
]

VERSION_PACKAGES = [
    "torch",
    "transformers",
    "gguf",
    "accelerate",
    "numpy",
    "safetensors",
    "tokenizers",
    "sentencepiece",
]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------

TINY_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=TINY_VOCAB,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(name: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if name == "tiny-llama3":
        return LlamaConfig(
            **TINY_COMMON,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        )
    if name == "tiny-qwen2":
        return Qwen2Config(**TINY_COMMON, rope_theta=1000000.0, tie_word_embeddings=True)
    if name == "tiny-qwen3":
        return Qwen3Config(**TINY_COMMON, rope_theta=1000000.0, tie_word_embeddings=False)
    raise ValueError(name)


def randomize_(model, seed: int) -> None:
    """Give norms and biases non-trivial values (default init makes them 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if "norm" in pname:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def load_eager(cls, path, **kwargs):
    return cls.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


def disable_eos(model) -> None:
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int = NEW_TOKENS) -> tuple[np.ndarray, float]:
    """Greedy continuation of ``new_tokens`` tokens and the smallest top1-top2 logit gap seen."""
    inp = torch.tensor([ids], dtype=torch.long)
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, len(ids) :].numpy().astype(np.int32)
    if new.shape != (new_tokens,):
        raise RuntimeError(f"expected {new_tokens} new tokens, got {new.shape}")
    gaps = []
    for step, logits in enumerate(out.logits):
        top2 = torch.topk(logits[0].float(), 2)
        if int(top2.indices[0]) != int(new[step]):
            raise RuntimeError("generate picked a token that is not the argmax")
        gaps.append(float(top2.values[0] - top2.values[1]))
    return new, min(gaps)


@torch.no_grad()
def full_logits(model, ids: list[int]) -> np.ndarray:
    out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def to_legacy_rope_config(path: Path) -> None:
    """Rewrite config.json with the top-level ``rope_theta`` / ``rope_scaling`` keys that real
    Llama 3 checkpoints on the Hub carry, instead of transformers 5's ``rope_parameters``."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_tiny(name: str, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(name)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, seed + 1)

    out_dir = DATA / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    sharded = name == "tiny-llama3"
    model.save_pretrained(
        out_dir, safe_serialization=True, max_shard_size="200KB" if sharded else "1GB"
    )
    for extra in out_dir.glob("generation_config.json"):
        extra.unlink()
    if sharded:
        to_legacy_rope_config(out_dir)
        shards = sorted(out_dir.glob("model-*.safetensors"))
        if len(shards) < 2 or not (out_dir / "model.safetensors.index.json").exists():
            raise RuntimeError(f"{name}: expected a sharded checkpoint, got {shards}")

    # Reference numbers come from the checkpoint as saved (round trip through safetensors).
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    probe = list(range(3, 3 + 80))
    probe_logits = full_logits(model, probe)
    model = load_eager(AutoModelForCausalLM, out_dir)
    disable_eos(model)
    for key, got in model.state_dict().items():
        if not torch.equal(saved[key], got):
            raise RuntimeError(f"{name}: {key} changed in the save/load round trip")
    # Also catches a config.json rewrite that changes the meaning (e.g. the rope keys).
    if not np.allclose(full_logits(model, probe), probe_logits, atol=1e-6, rtol=0):
        raise RuntimeError(f"{name}: reloaded checkpoint gives different logits")

    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    gaps = []
    for i, length in enumerate(TINY_PROMPT_LENGTHS):
        # Draw prompts (deterministically) until the greedy path has no near-tie, so that an
        # implementation within float32 round-off reproduces it exactly.
        for _ in range(100):
            ids = rng.integers(3, TINY_VOCAB, size=length).astype(np.int32)
            new, gap = greedy(model, ids.tolist())
            if gap >= MIN_GREEDY_GAP:
                break
        else:
            raise RuntimeError(f"{name}: no prompt of length {length} with a clear greedy path")
        logits = full_logits(model, ids.tolist())
        # The first greedy token must agree with the plain forward.
        if int(np.argmax(logits[-1])) != int(new[0]):
            raise RuntimeError(f"{name}: forward/generate disagree on prompt {i}")
        arrays[f"prompt_{i}"] = ids
        arrays[f"logits_{i}"] = logits.astype(np.float32)
        arrays[f"greedy_{i}"] = new
        gaps.append(gap)
        print(f"{name} prompt {i}: T={length} logit std={logits.std():.3f} min gap={gap:.4f}")
    np.savez_compressed(DATA / f"logits_{name}.npz", **arrays)

    files = sorted(p.name for p in out_dir.iterdir())
    return {
        "path": f"tests/data/{name}",
        "logits": f"tests/data/logits_{name}.npz",
        "architecture": type(model).__name__,
        "dtype": "float32",
        "files": files,
        "sharded": sharded,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "num_prompts": len(TINY_PROMPT_LENGTHS),
        "prompt_lengths": list(TINY_PROMPT_LENGTHS),
        "new_tokens": NEW_TOKENS,
        "seed": seed,
        "min_greedy_top2_gap": gaps,
        "config_rope_keys": "legacy rope_theta/rope_scaling" if sharded else "rope_parameters",
    }


# --------------------------------------------------------------------------------------------
# SmolLM2 from the bundled GGUF
# --------------------------------------------------------------------------------------------


def make_smollm2(gguf_path: Path) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = load_eager(AutoModelForCausalLM, folder, gguf_file=fname)
    disable_eos(model)

    chat_text = tok.apply_chat_template(
        SMOLLM2_CHAT_PROMPT, tokenize=False, add_generation_prompt=True
    )
    bos = tok.bos_token_id
    texts = SMOLLM2_TEXT_PROMPTS + [chat_text]
    arrays: dict[str, np.ndarray] = {}
    prompts_meta = []
    adds_bos = None
    for i, text in enumerate(texts):
        if i < len(SMOLLM2_TEXT_PROMPTS):
            ids = tok(text)["input_ids"]  # exactly what the HF tokenizer gives by default
            plain = tok(text, add_special_tokens=False)["input_ids"]
            adds_bos = ids[:1] == [bos] and plain[:1] != [bos]
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]  # template carries specials
        logits = full_logits(model, ids)
        top = torch.topk(torch.from_numpy(logits), TOP_K, dim=-1)
        new, gap = greedy(model, ids)
        if int(np.argmax(logits[-1])) != int(new[0]):
            raise RuntimeError(f"smollm2: forward/generate disagree on prompt {i}")
        arrays[f"prompt_{i}"] = np.asarray(ids, dtype=np.int32)
        arrays[f"top_ids_{i}"] = top.indices.numpy().astype(np.int32)
        arrays[f"top_vals_{i}"] = top.values.numpy().astype(np.float32)
        arrays[f"last_logits_{i}"] = logits[-1].astype(np.float32)
        arrays[f"greedy_{i}"] = new
        decoded = tok.decode(new.tolist(), skip_special_tokens=False)
        prompts_meta.append(
            {
                "text": text,
                "kind": "chat" if i == len(SMOLLM2_TEXT_PROMPTS) else "text",
                "num_tokens": len(ids),
                "greedy_text": decoded,
                "min_greedy_top2_gap": gap,
            }
        )
        print(f"smollm2 prompt {i}: T={len(ids)} gap={gap:.4f} -> {decoded!r}")
    if not prompts_meta[0]["greedy_text"].startswith(" Paris"):
        raise RuntimeError(f"unexpected continuation: {prompts_meta[0]['greedy_text']!r}")
    np.savez_compressed(DATA / "logits_smollm2-135m.npz", **arrays)

    meta = {
        "source": "bundled GGUF (paged_jax.io.bundled, alias smollm2-135m)",
        "gguf_file": fname,
        "gguf_sha256": sha256(gguf_path),
        "logits": "tests/data/logits_smollm2-135m.npz",
        "dtype": "float32 (GGUF dequantized by transformers)",
        "num_prompts": len(texts),
        "prompts": prompts_meta,
        "chat_messages": SMOLLM2_CHAT_PROMPT,
        "new_tokens": NEW_TOKENS,
        "top_k": TOP_K,
        "tokenizer_adds_bos": bool(adds_bos),
        "bos_token_id": bos,
        "eos_token_id": tok.eos_token_id,
    }
    return meta, make_tokenizer_fixture(tok)


def make_tokenizer_fixture(tok) -> dict:
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TOKENIZER_CASES]
    chat = []
    for c in TOKENIZER_CHATS:
        text = tok.apply_chat_template(
            c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"]
        )
        chat.append(
            {
                "messages": c["messages"],
                "add_generation_prompt": c["add_generation_prompt"],
                "text": text,
                "ids": tok.encode(text, add_special_tokens=False),
            }
        )
    for c in cases:  # byte-level BPE must round-trip exactly
        if tok.decode(c["ids"]) != c["text"]:
            print(f"note: decode does not round-trip {c['text']!r}")
    return {
        "versions": versions(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "cases": cases,
        "chat": chat,
    }


# --------------------------------------------------------------------------------------------
# SmolLM2 perplexity on the eval text fixture
# --------------------------------------------------------------------------------------------

PPL_TEXT = "paged_jax/eval/data/declaration_of_independence.txt"
PPL_CASES = [(256, 128), (512, 256), (256, 256)]  # (window, stride)


@torch.no_grad()
def make_ppl_smollm2(gguf_path: Path) -> None:
    """Token-weighted perplexity with HF's own loss (labels masked to -100 outside each
    window's new tokens), over exactly the windows ``paged_jax.eval`` scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paged_jax.eval.scoring import perplexity, perplexity_windows  # stdlib only

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = load_eager(AutoModelForCausalLM, folder, gguf_file=fname)
    text = (ROOT / PPL_TEXT).read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]  # the tokenizer's defaults (SmolLM2: no BOS)
    cases = []
    for window, stride in PPL_CASES:
        windows = perplexity_windows(len(ids), window, stride)
        nll_loss = nll_manual = 0.0
        count = 0
        for w in windows:
            inp = torch.tensor([ids[w.begin : w.end]], dtype=torch.long)
            labels = inp.clone()
            labels[:, : w.score_from - w.begin] = -100  # context only; the loss shifts by one
            out = model(inp, labels=labels)
            nll_loss += float(out.loss) * w.num_scored
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
            for pos in range(w.score_from, w.end):
                nll_manual -= float(logp[pos - w.begin - 1, ids[pos]])
            count += w.num_scored
        if abs(nll_loss - nll_manual) > 1e-4 * abs(nll_manual):
            raise RuntimeError(f"HF loss {nll_loss} and log_softmax sum {nll_manual} disagree")
        if stride < window and count != len(ids) - 1:  # == window: window starts lack context
            raise RuntimeError(f"scored {count} tokens of {len(ids)}: windows overlap or miss")
        case = {
            "window": window,
            "stride": stride,
            "num_windows": len(windows),
            "scored_tokens": count,
            "nll_sum": nll_loss,
            "perplexity": perplexity(nll_loss, count),
        }
        cases.append(case)
        print(f"smollm2 ppl window={window} stride={stride}: {case['perplexity']:.4f}")
    write_json(
        DATA / "ppl_smollm2.json",
        {
            "text": PPL_TEXT,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "num_tokens": len(ids),
            "token_ids": ids,
            "cases": cases,
            "method": "transformers causal-LM loss per window, labels -100 outside new tokens, "
            "token-weighted over windows; float32, eager attention, CPU",
            "gguf_sha256": sha256(gguf_path),
            "versions": versions(),
            "date": datetime.date.today().isoformat(),
            "command": "python scripts/make_fixtures.py --only ppl",
        },
    )


# --------------------------------------------------------------------------------------------
# SmolLM2 beam search
# --------------------------------------------------------------------------------------------

BEAM_NEW_TOKENS = {"text": 12, "chat": 20}
BEAM_NO_EOS_PAD = 0  # pad id when EOS is disabled (HF then pads with -1 anyway; see below)
# (prompt, beam_width, eos?, length_penalty, early_stopping); prompts "a"/"b" are
# SMOLLM2_TEXT_PROMPTS[0]/[2], "c" is SMOLLM2_CHAT_PROMPT through the chat template.
BEAM_CASES = (
    [(p, k, eos, 1.0, False) for p in "abc" for k in (2, 3, 4) for eos in (True, False)]
    + [(p, 3, True, 0.5, False) for p in "abc"]
    + [(p, 3, True, 1.0, True) for p in "abc"]
    + [("c", 4, True, 0.5, True), ("c", 2, True, 0.5, True), ("b", 4, False, 0.5, True)]
    + [("c", 3, True, 1.0, "never"), ("c", 4, True, 0.5, "never"), ("a", 3, True, 1.0, "never")]
)


def _spy_beam_search(model, seen: dict):
    """Wrap ``_beam_search`` on the model's class to record the generation config, EOS / pad
    tensors, logits processors and stopping criteria that ``generate`` actually hands it."""
    cls = type(model)
    orig = cls._beam_search

    def spy(self, input_ids, *args, logits_processor, stopping_criteria, generation_config, **kw):
        eos = generation_config._eos_token_tensor
        pad = generation_config._pad_token_tensor
        seen.clear()
        seen.update(
            config={
                key: val
                for key, val in generation_config.to_dict().items()
                if not key.startswith("_") and not isinstance(val, torch.Tensor)
            },
            eos=None if eos is None else [int(t) for t in eos.reshape(-1)],
            pad=None if pad is None else int(pad),
            processors=[type(p).__name__ for p in logits_processor],
            stopping=[type(c).__name__ for c in stopping_criteria],
        )
        return orig(
            self,
            input_ids,
            *args,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            **kw,
        )

    had_own = "_beam_search" in cls.__dict__
    cls._beam_search = spy

    def undo():
        if had_own:
            cls._beam_search = orig
        else:
            del cls._beam_search

    return undo


@torch.no_grad()
def make_beams_smollm2(gguf_path: Path) -> None:
    """HF beam search (``num_beams=k``, ``num_return_sequences=k``) on the bundled SmolLM2, with
    and without EOS, over a few length penalties and early-stopping modes.

    Each returned hypothesis's true generated length is the number of its ``beam_indices``
    entries that are not -1 (how HF itself crops the outputs); the stored tokens are the
    generated ids up to that length (an EOS-finished one ends with its EOS). It is checked
    against the scores: ``sequences_scores == sum(transition scores) / length**length_penalty``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = load_eager(AutoModelForCausalLM, folder, gguf_file=fname)
    gc = model.generation_config
    loaded_gc = gc.to_diff_dict()
    hf_eos = gc.eos_token_id
    hf_eos = [] if hf_eos is None else [hf_eos] if isinstance(hf_eos, int) else list(hf_eos)
    hf_pad = gc.pad_token_id
    if not hf_eos:
        raise RuntimeError(f"the GGUF's generation config has no EOS: {loaded_gc}")
    # Plain beam search: nothing that adds a logits processor (checked below via the spy).
    gc.do_sample = False
    gc.temperature = gc.top_k = gc.top_p = gc.typical_p = gc.min_p = None
    gc.repetition_penalty = gc.no_repeat_ngram_size = gc.min_length = gc.min_new_tokens = None
    gc.bad_words_ids = gc.suppress_tokens = gc.begin_suppress_tokens = None
    gc.forced_bos_token_id = gc.forced_eos_token_id = None
    gc.exponential_decay_length_penalty = None

    chat_text = tok.apply_chat_template(
        SMOLLM2_CHAT_PROMPT, tokenize=False, add_generation_prompt=True
    )
    prompts = {  # the same tokenization as make_smollm2 (text: tokenizer defaults, no BOS)
        "a": ("text", SMOLLM2_TEXT_PROMPTS[0], tok(SMOLLM2_TEXT_PROMPTS[0])["input_ids"]),
        "b": ("text", SMOLLM2_TEXT_PROMPTS[2], tok(SMOLLM2_TEXT_PROMPTS[2])["input_ids"]),
        "c": ("chat", chat_text, tok(chat_text, add_special_tokens=False)["input_ids"]),
    }

    seen: dict = {}
    undo = _spy_beam_search(model, seen)
    cases = []
    base_config = None  # the full config generate used for the first case with EOS
    try:
        for prompt_key, k, use_eos, lp, es in BEAM_CASES:
            kind, text, ids = prompts[prompt_key]
            n_new = BEAM_NEW_TOKENS[kind]
            eos_ids = hf_eos if use_eos else None
            pad_id = hf_pad if use_eos else BEAM_NO_EOS_PAD
            gc.eos_token_id, gc.pad_token_id = eos_ids, pad_id
            inp = torch.tensor([ids], dtype=torch.long)
            out = model.generate(
                inp,
                attention_mask=torch.ones_like(inp),  # the chat prompt contains pad id 2
                num_beams=k,
                num_return_sequences=k,
                do_sample=False,
                max_new_tokens=n_new,
                length_penalty=lp,
                early_stopping=es,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                output_scores=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
            if seen["eos"] != (eos_ids or None) or seen["processors"]:
                raise RuntimeError(f"unexpected generate setup: {seen}")
            if base_config is None and use_eos:
                base_config = {"case": len(cases), "config": seen["config"]}
            # No processor touched the scores: they are plain log_softmax of the logits.
            for s, lg in zip(out.scores, out.logits, strict=True):
                if not torch.allclose(s, torch.log_softmax(lg.float(), -1), atol=1e-5):
                    raise RuntimeError("beam scores are not the log_softmax of the logits")
            trans = model.compute_transition_scores(
                out.sequences, out.scores, out.beam_indices, normalize_logits=False
            )
            lengths = (out.beam_indices != -1).sum(-1)
            hyps = []
            for r in range(k):
                n = int(lengths[r])
                gen = out.sequences[r, len(ids) : len(ids) + n].tolist()
                eos_end = bool(eos_ids) and gen[-1] in eos_ids
                if len(gen) != n or (n < n_new and not eos_end) or n > n_new:
                    raise RuntimeError(f"hypothesis {r}: length {n} of {n_new}, tokens {gen}")
                if eos_ids and any(t in eos_ids for t in gen[:-1]):
                    raise RuntimeError(f"hypothesis {r} has an EOS before its end: {gen}")
                if any(t < 0 for t in gen) or (not use_eos and n != n_new):
                    raise RuntimeError(f"hypothesis {r}: bad tokens {gen}")
                sum_logprob = float(trans[r, :n].double().sum())
                score = float(out.sequences_scores[r])
                if abs(sum_logprob / n**lp - score) > 1e-4 * max(1.0, abs(score)):
                    raise RuntimeError(f"hypothesis {r}: score {score} != {sum_logprob}/{n}^{lp}")
                hyps.append(
                    {
                        "token_ids": gen,
                        "score": score,
                        "sum_logprobs": sum_logprob,
                        "num_tokens": n,
                        "finished_by_eos": eos_end,
                        "text": tok.decode(gen, skip_special_tokens=False),
                    }
                )
            scores = [h["score"] for h in hyps]
            if scores != sorted(scores, reverse=True):
                raise RuntimeError(f"hypotheses are not best first: {scores}")
            cases.append(
                {
                    "name": f"{prompt_key}_k{k}_{'eos' if use_eos else 'noeos'}_lp{lp}_es{es}",
                    "prompt": prompt_key,
                    "prompt_kind": kind,
                    "prompt_token_ids": ids,
                    "beam_width": k,
                    "num_return_sequences": k,
                    "max_new_tokens": n_new,
                    "length_penalty": lp,
                    "early_stopping": es,
                    "eos_token_ids": seen["eos"],
                    "pad_token_id": seen["pad"],
                    "stopping_criteria": seen["stopping"],
                    "hypotheses": hyps,
                }
            )
    finally:
        undo()

    print(f"{'case':<32} {'k':>2} {'eos':>4} {'lp':>4} {'es':>6}  scores (* = ends with EOS)")
    for c in cases:
        sc = " ".join(
            f"{h['score']:.4f}{'*' if h['finished_by_eos'] else ''}" for h in c["hypotheses"]
        )
        eos = "yes" if c["eos_token_ids"] else "no"
        lp, es = c["length_penalty"], str(c["early_stopping"])
        print(f"{c['name']:<32} {c['beam_width']:>2} {eos:>4} {lp:>4} {es:>6}  {sc}")
    n_eos = sum(any(h["finished_by_eos"] for h in c["hypotheses"]) for c in cases)
    print(f"smollm2 beams: {len(cases)} cases, {n_eos} with an EOS-finished hypothesis")
    if n_eos < 3:
        raise RuntimeError("too few cases with an EOS-finished hypothesis")

    write_json(
        DATA / "beams_smollm2.json",
        {
            "prompts": {
                key: {"kind": kind, "text": text, "token_ids": ids}
                for key, (kind, text, ids) in prompts.items()
            },
            "chat_messages": SMOLLM2_CHAT_PROMPT,
            "cases": cases,
            "loaded_generation_config": loaded_gc,
            # temperature / top_k / top_p there are HF's global defaults filled back in; with
            # do_sample=False they add no processor (checked: none ran, scores == log_softmax).
            "generation_config": base_config["config"],
            "generation_config_case": cases[base_config["case"]]["name"],
            "logits_processors": [],
            "hf_eos_token_ids": hf_eos,
            "hf_pad_token_id": hf_pad,
            "no_eos_pad_token_id": BEAM_NO_EOS_PAD,
            "method": "model.generate(num_beams=k, num_return_sequences=k, do_sample=False, "
            "max_new_tokens, length_penalty, early_stopping, output_scores=True); hypotheses best "
            "first as HF returns them; token_ids are the generated ids only, cut to the number of "
            "beam_indices entries != -1 (an EOS-finished one keeps its EOS); score is "
            "sequences_scores = sum_logprobs / num_tokens**length_penalty; float32, eager "
            "attention, CPU",
            "gguf_file": fname,
            "gguf_sha256": sha256(gguf_path),
            "versions": versions(),
            "date": datetime.date.today().isoformat(),
            "command": "python scripts/make_fixtures.py --only beams",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=["ppl", "beams", "gemma3", "tiny-mistral"],
        help="write only this fixture",
    )
    only = parser.parse_args().only
    if only in ("gemma3", "tiny-mistral"):
        import fixtures_gemma3  # scripts/ is on sys.path when run as a script

        torch.manual_seed(0)
        here = sys.modules[__name__]
        if only == "gemma3":
            fixtures_gemma3.make_gemma3(bundled_path("gemma3-270m"), DATA, here)
        else:
            write_json(DATA / "tiny-mistral.json", fixtures_gemma3.make_tiny_mistral(DATA, here))
        return
    if only == "ppl":
        torch.manual_seed(0)
        make_ppl_smollm2(bundled_path("smollm2-135m"))
        return
    if only == "beams":
        torch.manual_seed(0)
        make_beams_smollm2(bundled_path("smollm2-135m"))
        return
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    DATA.mkdir(parents=True, exist_ok=True)

    models = {}
    for seed, name in enumerate(["tiny-llama3", "tiny-qwen2", "tiny-qwen3"]):
        models[name] = make_tiny(name, seed=1000 + seed)

    gguf_path = bundled_path("smollm2-135m")
    smol_meta, tok_fixture = make_smollm2(gguf_path)
    models["smollm2-135m"] = smol_meta
    make_beams_smollm2(gguf_path)

    write_json(DATA / "smollm2_tokenizer.json", tok_fixture)
    write_json(
        DATA / "fixtures_meta.json",
        {
            "versions": versions(),
            "date": datetime.date.today().isoformat(),
            "command": "python scripts/make_fixtures.py",
            "device": "cpu",
            "attn_implementation": "eager",
            "gguf_sha256": smol_meta["gguf_sha256"],
            "models": models,
        },
    )
    print("wrote fixtures under", DATA.relative_to(ROOT))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
