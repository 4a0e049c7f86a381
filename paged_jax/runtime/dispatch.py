"""Dispatching a step: ``ModelRunner.start`` / ``select`` / ``fetch`` (and ``run``, all three).

A mixin of ``runtime.runner.ModelRunner`` (its executables, params and KV state): ``start``
packs a plan, feeds placeholder tokens from the step in flight (``runtime.feed``), copies
pages and dispatches the step; ``select`` dispatches the token selection (controls, draw,
logprobs; a burst's further steps); ``fetch`` waits and reads back. None of them blocks but
``fetch``: the host is free between them (``paged_jax.stepper``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from paged_jax.engine.plan import StepPlan
from paged_jax.runtime.burst import BURST_MODES, FusedBurst
from paged_jax.runtime.controls import STEP_INPUTS, pack_controls
from paged_jax.runtime.folded import Folded
from paged_jax.runtime.inflight import InFlight, StepOutput, source_rows
from paged_jax.runtime.pack import StepInputs, pack
from paged_jax.runtime.select import GREEDY, SELECT_INPUTS, SelectMode, select_mode
from paged_jax.runtime.wire import to_wire

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = threading.local()  # backend compiles of the current thread (its .count)
_listener_lock = threading.Lock()
_listener_installed = False


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event == _COMPILE_EVENT:
        _compiles.count = getattr(_compiles, "count", 0) + 1


def _install_listener() -> None:
    """One process-wide listener that counts compiles per thread; it holds no runner."""
    global _listener_installed
    with _listener_lock:
        if not _listener_installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listener_installed = True


def _thread_compiles() -> int:
    return getattr(_compiles, "count", 0)


class ExecutableKey(NamedTuple):
    """One compiled executable: a step variant ("plain" | "prompt" | "decode") or "advance" (a
    burst's next inputs) of a (num_tokens, num_seqs) bucket, a selector (num_tokens 0),
    "controls" (``runtime.controls``; num_tokens 0), "copy" (copy-on-write of up to num_seqs
    pages; num_tokens 0), "widen" or "keep" (num_tokens 0; ``runtime.feed``), or "unpack" /
    "unpack_feed" of a bucket (its inputs from one wire buffer; ``runtime.wire``), or a
    ``FusedBurst`` of a decode bucket (a whole burst in one executable; ``runtime.burst``), or
    ``Folded`` of a step variant or fused burst (unpacking its own wire; ``runtime.folded``)."""

    num_tokens: int
    num_seqs: int
    kind: str | SelectMode


class StepDispatch:
    """Mixin: needs ``buckets``, ``page_size``, ``max_pages_per_seq``, ``params``, ``kv``,
    ``cfg``, ``decode_variant``, ``fold_inputs``, ``_no_feed``, ``_steps``, ``_replicated``,
    ``_executable(key)``,
    ``warmed_up`` and ``num_compiles_after_warmup``."""

    def run(self, plan: StepPlan, token_masks: dict[int, np.ndarray] | None = None) -> StepOutput:
        """Execute one step (or a decode burst) and wait for it: sampled ids for the plan's
        rows (meaningful where it samples; i32[n, burst_len] for a burst), and the logprob
        arrays when some request asked for them. ``token_masks``: row -> its packed
        allowed-token mask i32[W] (``runtime.controls``; constant over a burst)."""
        return self.fetch(self.start(plan, token_masks))

    def start(
        self,
        plan: StepPlan,
        token_masks: dict[int, np.ndarray] | None = None,
        *,
        feed: tuple[InFlight, tuple[int, ...]] | None = None,
        masks_later: bool = False,
    ) -> InFlight:
        """Dispatch a plan's device work and return without waiting: page copies, the step (a
        burst: all its steps) and, unless ``masks_later``, the token selection (then call
        ``select`` once the masks are known: the host makes them while the step runs).
        ``feed``: (the step in flight, per row the row of it whose sample is this row's last
        input token, or -1; ``engine.plan.feed_rows``)."""
        with self._counting():
            inflight = self._start(plan, feed, token_masks)
            if not masks_later:
                self._dispatch_select(inflight, token_masks or {})
            return inflight

    def select(self, inflight: InFlight, token_masks: dict[int, np.ndarray]) -> None:
        """Dispatch the token selection of a step started with ``masks_later``."""
        with self._counting():
            self._dispatch_select(inflight, token_masks)

    def fetch(self, inflight: InFlight) -> StepOutput:
        """Wait for a started step and read back its sampled ids (and logprobs)."""
        start = time.perf_counter()
        n, plan = inflight.plan.num_seqs, inflight.plan
        got = jax.device_get(inflight.sampled)  # i32[S] per step, or a fused burst's i32[S, K]
        tokens = np.concatenate([a.reshape(a.shape[0], -1) for a in got], axis=1)[:n]
        result = StepOutput(
            sampled=tokens if plan.num_steps else tokens[:, 0],
            logprobs=_fetch(inflight.logprobs, n) if inflight.logprobs is not None else None,
            prompt_logprobs=(
                _fetch(inflight.prompt, plan.num_tokens) if inflight.prompt is not None else None
            ),
        )
        # host seconds packing, host seconds dispatching, seconds waiting for the device
        inflight.wait_s = time.perf_counter() - start
        self.last_timing = (inflight.pack_s, inflight.dispatch_s, inflight.wait_s)
        return result

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        compiles_before = _thread_compiles()
        try:
            yield
        finally:
            if self.warmed_up:
                self.num_compiles_after_warmup += _thread_compiles() - compiles_before

    def _copy_pages(self, copies: tuple[tuple[int, int], ...]) -> None:
        """All of a step's copy-on-write copies in one call, padded to a sequence bucket."""
        num_copies = self.buckets.seqs_for(len(copies))
        if num_copies < len(copies):
            raise ValueError(f"{len(copies)} page copies in one step, more than max_num_seqs")
        pairs = np.zeros((2, num_copies), np.int32)  # i32[2, C]; (NULL_PAGE, NULL_PAGE) pads
        pairs[:, : len(copies)] = np.asarray(copies, np.int32).T
        copy = self._executable(ExecutableKey(0, num_copies, "copy"))
        self.kv = copy(self.kv, *jax.device_put((pairs[0], pairs[1]), self._replicated))

    def _start(
        self,
        plan: StepPlan,
        feed: tuple[InFlight, tuple[int, ...]] | None,
        token_masks: dict[int, np.ndarray] | None,
    ) -> InFlight:
        start = time.perf_counter()
        n = plan.num_seqs
        want_prompt = any(i.prompt_targets for i in plan.scheduled)
        bucket = self.buckets.pick_bucket(plan.num_tokens, n)  # a burst: one token per row
        fused = self._fused_key(plan, token_masks)
        variant = _step_variant(plan, bucket, want_prompt, self.decode_variant)
        host = _as_dict(
            pack(
                plan,
                num_tokens_bucket=bucket[0],
                num_seqs_bucket=bucket[1],
                page_size=self.page_size,
                max_pages_per_seq=self.max_pages_per_seq,
            )
        )
        if feed:
            host["source_rows"] = source_rows(host["cu_q_lens"], feed[1], bucket[0])
        elif self.fold_inputs:  # the folded executable always takes source rows
            host["source_rows"] = np.full(bucket[0], -1, np.int32)
        flat = jax.device_put(to_wire(host), self.wire_sharding)  # i32[N]: one transfer
        packed = time.perf_counter()
        previous_ready = feed is None or feed[0].ready()
        inflight = InFlight(plan, bucket, {}, None, enqueued=packed,
                            previous_ready=previous_ready)  # fmt: skip
        # the last input token of some rows is the step in flight's sample
        last = self._wide_last(feed[0]) if feed else self._no_feed  # i32[S_max]
        kind = fused or variant
        if self.fold_inputs:  # the step unpacks its own inputs (runtime.folded)
            step, args = self._executable(ExecutableKey(*bucket, Folded(kind))), (flat, last)
        else:
            unpack = self._executable(ExecutableKey(*bucket, "unpack_feed" if feed else "unpack"))
            inflight.inputs = unpack(flat, last) if feed else unpack(flat)
            step, args = self._executable(ExecutableKey(*bucket, kind)), (inflight.inputs,)
        if plan.page_copies:  # before the step writes K/V into the copies
            self._copy_pages(plan.page_copies)
        outputs = step(self.params, self.kv, *args)
        if fused:
            self.kv, tokens, inflight.last = outputs
            inflight.sampled, inflight.last_exact, inflight.fused = [tokens], True, True
            inflight.last_wide = self.fold_inputs
            self.num_fused_bursts += 1
        else:
            self.kv, inflight.out = outputs[:2]
            inflight.step = step
            if self.fold_inputs:
                inflight.inputs = outputs[2]
                # a burst's further steps take advance's inputs: the unfolded step
                if plan.num_steps:
                    inflight.step = self._executable(ExecutableKey(*bucket, variant))
        inflight.pack_s = packed - start
        inflight.dispatch_s = time.perf_counter() - packed
        return inflight

    def _wide_last(self, previous: InFlight) -> jax.Array:
        """i32[S_max]: the samples of the step in flight, widened if they are not yet."""
        if previous.last_wide:
            return previous.last
        return self._executable(ExecutableKey(0, previous.bucket[1], "widen"))(previous.last)

    def _dispatch_select(self, inflight: InFlight, token_masks: dict[int, np.ndarray]) -> None:
        """The token selection of a started step (a burst: every further step as well)."""
        if inflight.fused:  # the fused burst selected its tokens
            return
        start = time.perf_counter()
        plan, bucket, inputs = inflight.plan, inflight.bucket, inflight.inputs
        mode = select_mode(plan)
        select = None if mode == GREEDY else self._executable(ExecutableKey(0, bucket[1], mode))
        controls = None
        if token_masks or any(i.sample and i.params.uses_controls for i in plan.scheduled):
            process = self._executable(ExecutableKey(0, bucket[1], "controls"))
            controls = pack_controls(plan, token_masks, bucket[1], self.cfg.vocab_size)
            controls = jax.device_put(controls, self._replicated)
        if plan.num_steps:
            advance_fn = self._executable(ExecutableKey(*bucket, "advance"))
            burst_step = self._zero  # i32[]: the step just computed
        for j in range(plan.burst_len):
            if j:
                self.kv, inflight.out = inflight.step(self.params, self.kv, inputs)
            out = inflight.out
            logits, greedy = out["logits"], out["greedy"]
            if controls is not None:
                chosen = {k: inputs[k] for k in STEP_INPUTS}
                logits, greedy = process(logits, self.kv.token_pages, chosen, controls)
            chosen = {"sampled": greedy}
            if select is not None:
                chosen = select(
                    logits, out["logits"], greedy, {k: inputs[k] for k in SELECT_INPUTS}
                )
            inflight.sampled.append(chosen["sampled"])
            if j == 0:
                # a folded step's argmax comes widened too (runtime.folded); a burst's last
                # samples stay i32[S] for keep
                wide = "wide" in out and not plan.num_steps and chosen["sampled"] is out["greedy"]
                inflight.last = out["wide"] if wide else chosen["sampled"]
                inflight.last_wide = wide
            elif plan.num_steps and self.feeds_bursts:  # the next step may be fed from it
                keep = self._executable(ExecutableKey(0, bucket[1], "keep"))
                inflight.last = keep(
                    inflight.last, chosen["sampled"], burst_step, inputs["burst_steps"]
                )
            inflight.logprobs, inflight.prompt = chosen.get("logprobs"), out.get("prompt")
            if j + 1 < plan.burst_len:
                inputs, burst_step = advance_fn(inputs, chosen["sampled"], burst_step)
        inflight.last_exact = not plan.num_steps or self.feeds_bursts
        inflight.dispatch_s += time.perf_counter() - start

    def _fused_key(
        self,
        plan: StepPlan,
        token_masks: dict[int, np.ndarray] | None,
    ) -> FusedBurst | None:
        """The kind of the fused burst that runs this plan, if one does: a burst of exactly
        ``fused_burst_steps`` steps whose rows use no logits controls or token masks."""
        if not plan.num_steps or plan.burst_len != self.fused_burst_steps or token_masks:
            return None
        if any(i.sample and i.params.uses_controls for i in plan.scheduled):
            return None
        mode = select_mode(plan)
        return FusedBurst(mode) if mode in BURST_MODES else None


def _step_variant(plan: StepPlan, bucket: tuple[int, int], prompt: bool, decode: bool) -> str:
    """The step executable a plan runs on: prompt scoring, decode-only, or plain."""
    if prompt:
        return "prompt"
    if plan.num_tokens == plan.num_seqs:
        return step_variant_of_burst(*bucket, decode)
    return "plain"


def step_variant_of_burst(num_tokens: int, num_seqs: int, decode: bool) -> str:
    """The step variant of a decode-only plan in bucket (num_tokens, num_seqs)."""
    return "decode" if decode and num_tokens == num_seqs else "plain"


def _fetch(arrays: dict[str, jax.Array], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in arrays.items()}


def _as_dict(inputs: StepInputs) -> dict[str, np.ndarray]:
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
