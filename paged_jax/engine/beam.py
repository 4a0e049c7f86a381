"""Beam search on shared pages: the host-side beam update, HF transformers' algorithm.

A request's beams are one ``BeamGroup``. Each step every live beam computes one token and the
step returns the log-probabilities of its top candidates (``SamplingParams.logprobs``); a beam
that has its candidates waits (it has nothing to compute) until every live beam of its group
has them. Then ``advance`` runs HF's update (``GenerationMixin._beam_search``, transformers 5):

- candidates: each beam's score (sum of log-probs) plus its top tokens' log-probs; keep the
  best ``beams_to_keep = max(2, 1 + num_eos) * beam_width``;
- a candidate "hits a stop" when its token is EOS or it reaches max_tokens; of those, only the
  ``beam_width`` best-ranked become finished hypotheses, scored
  ``sum_logprobs / num_generated ** length_penalty`` (the stop token counted), the best
  ``beam_width`` hypotheses kept;
- the next beams: the ``beam_width`` best candidates that hit no stop. A beam chosen by several
  children is forked (pages shared by count; the first write copies the shared last page), a
  beam chosen by none is dropped (its pages freed);
- early stopping with HF's meaning: True stops once ``beam_width`` hypotheses exist; False
  stops when the best running beam, scored at the current length, cannot beat the worst
  hypothesis; "never" scores it at max_tokens when length_penalty > 0.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence as SequenceOf
from typing import Literal

from paged_jax.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from paged_jax.engine.sequence import Sequence, SequenceGroup

_NEG = -1.0e9  # HF's "cannot be chosen" score


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """``LLM.beam_search`` options (vLLM's names; early_stopping as HF's)."""

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool):
            raise ValueError(f"beam_width={self.beam_width!r} must be an int")
        if not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise ValueError(f"beam_width={self.beam_width} must be in [1, {MAX_LOGPROBS // 2}]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        if not isinstance(self.length_penalty, int | float) or isinstance(
            self.length_penalty, bool
        ):
            raise ValueError(f"length_penalty={self.length_penalty!r} must be a float")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping={self.early_stopping!r} must be True, False or 'never'"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")

    def num_candidates(self, num_eos: int) -> int:
        """HF's beams_to_keep: candidates per beam the step must return."""
        return max(2, 1 + num_eos) * self.beam_width


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its generated tokens (a final EOS included) and score."""

    token_ids: tuple[int, ...]
    score: float


@dataclasses.dataclass(frozen=True)
class BeamUpdate:
    """What the scheduler must do after one beam step of a group."""

    extend: list[tuple[Sequence, int, float]]  # (beam, token, score): it continues with token
    fork: list[tuple[Sequence, int, float]]  # (parent, token, score): a new beam off parent
    drop: list[Sequence]  # beams no candidate continues
    done: bool  # the search is over: every live beam goes


class BeamGroup(SequenceGroup):
    """The beams of one request and its finished hypotheses."""

    is_beam = True

    def __init__(self, seq: Sequence, params: BeamSearchParams, eos_token_ids: frozenset[int]):
        super().__init__([seq])
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.scores = {seq.seq_id: 0.0}  # live beam -> sum of its log-probs
        self.pending: dict[int, tuple[int, list[tuple[int, float]]]] = {}
        self.hypotheses: list[Hypothesis] = []  # best first, at most beam_width
        self.improvable = True  # HF's is_early_stop_heuristic_unsatisfied
        self.done = False

    @staticmethod
    def sampling_params(params: BeamSearchParams, num_eos: int) -> SamplingParams:
        """What each beam runs with: greedy (ignored), candidates as logprobs, no stops of its
        own (the group decides)."""
        return SamplingParams(
            temperature=0.0,
            max_tokens=params.max_tokens,
            ignore_eos=True,
            logprobs=params.num_candidates(num_eos),
            detokenize=False,
        )

    def record(self, seq: Sequence, top_ids: SequenceOf[int], top: SequenceOf[float]) -> None:
        """One beam's candidates for the token after its current ones."""
        k = self.params.num_candidates(len(self.eos_token_ids))
        self.pending[seq.seq_id] = (seq.num_tokens, list(zip(top_ids[:k], top[:k], strict=True)))

    def ready(self) -> bool:
        """Every live beam has its candidates for this round."""
        return all(self.pending.get(s.seq_id, (-1,))[0] == s.num_tokens for s in self.unfinished)

    def advance(self) -> BeamUpdate:
        """HF's beam update over the pending candidates (see the module docstring)."""
        p, beams = self.params, self.unfinished
        width = p.beam_width
        num_generated = beams[0].num_output_tokens + 1  # with the token chosen now
        last = num_generated >= p.max_tokens
        cands = [
            (self.scores[b.seq_id] + float(lp), i, int(t), b)
            for i, b in enumerate(beams)
            for t, lp in self.pending[b.seq_id][1]
        ]
        cands = heapq.nlargest(p.num_candidates(len(self.eos_token_ids)), cands,
                               key=lambda c: (c[0], -c[1], -c[2]))  # fmt: skip
        self.pending.clear()
        stops = [last or c[2] in self.eos_token_ids for c in cands]
        full = len(self.hypotheses) == width
        if self.improvable and not (full and p.early_stopping is True):
            for rank, ((score, _, token, beam), stop) in enumerate(zip(cands, stops, strict=True)):
                if stop and rank < width:
                    tokens = (*beam.output_token_ids, token)
                    self._add(Hypothesis(tokens, score / num_generated**p.length_penalty))
        running = [c for c, stop in zip(cands, stops, strict=True) if not stop][:width]
        if running:
            best = running[0][0]
            length = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else (
                num_generated)  # fmt: skip
            full = len(self.hypotheses) == width
            worst = self.hypotheses[-1].score if full else _NEG
            self.improvable = self.improvable and best / length**p.length_penalty > worst
        full = len(self.hypotheses) == width
        self.done = not running or not self.improvable or (full and p.early_stopping is True)
        if self.done:
            return BeamUpdate([], [], list(beams), True)
        children: dict[int, list[tuple[int, float]]] = {}
        for score, _, token, beam in running:
            children.setdefault(beam.seq_id, []).append((token, score))
        extend, fork, drop = [], [], []
        for beam in beams:
            kids = children.get(beam.seq_id)
            if not kids:
                drop.append(beam)
                continue
            extend.append((beam, *kids[0]))
            fork += [(beam, token, score) for token, score in kids[1:]]
        self.scores = {beam.seq_id: score for beam, _, score in extend}
        return BeamUpdate(extend, fork, drop, False)

    def prepare_prefill(self) -> Sequence:
        """Preempted: every beam recomputes and gives its candidates again."""
        self.pending.clear()
        return super().prepare_prefill()

    def add_beam(self, seq: Sequence, score: float) -> None:
        """A forked beam joins the group."""
        seq.group = self
        self.members.append(seq)
        self.scores[seq.seq_id] = score

    def prune(self) -> None:
        """Forget dropped beams."""
        self.members = [s for s in self.members if not s.is_finished]

    def _add(self, hyp: Hypothesis) -> None:
        self.hypotheses.append(hyp)
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.params.beam_width :]
