"""Per-request sampling and stopping parameters (vLLM-shaped), validated at construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from paged_jax.engine.structured_params import StructuredOutputsParams

MAX_LOGPROBS = 20  # top-k logprobs a request may ask for (the step computes this many)
MAX_LOGIT_BIAS = 256  # entries of logit_bias per request (a fixed-width device array)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k -1 and top_p 1 and min_p 0 switch those filters off.
    A seeded request yields the same tokens whatever else is in the batch; an unseeded one
    gets a seed derived from its request id (see `paged_jax.engine.sequence`). ``cache_salt``
    keeps a request's cached KV pages apart from every request with another salt (tenants).
    """

    n: int = 1  # completions of the prompt; they share its KV pages
    best_of: int | None = None  # rejected: see __post_init__
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: return token ids only (text ""), no stop strings
    cache_salt: str | None = None  # prefix-cache namespace: requests of other salts never share
    # vLLM's logits controls, applied on device in this order: allowed_token_ids and bad_words
    # masks, logit_bias, then repetition, frequency and presence penalties (see runtime.controls)
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # divide positive / multiply negative logits of seen tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never complete one of these words (multi-token)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    spaces_between_special_tokens: bool = True  # see __post_init__
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be an int >= 1")
        if self.best_of is not None:
            raise ValueError(
                f"best_of={self.best_of!r} is not supported (vLLM V1 dropped it too): "
                "use n=k and rank the completions yourself, or LLM.beam_search"
            )
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"temperature={self.temperature!r} must be a float")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not _is_int(self.top_k) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be -1 (off) or an int >= 1")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed={self.seed!r} must be None or an int in [0, 2**32)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens!r} must be an int in "
                f"[0, max_tokens={self.max_tokens}]"
            )
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop={self.stop!r} must be a str, a list of str or None")
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop={self.stop!r} must hold non-empty strings only")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of int")
        for token_id in self.stop_token_ids or ():
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must hold ints >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value == -1:
                raise ValueError(
                    f"{name}=-1 (the whole vocabulary) is refused: it would bring V floats per "
                    f"token back from the device; ask for at most {MAX_LOGPROBS}"
                )
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name}={value!r} must be None or an int in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.detokenize, bool):
            raise ValueError(f"detokenize={self.detokenize!r} must be a bool")
        if not self.detokenize and self.stop_strings:
            raise ValueError(f"stop={self.stop!r} needs detokenize=True")
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not self.cache_salt
        ):
            raise ValueError(f"cache_salt={self.cache_salt!r} must be a non-empty str or None")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens={self.skip_special_tokens!r} must be a bool")
        self._check_controls()

    def _check_controls(self) -> None:
        """The vLLM logits controls (token ids against the vocab are checked by the driver)."""
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
            value = getattr(self, name)
            if not _is_float(value) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r} must be a float in [{lo}, {hi}]")
        rep = self.repetition_penalty
        if not _is_float(rep) or not 0 < rep < math.inf:
            raise ValueError(f"repetition_penalty={rep!r} must be a float > 0")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias={self.logit_bias!r} must be a dict token id -> bias")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias=<{len(self.logit_bias)} entries> holds more than {MAX_LOGIT_BIAS}"
                )
            bias = {}
            for key, value in self.logit_bias.items():  # JSON gives str keys: "123" -> 123
                token_id = int(key) if isinstance(key, str) and key.isdigit() else key
                if not _is_int(token_id) or token_id < 0:
                    raise ValueError(f"logit_bias={{{key!r}: ...}}: keys must be token ids >= 0")
                if not _is_float(value) or not -100 <= value <= 100:
                    raise ValueError(
                        f"logit_bias={{{key!r}: {value!r}}}: biases must be in [-100, 100]"
                    )
                bias[token_id] = float(value)
            object.__setattr__(self, "logit_bias", bias)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if (
                not isinstance(ids, list | tuple)
                or not ids
                or not all(_is_int(t) and t >= 0 for t in ids)
            ):
                raise ValueError(f"allowed_token_ids={ids!r} must be a non-empty list of ids >= 0")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list | tuple)
            or not all(isinstance(w, str) and w.strip() for w in self.bad_words)
        ):
            raise ValueError(f"bad_words={self.bad_words!r} must be a list of non-empty str")
        for name in ("include_stop_str_in_output", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        # spaces_between_special_tokens: decoding goes through `tokenizers` (vLLM's fast
        # path), which joins special tokens without added spaces whatever this says; vLLM's
        # fast detokenizer ignores it the same way. Kept for signature compatibility.
        if self.structured_outputs is not None:
            so = StructuredOutputsParams.coerce(self.structured_outputs)
            object.__setattr__(self, "structured_outputs", so)
            if not self.detokenize:
                raise ValueError("structured_outputs needs detokenize=True (a tokenizer)")

    @property
    def uses_controls(self) -> bool:
        """Some logits control is set: the step runs ``runtime.controls`` for this row."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or bool(self.bad_words)
            or self.structured_outputs is not None
        )

    @property
    def needs_mask_per_step(self) -> bool:
        """The row's token mask depends on its newest tokens (multi-token bad words, a grammar):
        the host makes it every step, so such rows never run in a decode burst."""
        return bool(self.bad_words) or self.structured_outputs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whichever form it was given in."""
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)
