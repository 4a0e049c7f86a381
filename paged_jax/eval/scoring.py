"""Pure scoring helpers of the eval tasks: perplexity windows, context/continuation splits,
answer normalisation and metric aggregation.

No jax, no numpy and no engine here, so that ``scripts/make_fixtures.py`` (run in a reference
venv without jax) computes the HF perplexity over exactly the windows the engine scores.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go to the model; positions ``[score_from, end)`` are scored
    (absolute positions in the document). No position is scored twice; with stride < window
    every position >= 1 is scored once."""

    begin: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def perplexity_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Rolling windows of at most ``window`` tokens starting every ``stride`` tokens.

    Each window scores only the tokens the previous one did not reach; the rest of the window
    is context. A window's first token has no context and is never scored: position 0 always,
    and with stride == window (no overlap) every window start. The last window ends at
    ``num_tokens``.
    """
    if window < 2:
        raise ValueError(f"{window=} must be >= 2")
    if not 1 <= stride <= window:
        raise ValueError(f"{stride=} must be in [1, window={window}]")
    windows: list[Window] = []
    prev_end = 0
    begin = 0
    while prev_end < num_tokens:
        end = min(begin + window, num_tokens)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        begin += stride
    return windows


def window_nll(
    windows: Sequence[Window], token_logprob: Callable[[Window, int], float]
) -> tuple[float, int]:
    """(sum of negative log-likelihoods, number of scored tokens). ``token_logprob(w, pos)`` is
    log p(token pos | tokens w.begin..pos-1)."""
    total, count = 0.0, 0
    for w in windows:
        for pos in range(w.score_from, w.end):
            total -= token_logprob(w, pos)
            count += 1
    return total, count


def perplexity(nll_sum: float, num_tokens: int) -> float:
    return math.exp(nll_sum / num_tokens) if num_tokens else float("nan")


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (it tokenizes with the
    next word in byte-level BPE), as in lm-evaluation-harness."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def continuation_ids(
    encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the continuation is what encoding the whole text adds
    past the context's own encoding (lm-evaluation-harness's split)."""
    context, continuation = split_context(context, continuation)
    ctx = encode(context)
    cont = encode(context + continuation)[len(ctx) :]
    if not ctx:
        raise ValueError(f"context {context!r} encodes to no tokens")
    if not cont:
        raise ValueError(f"continuation {continuation!r} adds no tokens to {context!r}")
    return ctx, cont


@dataclasses.dataclass(frozen=True)
class ChoiceScore:
    logprob: float  # sum over the continuation's tokens
    num_tokens: int
    num_chars: int
    is_greedy: bool  # every continuation token was the argmax


def choose(scores: Sequence[ChoiceScore]) -> tuple[int, int]:
    """(raw pick, length-normalised pick): argmax of the summed logprob, and of the summed
    logprob divided by the choice's length in characters (lm-evaluation-harness acc_norm).
    Ties go to the first choice."""
    raw = max(range(len(scores)), key=lambda i: scores[i].logprob)
    norm = max(range(len(scores)), key=lambda i: scores[i].logprob / max(scores[i].num_chars, 1))
    return raw, norm


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(output: str, answers: Sequence[str]) -> bool:
    out = normalize_answer(output)
    return any(out == normalize_answer(a) for a in answers)


def contains(output: str, answers: Sequence[str]) -> bool:
    """Some answer appears in the output as whole words (after normalisation)."""
    out = f" {normalize_answer(output)} "
    return any(f" {normalize_answer(a)} " in out for a in answers if normalize_answer(a))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def stderr_of_mean(values: Sequence[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def mean_and_stderr(name: str, values: Sequence[float]) -> dict[str, float]:
    """``{name: mean, name_stderr: its standard error}`` for a task's metrics."""
    return {name: mean(values), f"{name}_stderr": stderr_of_mean(values)}
