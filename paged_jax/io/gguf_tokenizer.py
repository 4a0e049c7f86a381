"""A `Tokenizer` from a GGUF file's ``tokenizer.*`` metadata, built with the ``tokenizers`` library.

Two vocabulary kinds (``tokenizer.ggml.model``):

- ``"gpt2"``: byte-level BPE. Tokens and merges are stored in the GPT-2 byte alphabet; the text
  is first split by a regex family named in ``tokenizer.ggml.pre`` (`PRE_TOKENIZER_FAMILIES`).
  An unknown ``pre`` value is an error (a wrong split silently changes every id); a file without
  the field predates it and gets the GPT-2 regex with a warning.
- ``"llama"``: SentencePiece BPE. Tokens carry scores; ``<0xNN>`` tokens are the byte fallback
  and ``▁`` marks a space. SentencePiece merges the adjacent pair whose merged piece scores
  highest, so merges ranked by the merged piece's score reproduce it in a ``tokenizers`` BPE.

Token types (``tokenizer.ggml.token_type``) decide what is matched whole in text: control tokens
become special added tokens, user-defined ones plain added tokens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from paged_jax.io.tokenizer import Tokenizer, TokenizersBackend, end_of_generation_ids

logger = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer regexes (the cl100k family and its one-digit variant); GPT-2's own regex is the
# built-in of `pre_tokenizers.ByteLevel(use_regex=True)`.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL

# family -> the tokenizer.ggml.pre values (as llama.cpp's converter writes them) that use it.
PRE_TOKENIZER_FAMILIES: dict[str, tuple[str, ...]] = {
    "gpt2": ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"),
    # Every digit alone first, then GPT-2's regex. HF transformers' GGUF loader skips the digit
    # step, so after a whitespace run ("\n\n1") its ids differ from llama.cpp's and from the
    # model's own tokenizer; we follow those two.
    "gpt2_digits": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
    "llama3": ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"),
    "qwen2": ("qwen2", "deepseek-r1-qwen", "stablelm2"),
}
# llama.cpp (like Llama 3's tokenizer.json) takes a whole pre-token found in the vocab as is.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}


def _family(pre: str | None) -> str:
    if pre is None:
        logger.warning("GGUF has no tokenizer.ggml.pre; splitting text with the GPT-2 regex")
        return "gpt2"
    for family, names in PRE_TOKENIZER_FAMILIES.items():
        if pre in names:
            return family
    known = sorted(n for names in PRE_TOKENIZER_FAMILIES.values() for n in names)
    raise ValueError(f"unsupported tokenizer.ggml.pre={pre!r}; supported: {known}")


def byte_level_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=family.startswith("gpt2")
    )
    if family == "gpt2":
        return byte_level
    if family == "gpt2_digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = LLAMA3_REGEX if family == "llama3" else QWEN2_REGEX
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level])


def _first_ids(tokens: list[str]) -> dict[str, int]:
    # Some files repeat a token text (padding fillers); the first id keeps it.
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) < len(tokens):
        logger.debug("%d repeated token texts in the GGUF vocab", len(tokens) - len(vocab))
    return vocab


def build_gpt2(meta: dict[str, Any]) -> HFTokenizer:
    tokens, pre = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.pre")
    family = _family(pre)
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("byte-level GGUF tokenizer lacks tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):
        raise ValueError("tokenizer.ggml.merges holds an entry that is not 'left right'")
    bpe = models.BPE(_first_ids(tokens), merges, ignore_merges=pre in _IGNORE_MERGES)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = byte_level_pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    return tok


def _score_ranked_merges(tokens: list[str], scores: list[float], types: list[int]) -> list:
    vocab = _first_ids(tokens)
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2 or vocab[piece] != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_llama(meta: dict[str, Any]) -> HFTokenizer:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if "tokenizer.ggml.scores" not in meta:
        raise ValueError("SentencePiece GGUF tokenizer lacks tokenizer.ggml.scores")
    scores = meta["tokenizer.ggml.scores"]
    if len(scores) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens"
        )
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        _first_ids(tokens),
        _score_ranked_merges(tokens, scores, types),
        unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=BYTE in types,
    )
    tok = HFTokenizer(bpe)
    # As in llama.cpp, every stretch of text between control/user-defined tokens gets the dummy
    # prefix, even one that starts with a space: a normalizer does that, Metaspace does not.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", SPACE)]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE)] * prefix + spaces)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


BUILDERS = {"gpt2": build_gpt2, "llama": build_llama}


def read_tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The ``tokenizer.*`` fields of an open GGUF as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "gguf") -> Tokenizer:
    """A `Tokenizer` from GGUF ``tokenizer.*`` metadata (keys as llama.cpp writes them)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{source}: GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    if kind not in BUILDERS:
        raise ValueError(
            f"{source}: unsupported tokenizer.ggml.model={kind!r}; supported: {sorted(BUILDERS)}"
        )
    if not meta.get("tokenizer.ggml.tokens"):
        raise ValueError(f"{source}: GGUF lacks tokenizer.ggml.tokens")
    meta = dict(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    meta.setdefault("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    types = meta["tokenizer.ggml.token_type"]
    if len(types) != len(tokens):
        raise ValueError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries, not {len(tokens)}"
        )
    try:
        tok = BUILDERS[kind](meta)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    # Control and unknown tokens are special; user-defined ones match whole but stay plain text.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in (CONTROL, UNKNOWN)
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
    backend = TokenizersBackend(tok)
    backend.vocab_size = len(tokens)  # repeated texts shrink the BPE's own count, not the ids

    def token_id(key: str) -> int | None:
        value = meta.get(key)
        if value is not None and not 0 <= int(value) < len(tokens):
            raise ValueError(
                f"{source}: {key}={value} is outside the vocab of {len(tokens)} tokens"
            )
        return None if value is None else int(value)

    eos = [token_id(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return Tokenizer(
        backend,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids=end_of_generation_ids(backend, eos),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
        source=source,
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in the metadata of the GGUF file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncation, bad types: all mean "not a GGUF we can read"
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    return tokenizer_from_reader(reader, source=str(path))


def tokenizer_from_reader(reader: gguf.GGUFReader, source: str = "gguf") -> Tokenizer:
    """The tokenizer of an already open GGUF; lets a weight loader share its (slow) reader."""
    return tokenizer_from_metadata(read_tokenizer_metadata(reader), source=source)
