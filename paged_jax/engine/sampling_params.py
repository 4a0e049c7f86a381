"""Per-request sampling and stopping parameters (vLLM-shaped), validated at construction."""

from __future__ import annotations

import dataclasses
import math

MAX_LOGPROBS = 20  # top-k logprobs a request may ask for (the step computes this many)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
