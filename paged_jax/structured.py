"""Host side of token masks: ``allowed_token_ids``, ``bad_words`` and structured outputs.

Each completion that sets one of them gets a ``TokenConstraints``; before a step samples its
row the driver asks it for the row's packed mask (i32[ceil(V / 32)], bit ``t % 32`` of word
``t // 32`` = token t allowed: llguidance's layout), which ``runtime.controls`` applies on the
device; after the step the sampled tokens are fed back (``accept``).

Grammars are llguidance's (the engine vLLM and sglang use; chosen by measurement, see the
README): a JSON schema, a regex, a choice list (a Lark alternation of literals) or a Lark
grammar (GBNF is converted) is compiled per request against the model's vocabulary; a
malformed or unsatisfiable one is a ``ValueError`` for that request alone. A grammar that
reaches its end stops the completion (finish reason "stop"); until then EOS is allowed only
where the grammar accepts.

Bad words follow vLLM: each word is tokenized as written and with a leading space; a word's
last token is masked when the output so far ends with the word's other tokens.
"""

from __future__ import annotations

import json
import logging
import time

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.structured_params import StructuredOutputsParams
from paged_jax.io.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compact JSON (no whitespace outside strings, `{"a":1}`): small models otherwise indent until
# max_tokens runs out. vLLM's default is flexible whitespace; a schema gets it back with
# ``"x-guidance": {"whitespace_flexible": true}``.
JSON_DEFAULTS = {"whitespace_flexible": False}


def grammar_text(so: StructuredOutputsParams) -> str:
    """llguidance's grammar for one StructuredOutputsParams."""
    if so.json is not None or so.json_object:
        schema = so.json if so.json is not None else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=JSON_DEFAULTS
        )
    if so.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        alternatives = " | ".join(json.dumps(c) for c in so.choice)  # Lark string literals
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    grammar = so.grammar
    if "::=" in grammar:  # GBNF (llama.cpp's), as vLLM also accepts
        grammar = llguidance.gbnf_to_lark(grammar)
    return llguidance.LLMatcher.grammar_from_lark(grammar)


class GrammarCompiler:
    """The model's vocabulary as llguidance sees it, and grammar checks against it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        backend = getattr(tokenizer.backend, "tok", None)  # a `tokenizers.Tokenizer`
        if backend is None:
            raise ValueError(
                f"structured_outputs need a tokenizer.json-style tokenizer; {tokenizer.source} "
                "is a SentencePiece model"
            )
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids)
        )

    def matcher(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; ValueError naming what is wrong."""
        try:
            grammar = grammar_text(so)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"structured_outputs.{so.kind}: {e}") from e
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"structured_outputs.{so.kind} is malformed or unsatisfiable: {error}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        mask = llg_numpy.allocate_token_bitmask(1, self.vocab_size)
        llg_numpy.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error() or not mask.any():
            why = matcher.get_error() or "no token can start it"
            raise ValueError(f"structured_outputs.{so.kind} is unsatisfiable: {why}")
        return matcher


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad_words: each word as written and with a leading space (the
    latter only when it makes a different first token and as many tokens)."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_bos=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_bos=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return [ids for ids in out if ids]


def packed_mask(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """i32[W] with exactly ``token_ids`` allowed."""
    bits = np.zeros(((vocab_size + 31) // 32) * 32, np.uint8)
    bits[np.asarray(token_ids, np.int64)] = 1
    return np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32)[:, 0]


def clear_bits(mask: np.ndarray, token_ids: list[int]) -> None:
    """Disallow ``token_ids`` in a packed mask i32[W], in place."""
    words = mask.view(np.uint32)
    for t in token_ids:
        words[t // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (t % 32)))


class TokenConstraints:
    """One completion's token mask: static parts (allowed ids, one-token bad words) made once,
    multi-token bad words and the grammar per step."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        *,
        tokenizer: Tokenizer | None,
        matcher: llguidance.LLMatcher | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.matcher = matcher
        words = (vocab_size + 31) // 32
        self.static = np.full(words, -1, np.int32)  # i32[W]
        if params.allowed_token_ids is not None:
            self.static = packed_mask(list(params.allowed_token_ids), vocab_size)
        self.bad_prefixes: list[tuple[list[int], int]] = []  # (tokens before, last token)
        if params.bad_words:
            for ids in bad_word_ids(tokenizer, list(params.bad_words)):
                if len(ids) == 1:
                    clear_bits(self.static, ids)
                else:
                    self.bad_prefixes.append((ids[:-1], ids[-1]))
        self._buffer = np.empty((1, words), np.int32)  # the grammar's mask is written here

    @property
    def is_stopped(self) -> bool:
        """The grammar reached its end: nothing more may be generated."""
        return self.matcher is not None and self.matcher.is_stopped()

    def mask(self, output_ids: list[int], grammar: np.ndarray | None = None) -> np.ndarray:
        """The packed mask of the next token after ``output_ids``; i32[W]. ``grammar``: this
        step's grammar mask i32[W] when the caller computed it already (a batch at once)."""
        mask = self.static
        if self.matcher is not None:
            if grammar is None:
                llg_numpy.fill_next_token_bitmask(self.matcher, self._buffer, 0)
                grammar = self._buffer[0]
            mask = mask & grammar
        banned = [
            last for prefix, last in self.bad_prefixes if output_ids[-len(prefix) :] == prefix
        ]
        if banned:
            mask = mask.copy()
            clear_bits(mask, banned)
        return mask

    def accept(self, token_ids: list[int]) -> bool:
        """Feed sampled tokens to the grammar; False if it rejects one (a bug upstream)."""
        if self.matcher is None:
            return True
        for t in token_ids:
            if not self.matcher.consume_token(int(t)):
                logger.error("grammar rejected token %d: %s", t, self.matcher.get_error())
                return False
        return True


class TokenMasks:
    """The driver's side of token masks: request checks, each completion's TokenConstraints,
    the masks of a step's rows, and the host seconds they took (``LLM.stats``)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._grammars: GrammarCompiler | None = None  # made at the first structured request
        self._executor: llguidance.LLExecutor | None = None  # threads for a batch of grammars
        self.seconds = 0.0  # host time making masks
        self.hidden_seconds = 0.0  # of which the device's forward was still running after
        self.num_steps = 0  # steps that made at least one

    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammars

    def check(self, params: SamplingParams) -> None:
        """Token ids of the logits controls against the vocabulary, and the grammar."""
        for name in ("logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name} has token ids {bad[:5]} outside the vocab of {self.vocab_size}"
                )
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer")
        if params.structured_outputs is not None:
            self.grammars().matcher(params.structured_outputs)

    def constraints(self, params: SamplingParams) -> list[TokenConstraints | None]:
        """One TokenConstraints per completion of a request that masks tokens, else Nones."""
        if params.allowed_token_ids is None and not params.needs_mask_per_step:
            return [None] * params.n
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.grammars().matcher(params.structured_outputs)
        return [
            TokenConstraints(
                params,
                self.vocab_size,
                tokenizer=self.tokenizer,
                matcher=matcher.deep_copy() if matcher is not None else None,
            )
            for _ in range(params.n)
        ]

    def masks(self, rows: list[tuple[int, TokenConstraints, list[int]]]) -> dict[int, np.ndarray]:
        """Row -> packed mask i32[W] of (row, constraints, output ids so far) triples; timed."""
        if not rows:
            return {}
        start = time.perf_counter()
        # every grammar row's mask in one call, on llguidance's threads
        grammar = [(i, c.matcher) for i, (_, c, _) in enumerate(rows) if c.matcher is not None]
        buffer = np.full((len(rows), (self.vocab_size + 31) // 32), -1, np.int32)  # i32[n, W]
        if len(grammar) > 1:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            pairs = [(matcher, i) for i, matcher in grammar]
            llg_numpy.fill_next_token_bitmask_par(self._executor, pairs, buffer)
        else:
            for i, matcher in grammar:
                llg_numpy.fill_next_token_bitmask(matcher, buffer, i)
        masks = {
            row: constraints.mask(output_ids, buffer[i] if constraints.matcher else None)
            for i, (row, constraints, output_ids) in enumerate(rows)
        }
        self.seconds += time.perf_counter() - start
        self.num_steps += 1
        return masks
