"""One engine step at a time, planned so that the device does not wait for the host.

A step is: plan (``Scheduler.schedule``), start (``ModelRunner.start``: pack, dispatch, no
wait), launch (``Scheduler.launch``: its K/V counts as computed, a placeholder stands for
each token it samples), then resolve: read the tokens back (``fetch``), ``Scheduler.resolve``
(tokens in, EOS / stop ids / lengths), grammars fed, logprobs, incremental detokenization,
stop strings, beams, metrics.

With ``async_scheduling`` one step stays in flight between calls, and each call does::

    plan = scheduler.schedule()     # step n on the device; its tokens are placeholders
    start(plan, feed=step n)        # step n + 1 queued; its placeholder inputs are fed on
                                    # the device from step n's samples (runtime.feed)
    resolve(step n)                 # waits for step n; the device goes on with step n + 1
    token masks of step n + 1; runner.select; scheduler.launch(plan)

so planning, packing and all of step n's host work overlap the device. The tokens are those
of the synchronous loop: sampling is keyed on (seed, output index) only, and a sequence that
step n stops (EOS, a stop string, a grammar's end) has its row of step n + 1 discarded (its
pages are freed at once; the device writes them before any later step can reuse them).
Steps run synchronously while beams are in flight (a beam's next token is its group's choice
on the host). After a decode burst, the next step is fed each row's own last sample. Token
masks are made after the step's forward is dispatched and before its selection, in both
modes: the grammar's host time overlaps the device's forward.

``idle_s`` of a step record bounds the time the device waited for the host: from the last
moment it was known busy (a readback returning) to the next enqueue, counted only when the
step in flight had already finished by then.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from paged_jax.engine.plan import StepPlan, feed_rows
from paged_jax.engine.sequence import SequenceStatus
from paged_jax.metrics import StepTimes
from paged_jax.request import BeamRequest, Completion, Request
from paged_jax.runtime.inflight import InFlight

if TYPE_CHECKING:
    from paged_jax.driver import Driver


@dataclasses.dataclass(eq=False)
class Launched:
    plan: StepPlan
    inflight: InFlight
    schedule_s: float
    masks_later: bool


class Stepper:
    """The step loop of one driver (its scheduler, runner, metrics and live requests)."""

    def __init__(self, driver: Driver, async_scheduling: bool) -> None:
        self.d = driver
        self.async_scheduling = async_scheduling
        self._pending: Launched | None = None  # the step in flight between two calls
        self._busy_until: float | None = None  # the device was last known busy then
        self._last_end: float | None = None  # end of the previous step record
        self.num_pipelined = 0  # steps planned while another was in flight

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def step(self) -> list[Request]:
        """One engine step over every request in flight; returns those that got tokens."""
        call_start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and not self._may_pipeline(pending):
            return self._resolve(pending, call_start)
        if pending is None:
            pending = self._plan_and_start(None, call_start)
            if pending is None:
                return []
            self._finish_start(pending)
            if not self._may_pipeline(pending):
                return self._resolve(pending, call_start)
        following = self._plan_and_start(pending, call_start)
        touched = self._resolve(pending, call_start)
        if following is not None:
            self._finish_start(following)
            self._pending = following
            self.num_pipelined += 1
        return touched

    def drain(self) -> None:
        """Resolve the step in flight, if any (its rows are discarded when nobody waits)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._resolve(pending, time.perf_counter())
        self._busy_until = self._last_end = None

    def _may_pipeline(self, launched: Launched) -> bool:
        """Plan the next step before this one is read back: not while beams run (their next
        tokens are chosen on the host), nor after a burst whose rows' last samples are not
        tracked on the device."""
        return self.async_scheduling and not self.d._beams and launched.inflight.last_exact

    def _plan_and_start(self, previous: Launched | None, call_start: float) -> Launched | None:
        """Plan a step and dispatch its forward; None when there is nothing to run."""
        d = self.d
        start = time.perf_counter()
        plan = d.scheduler.schedule()
        schedule_s = time.perf_counter() - start
        if plan.is_empty:
            if not plan.preempted and previous is None:
                raise RuntimeError("scheduler made no progress with requests pending")
            d.metrics.num_preemptions += len(plan.preempted)
            return None  # a sequence preempted itself; the next step re-admits it
        d._before_run(plan)
        masks_later = not plan.num_steps and self._has_masks(plan)
        masks = None if masks_later else self._token_masks(plan)  # a burst's are static
        rows = feed_rows(plan, previous.plan if previous else None)
        feed = (previous.inflight, rows) if rows else None
        inflight = d.runner.start(plan, masks, feed=feed, masks_later=masks_later)
        if previous is None or inflight.previous_ready:  # the device had nothing to do
            since = self._busy_until if self._busy_until is not None else call_start
            if previous is not None:  # it was busy at least from that step's enqueue
                since = max(since, previous.inflight.enqueued)
            inflight.idle_s = max(0.0, inflight.enqueued - since)
        return Launched(plan, inflight, schedule_s, masks_later)

    def _finish_start(self, launched: Launched) -> None:
        """Token masks (the grammars have seen every token before this step's), the
        selection, and the scheduler's launch."""
        if launched.masks_later:
            token_masks = self.d.token_masks
            before = token_masks.seconds
            masks = self._token_masks(launched.plan)
            # hidden: the forward was still running when the masks were done
            if not launched.inflight.ready():
                token_masks.hidden_seconds += token_masks.seconds - before
            self.d.runner.select(launched.inflight, masks)
        self.d.scheduler.launch(launched.plan)

    def _has_masks(self, plan: StepPlan) -> bool:
        live = self.d._live
        return any(
            item.sample and item.seq.seq_id in live and live[item.seq.seq_id][1].constraints
            for item in plan.scheduled
        )

    def _token_masks(self, plan: StepPlan) -> dict:
        """Row -> packed token mask i32[W] for the rows that sample under TokenConstraints."""
        rows = []
        for row, item in enumerate(plan.scheduled):
            live = self.d._live.get(item.seq.seq_id) if item.sample else None
            if live is not None and live[1].constraints is not None:
                rows.append((row, live[1].constraints, item.seq.output_token_ids))
        return self.d.token_masks.masks(rows)

    def _resolve(self, launched: Launched, call_start: float) -> list[Request]:
        """Wait for a launched step and apply it: tokens, stops, logprobs, text, beams."""
        d, plan, inflight = self.d, launched.plan, launched.inflight
        out = d.runner.fetch(inflight)
        ran = self._busy_until = time.perf_counter()
        if out.logprobs is not None or out.prompt_logprobs is not None:
            offset = 0
            for row, item in enumerate(plan.scheduled):
                if (live := d._live.get(item.seq.seq_id)) is not None:
                    live[0].record_logprobs(live[1], item, row, out, offset)
                offset += item.num_new_tokens
        finished = {s.seq_id for s in d.scheduler.resolve(plan, out.sampled.tolist())}
        finished |= self._feed_constraints(plan)
        touched, num_sampled = [], 0
        beam_requests: dict[int, BeamRequest] = {}
        for row, item in enumerate(plan.scheduled):
            seq = item.seq
            if not item.sample:
                continue
            if seq.seq_id in d._beams:
                beam = d._beams[seq.seq_id]
                if seq.status is SequenceStatus.RUNNING:
                    top_ids, top = out.logprobs["top_ids"][row], out.logprobs["top"][row]
                    beam.group.record(seq, top_ids.tolist(), top.tolist())
                    beam_requests[id(beam)] = beam
                continue
            live = d._live.get(seq.seq_id)
            if live is None:
                continue  # finished before this step's tokens came back: a discarded row
            req, completion = live
            num_new = seq.num_output_tokens - item.sample_position  # > 1 only in a burst
            num_sampled += num_new
            touched.append(req)
            if completion.detok is not None:
                for j in range(num_new):
                    done = seq.seq_id in finished and j == num_new - 1
                    if not self._on_token(completion, item.sample_position + j, done):
                        break  # a stop string: the tokens after it are gone
            if seq.is_finished:
                del d._live[seq.seq_id]
        for beam in beam_requests.values():
            num_sampled += self._advance_beams(beam)
        end = time.perf_counter()
        begin = self._last_end if self._last_end is not None else call_start
        self._last_end = end
        times = StepTimes(
            start=min(begin, end),
            end=end,
            schedule_s=launched.schedule_s,
            update_s=end - ran,
            runner=(inflight.pack_s, inflight.dispatch_s, inflight.wait_s),
            idle_s=inflight.idle_s,
        )
        d.metrics.record(plan, num_sampled, d.scheduler.kv_utilization(), times)
        return touched

    def _feed_constraints(self, plan: StepPlan) -> set[int]:
        """Give each grammar its row's new tokens; finish the completions whose grammar ended
        (or rejected a token). Returns their seq ids."""
        finished = set()
        for item in plan.scheduled:
            live = self.d._live.get(item.seq.seq_id) if item.sample else None
            if live is None or live[1].constraints is None or live[1].constraints.matcher is None:
                continue
            seq, constraints = item.seq, live[1].constraints
            accepted = constraints.accept(seq.output_token_ids[item.sample_position :])
            if not seq.is_finished and (constraints.is_stopped or not accepted):
                self.d.scheduler.finish(seq, "stop" if accepted else "abort")
                finished.add(seq.seq_id)
        return finished

    def _advance_beams(self, request: BeamRequest) -> int:
        """The beam update of a group whose live beams all have candidates; tokens chosen."""
        group = request.group
        if not group.ready():
            return 0
        update = group.advance()
        for seq in self.d.scheduler.apply_beam_update(group, update):
            self.d._beams[seq.seq_id] = request
        for seq in update.drop:
            del self.d._beams[seq.seq_id]
        return len(update.extend) + len(update.fork)

    def _on_token(self, req: Completion, index: int, finished: bool) -> bool:
        """Detokenize output ``index`` and look for stop strings; False if one stopped it."""
        seq, params = req.seq, req.seq.sampling_params
        token_id = seq.token_ids[seq.num_prompt_tokens + index]
        before = len(req.detok.text)
        req.detok.add(token_id)
        if finished:
            req.detok.flush()
        text = req.detok.text
        stops = params.stop_strings
        if stops and index + 1 >= params.min_tokens:
            # only a stop string that ends in the new text: one that came out whole before
            # min_tokens was reached does not count
            hits = [(text.find(s, max(0, before - len(s) + 1)), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut, stop = min(hits)
                req.text = text[: cut + len(stop) * params.include_stop_str_in_output]
                self.d.scheduler.finish(seq, "stop", stop, num_output_tokens=index + 1)
                return False
        req.text = text
        return True
