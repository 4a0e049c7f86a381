"""The engine loop: requests in, one schedule -> run -> update step at a time, outputs out.

The driver owns every request in flight, whichever call added it: ``generate`` and any number
of half-read ``stream``s share one loop, so a step made for one caller also advances the
others' requests and nothing is lost between calls. Per step (``paged_jax.stepper``, which
with ``async_scheduling`` plans step n + 1 while the device runs step n)::

    plan = scheduler.schedule()          # host policy; pages from the KV cache manager
    inflight = runner.start(plan)        # pack -> jitted step, not waited for
    scheduler.launch(plan); out = runner.fetch(inflight)
    finished = scheduler.resolve(plan, out.sampled)
    then: logprobs, incremental detokenization, stop strings, metrics

Stop strings are found there, on the detokenized text, and cut from the returned text (kept
with ``include_stop_str_in_output``). Token masks (allowed ids, bad words, grammars) are made
per step from each completion's ``structured.TokenConstraints`` and fed its new tokens.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

from paged_jax.engine.beam import BeamGroup, BeamSearchParams
from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from paged_jax.engine.scheduler import Scheduler
from paged_jax.engine.sequence import Sequence, SequenceGroup
from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.tokenizer import Tokenizer
from paged_jax.metrics import EngineMetrics
from paged_jax.request import BeamRequest, Completion, Prompt, Request
from paged_jax.runtime.runner import ModelRunner
from paged_jax.stepper import Stepper
from paged_jax.structured import TokenMasks

logger = logging.getLogger(__name__)

Encoder = Callable[[Prompt], tuple[str | None, list[int]]]


class Driver:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        metrics: EngineMetrics,
        *,
        encode: Encoder,
        tokenizer: Tokenizer | None,
        model_name: str,
        default_seed: int = 0,
        async_scheduling: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.metrics = metrics
        self._encode = encode
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._default_seed = default_seed
        self._request_ids = itertools.count()
        # seq_id -> its request and completion, until the completion finishes
        self._live: dict[int, tuple[Request, Completion]] = {}
        self._beams: dict[int, BeamRequest] = {}  # seq_id of a live beam -> its request
        self.token_masks = TokenMasks(tokenizer, runner.cfg.vocab_size)
        # test hook: NaN into every page no one holds (and no hit can read) before each step
        self.poison_free_pages = False
        self.stepper = Stepper(self, async_scheduling)

    # ------------------------------------------------------------------ requests

    def check(self, prompt: Prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Everything that could make this request fail, checked now (ValueError naming the
        field); returns the prompt's text and token ids."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if self._tokenizer is None and params.detokenize:
            raise ValueError(
                f"model={self._model_name!r} has no tokenizer: use SamplingParams(detokenize=False)"
            )
        self.scheduler.check_group_size(params.n)
        self.token_masks.check(params)
        text, ids = self.encode_checked(prompt)
        self.scheduler.check_group_fits(len(ids), params.max_tokens, params.n)
        return text, ids

    def make_request(self, prompt: Prompt, params: SamplingParams) -> Request:
        """Validate and tokenize one prompt (ValueError naming the field); not queued yet."""
        text, ids = self.check(prompt, params)
        request_id = str(next(self._request_ids))
        completions = []
        constraints = self.token_masks.constraints(params)
        for index in range(params.n):
            seq = Sequence(request_id, ids, params, prompt=text,
                           default_seed=self._default_seed, index=index)  # fmt: skip
            detok = None
            if self._tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(
                    self._tokenizer, ids, skip_special_tokens=params.skip_special_tokens
                )
            completions.append(Completion(seq, detok, constraints[index]))
        if params.n > 1:
            SequenceGroup([c.seq for c in completions])
        return Request(completions)

    def make_beam_request(self, prompt: Prompt, params: BeamSearchParams) -> BeamRequest:
        """Validate and tokenize one beam search prompt; not queued yet."""
        text, ids = self.check_beam(prompt, params)
        eos = frozenset() if params.ignore_eos else self.scheduler.eos_token_ids
        sp = BeamGroup.sampling_params(params, len(eos))
        seq = Sequence(str(next(self._request_ids)), ids, sp, prompt=text)
        return BeamRequest(BeamGroup(seq, params, eos))

    def check_beam(self, prompt: Prompt, params: BeamSearchParams) -> tuple[str | None, list[int]]:
        """Everything that could make this beam search fail, checked now."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        text, ids = self.encode_checked(prompt)
        cfg = self.scheduler.config
        if len(ids) + params.max_tokens > cfg.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens: with max_tokens={params.max_tokens} that is more "
                f"than max_model_len={cfg.max_model_len}"
            )
        if params.beam_width > cfg.max_num_seqs:
            raise ValueError(
                f"beam_width={params.beam_width} is more than max_num_seqs={cfg.max_num_seqs}"
            )
        self.scheduler.check_group_fits(
            len(ids), params.max_tokens, params.beam_width, "beam_width"
        )
        eos = frozenset() if params.ignore_eos else self.scheduler.eos_token_ids
        if params.num_candidates(len(eos)) > MAX_LOGPROBS:
            raise ValueError(
                f"beam_width={params.beam_width} with {len(eos)} EOS ids needs "
                f"{params.num_candidates(len(eos))} candidates per beam, more than {MAX_LOGPROBS}"
            )
        return text, ids

    def encode_checked(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text and token ids of a prompt that fits max_model_len; ValueError otherwise."""
        text, ids = self._encode(prompt)
        max_model_len = self.scheduler.config.max_model_len
        if len(ids) > max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len={max_model_len}"
            )
        return text, ids

    def add(self, request: Request | BeamRequest) -> None:
        self.scheduler.add(request.seq)  # a group's first member brings the others
        if isinstance(request, BeamRequest):
            self._beams[request.seq.seq_id] = request
            return
        for completion in request.completions:
            self._live[completion.seq.seq_id] = (request, completion)

    def add_all(self, requests: list[Request | BeamRequest]) -> None:
        """Queue every request, or none: a failure takes back the ones already queued."""
        try:
            for r in requests:
                self.add(r)
        except BaseException:
            for r in requests:
                self.abort(r)
            raise

    def abort(self, request: Request | BeamRequest) -> None:
        """Stop a request now and free its pages (no-op once it finished)."""
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._live.pop(seq.seq_id, None)
            self._beams.pop(seq.seq_id, None)
        if isinstance(request, BeamRequest):
            request.group.done = True

    def abort_all(self) -> None:
        for request in {id(r): r for r, _ in self._live.values()}.values():
            self.abort(request)
        for request in {id(r): r for r in self._beams.values()}.values():
            self.abort(request)
        self.stepper.drain()

    @property
    def num_unfinished(self) -> int:
        """Completions and beams in flight."""
        return len(self._live) + len(self._beams)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[Request]:
        """One engine step over every request in flight (``paged_jax.stepper``). Returns those
        that got new tokens."""
        return self.stepper.step()

    def _before_run(self, plan: StepPlan) -> None:
        """Test hooks between planning and running a step (off by default)."""
        if self.poison_free_pages:  # a stray read of a free page then turns the output NaN
            self.runner.fill_free_pages(self.scheduler.kv_cache.uncached_free_page_ids())

    def run_until_done(self, requests: list[Request], use_tqdm: bool) -> Iterator[list[Request]]:
        """Step until every one of ``requests`` finished (others in flight advance too); yields
        each step's touched requests. Closing the iterator early aborts the unfinished ones."""
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not use_tqdm)
        remaining = requests
        try:
            with _frozen_heap():
                # one pass a step, after the yield: other calls may have stepped meanwhile
                while remaining := [r for r in remaining if not r.is_finished]:
                    touched = self.step()
                    bar.update(len(requests) - sum(not r.is_finished for r in remaining) - bar.n)
                    bar.set_postfix(tok_s=f"{self.metrics.output_tokens_per_s:.1f}", refresh=False)
                    yield touched
        finally:
            bar.close()
            for r in requests:  # an interrupted run must not leave pages allocated
                self.abort(r)
            if not self.num_unfinished:  # nothing waits for the step in flight
                self.stepper.drain()

    def iter_completed(
        self, requests: list[Any], output: Callable[[Any], Any], use_tqdm: bool
    ) -> Iterator[tuple[int, Any]]:
        """(index, output(request)) as each of ``requests`` finishes; closing it early aborts
        the rest."""
        pending = dict(enumerate(requests))
        steps = self.run_until_done(requests, use_tqdm)
        try:
            for _ in steps:
                for i in [i for i, r in pending.items() if r.is_finished]:
                    yield i, output(pending.pop(i))
            for i, r in pending.items():  # finished during another call's step
                yield i, output(r)
        finally:
            steps.close()

    def stream_text(self, request: Request) -> Iterator[str]:
        """The request's text piece by piece; queued at the first ``next()`` (a stream never
        started holds nothing), aborted when the stream is abandoned."""
        self.add(request)
        steps = self.run_until_done([request], use_tqdm=False)
        emitted = 0  # characters yielded; other calls may step the request between two pieces
        try:
            for _ in steps:
                if len(request.text) > emitted:
                    piece, emitted = request.text[emitted:], len(request.text)
                    yield piece
            if len(request.text) > emitted:  # finished during another call's step
                yield request.text[emitted:]
        finally:
            steps.close()


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects that exist when the outermost step loop starts (the engine, JAX's caches,
    the caller's) are left out of the garbage collector's passes until it ends (``gc.freeze``,
    as vLLM does after start-up): on the H200 host a full pass over them took 100-240 ms every
    2 s or so of a llama-1b run, a stall of the whole loop, while the loop's own garbage is
    young. ``gc.unfreeze`` when the outermost loop ends (also releasing what anyone else
    froze), so that a dropped engine's reference cycles are collected."""
    global _frozen_loops
    with _freeze_lock:
        _frozen_loops += 1
        if _frozen_loops == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _freeze_lock:
            _frozen_loops -= 1
            if _frozen_loops == 0:
                gc.unfreeze()


_freeze_lock = threading.Lock()
_frozen_loops = 0  # step loops running in this process (streams and generate calls)
