"""Applying a step to the scheduler's sequences: ``launch`` when it is dispatched, ``resolve``
when its tokens are back (``update``: both at once).

Launch counts the step's K/V as computed and gives each sampling row a ``PLACEHOLDER`` per
token it will sample, so the next step can be planned before they are known (async
scheduling, ``paged_jax.stepper``); resolve writes the tokens in, token by token, and stops a
sequence at EOS, a stop id or a length, dropping a burst's tokens after the stop. A mixin of
``engine.scheduler.Scheduler`` (its config, KV cache manager, clock and ``_finish``).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus, check_stop


class StepUpdates:
    def update(
        self, plan: StepPlan, sampled_token_ids: SequenceOf[int] | SequenceOf[SequenceOf[int]]
    ) -> list[Sequence]:
        """Apply a computed step. sampled_token_ids: per scheduled sequence in plan order, its
        sampled id (a burst: its ``burst_len`` ids, of which the first ``num_steps[i]`` count);
        entries of sequences with sample=False are ignored. Returns the sequences that finished
        in this step (their pages are already freed). ``launch`` then ``resolve``."""
        if len(sampled_token_ids) != plan.num_seqs:
            raise ValueError(
                f"len(sampled_token_ids)={len(sampled_token_ids)} != plan.num_seqs={plan.num_seqs}"
            )
        self.launch(plan)
        return self.resolve(plan, sampled_token_ids)

    def launch(self, plan: StepPlan) -> None:
        """The step is on the device: its K/V counts as computed, and each sampling row gets a
        ``PLACEHOLDER`` for every token it will sample (a burst row: ``num_steps[i]``, the
        first ones' K/V computed inside the burst), so the next step can be planned before
        this one's tokens are known (async scheduling); ``resolve`` fills them in. Pages
        whose tokens are placeholders get their prefix keys at ``resolve``."""
        for row, item in enumerate(plan.scheduled):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished by the caller since the plan was made
            assert seq.num_computed_tokens == item.start_position, (seq, item)
            seq.num_computed_tokens += item.num_new_tokens
            if item.sample and not (seq.group is not None and seq.group.is_beam):
                num_sampled = plan.num_steps[row] if plan.num_steps else 1
                seq.token_ids.extend([PLACEHOLDER] * num_sampled)
                seq.num_computed_tokens += num_sampled - 1  # a burst's step j: token j - 1
            if not plan.num_steps:  # a beam's next token is its group's choice
                self.kv_cache.commit(seq)

    def resolve(
        self, plan: StepPlan, sampled_token_ids: SequenceOf[int] | SequenceOf[SequenceOf[int]]
    ) -> list[Sequence]:
        """A launched step's sampled tokens: each replaces its placeholder (a sequence
        preempted meanwhile keeps them too) and may stop the sequence (then the tokens after
        it are dropped). Returns the sequences that finished (pages freed). Rows whose
        sequence finished since launch are skipped."""
        now = self._clock()
        finished = []
        for row, (item, sampled) in enumerate(zip(plan.scheduled, sampled_token_ids, strict=True)):
            seq = item.seq
            start = seq.num_prompt_tokens + item.sample_position
            if not item.sample or start >= seq.num_tokens or seq.token_ids[start] != PLACEHOLDER:
                continue  # no token, a beam's, or finished since launch
            token_ids = sampled[: plan.num_steps[row]] if plan.num_steps else [sampled]
            if seq.first_token_time is None:
                seq.first_token_time = now
            params = seq.sampling_params
            stop = None
            if params.stop_token_ids or (self.eos_token_ids and not params.ignore_eos):
                for j, token_id in enumerate(token_ids):  # token by token: an id may stop it
                    seq.token_ids[start + j] = int(token_id)
                    if stop := check_stop(seq, int(token_id), self.eos_token_ids,
                                          self.config.max_model_len, start + j + 1):  # fmt: skip
                        del seq.token_ids[start + j + 1 :]  # the burst's tokens after it
                        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
                        break
            else:  # only lengths stop it, and num_steps keeps them to the last token
                seq.token_ids[start : start + len(token_ids)] = [int(t) for t in token_ids]
                stop = self._check_stop(seq, seq.token_ids[-1])
            if stop is not None:
                self._finish(seq, stop[0], stop[1], now)
                finished.append(seq)
            elif plan.num_steps and seq.status is SequenceStatus.RUNNING:
                self.kv_cache.commit(seq)
        return finished
