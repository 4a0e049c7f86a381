"""``LLM``: the user-facing, vLLM-shaped entry point. Owns one model, one scheduler and one
runner, and turns prompts into ``RequestOutput``s.

A prompt is a string, a list of token ids, or a chat (a list of ``{"role", "content"}``
messages rendered with the model's chat template). Each step: the scheduler plans, the runner
computes and samples, the scheduler applies the tokens; stop strings are found here, on the
incrementally detokenized text, and cut from the returned text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from paged_jax.config import EngineConfig, load_config
from paged_jax.engine.outputs import RequestOutput
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import Sequence as Seq
from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.loader import load_model
from paged_jax.io.weights import resolve_dtype
from paged_jax.request import (
    Prompt,
    Request,
    StepRecord,
    as_params_list,
    as_prompt_list,
    encode_prompt,
)
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.runner import ModelRunner, enable_compilation_cache
from paged_jax.runtime.state import num_pages_for_budget

logger = logging.getLogger(__name__)


class LLM:
    """``LLM(model="smollm2-135m", page_size=16, ...)``; options are ``EngineConfig`` fields."""

    def __init__(
        self,
        model: str | None = None,
        *,
        config: str | None = None,
        overrides: list[str] | None = None,
        **options: Any,
    ) -> None:
        if model is not None:
            options["model"] = model
        self.config: EngineConfig = load_config(config, overrides, **options)
        cfg = self.config
        if cfg.compilation_cache_dir:
            enable_compilation_cache(cfg.compilation_cache_dir)
        loaded = load_model(cfg.model, cfg.dtype)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.load_seconds = loaded.load_seconds
        max_model_len = cfg.max_model_len or self.model_config.max_position_embeddings
        kv_dtype = resolve_dtype(cfg.dtype if cfg.kv_dtype == "auto" else cfg.kv_dtype)
        num_pages = cfg.num_pages or num_pages_for_budget(
            self.model_config,
            page_size=cfg.page_size,
            dtype=kv_dtype,
            memory_fraction=cfg.kv_memory_fraction,
            cpu_bytes=cfg.kv_cpu_bytes,
        )
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=max_model_len,
            page_size=cfg.page_size,
            num_pages=num_pages,
            reserve_full=cfg.reserve_full,
            decode_steps=cfg.decode_steps,
        )
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(self.scheduler_config, eos_token_ids=eos)
        self.runner = ModelRunner(
            self.model_config,
            loaded.params,
            num_pages=num_pages,
            page_size=cfg.page_size,
            max_pages_per_seq=self.scheduler_config.max_pages_per_seq,
            buckets=Buckets.create(cfg.max_num_batched_tokens, cfg.max_num_seqs),
            kv_dtype=kv_dtype,
            attn_impl=cfg.attn_impl,
            eos_token_ids=tuple(sorted(eos)),
            seed=cfg.seed,
        )
        self.warmup_seconds = 0.0
        if cfg.warmup:
            self.warmup_seconds = self.runner.warmup(
                logprobs=cfg.warmup_logprobs, decode_bursts=cfg.decode_steps > 1
            )
            logger.info(
                "warmup compiled %d executables in %.1fs",
                len(self.runner.warmup_seconds),
                self.warmup_seconds,
            )
        self._num_requests = 0
        self.timeline: list[StepRecord] = []
        self._stats = {
            "steps": 0,
            "scheduled_tokens": 0,
            "output_tokens": 0,
            "seconds": 0.0,
            "kv_utilization_sum": 0.0,
        }

    # ------------------------------------------------------------------ prompts

    def check_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text and token ids of one prompt that fits max_model_len; ValueError otherwise."""
        text, ids = self.encode_prompt(prompt)
        if len(ids) > self.scheduler_config.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len="
                f"{self.scheduler_config.max_model_len}"
            )
        return text, ids

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text (when there is one) and token ids of one prompt; ValueError naming the problem."""
        return encode_prompt(
            self.tokenizer, self.model_config.vocab_size, prompt, self.config.model
        )

    def _make_request(self, prompt: Prompt, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.check_prompt(prompt)
        seq = Seq(str(self._num_requests), ids, params, prompt=text)
        self._num_requests += 1
        if self.tokenizer is None and params.detokenize:
            raise ValueError(
                f"model={self.config.model!r} has no tokenizer: "
                "use SamplingParams(detokenize=False)"
            )
        detok = (
            None
            if self.tokenizer is None
            else IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
            )
        )
        return Request(seq, detok)

    # ------------------------------------------------------------------ the loop

    def _step(self, live: dict[int, Request]) -> list[Request]:
        """One engine step. Returns requests that got new text or finished."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            raise RuntimeError("scheduler made no progress with requests pending")
        scheduled = time.perf_counter()
        out = self.runner.run(plan)
        ran = time.perf_counter()
        if out.logprobs is not None or out.prompt_logprobs is not None:
            offset = 0
            for row, item in enumerate(plan.scheduled):
                live[item.seq.seq_id].record_logprobs(item, row, out, offset)
                offset += item.num_new_tokens
        finished = {s.seq_id for s in self.scheduler.update(plan, out.sampled.tolist())}
        touched, num_sampled = [], 0
        for item in plan.scheduled:
            if not item.sample:
                continue
            req, seq = live[item.seq.seq_id], item.seq
            num_new = seq.num_output_tokens - item.sample_position  # > 1 only in a burst
            num_sampled += num_new
            touched.append(req)
            if not seq.sampling_params.detokenize:
                continue
            for j in range(num_new):
                last = j == num_new - 1
                index = item.sample_position + j
                if not self._on_token(req, index, seq.seq_id in finished and last):
                    break  # a stop string: the tokens after it are gone
        end = time.perf_counter()
        self._record(plan, num_sampled, start, scheduled, ran, end)
        return touched

    def _record(
        self, plan: Any, num_sampled: int, start: float, scheduled: float, ran: float, end: float
    ) -> None:
        """Counters and one StepRecord for a step (a burst counts as one record)."""
        burst = plan.burst_len
        computed = plan.num_tokens
        kv_tokens = sum(i.kv_len for i in plan.scheduled)
        if plan.num_steps:  # every row computes each step; idle rows re-read their K/V
            computed = plan.num_seqs * burst
            # step j reads kv_len + min(j, n - 1) tokens of a row with n steps
            kv_tokens = sum(
                burst * i.kv_len + n * (n - 1) // 2 + (burst - n) * (n - 1)
                for i, n in zip(plan.scheduled, plan.num_steps, strict=True)
            )
        s = self._stats
        s["seconds"] += end - start
        s["steps"] += burst
        s["kv_utilization_sum"] += burst * self.scheduler.kv_utilization()
        s["output_tokens"] += num_sampled
        s["scheduled_tokens"] += computed
        pack_s, dispatch_s, wait_s = self.runner.last_timing
        self.timeline.append(
            StepRecord(end, plan.num_seqs, computed, self.scheduler.allocator.num_used_pages,
                       kv_tokens, end - start, scheduled - start, pack_s, dispatch_s, wait_s,
                       end - ran, burst, num_sampled)
        )  # fmt: skip

    def _on_token(self, req: Request, index: int, finished: bool) -> bool:
        """Detokenize output ``index`` and look for stop strings; False if one stopped it."""
        seq, params = req.seq, req.seq.sampling_params
        if not params.detokenize:
            return True
        token_id = seq.token_ids[seq.num_prompt_tokens + index]
        before = len(req.detok.text)
        req.detok.add(token_id)
        if finished:
            req.detok.flush()
        text = req.detok.text
        stops = params.stop_strings
        if stops and index + 1 >= params.min_tokens:
            window_start = max(0, before - max(len(s) for s in stops) + 1)
            hits = [(text.find(s, window_start), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut, stop = min(hits)
                req.text = text[:cut]
                self.scheduler.finish(seq, "stop", stop, num_output_tokens=index + 1)
                return False
        req.text = text
        return True

    def _run(self, requests: list[Request], use_tqdm: bool) -> Iterator[list[Request]]:
        live = {r.seq.seq_id: r for r in requests}
        for r in requests:
            self.scheduler.add(r.seq)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not use_tqdm)
        try:
            while any(not r.seq.is_finished for r in requests):
                touched = self._step(live)
                done = sum(r.seq.is_finished for r in requests)
                bar.update(done - bar.n)
                bar.set_postfix(tok_s=f"{self._output_tok_s():.1f}", refresh=False)
                yield touched
        finally:
            bar.close()
            for r in requests:  # an interrupted run must not leave pages allocated
                if not r.seq.is_finished:
                    self.scheduler.finish(r.seq, "abort")

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order. Validates everything first."""
        prompts = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompts))
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        for _ in self._run(requests, use_tqdm):
            pass
        return [r.output() for r in requests]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as it is generated."""
        request = self._make_request(prompt, sampling_params or SamplingParams())
        emitted = 0
        for _ in self._run([request], use_tqdm=False):
            if len(request.text) > emitted:
                yield request.text[emitted:]
                emitted = len(request.text)

    def reset_stats(self) -> None:
        """Zero the counters and the timeline (e.g. after a benchmark's warm-up requests)."""
        self._stats = {k: 0 * v for k, v in self._stats.items()}
        self.timeline = []
        self.scheduler.num_preemptions = 0

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "steps": s["steps"],
            "scheduled_tokens": s["scheduled_tokens"],
            "output_tokens": s["output_tokens"],
            "seconds": s["seconds"],
            "output_tokens_per_s": self._output_tok_s(),
            "preemptions": self.scheduler.num_preemptions,
            "kv_utilization": s["kv_utilization_sum"] / s["steps"] if s["steps"] else 0.0,
            "num_pages": self.scheduler_config.num_pages,
            "free_pages": self.scheduler.allocator.num_free_pages,
            "compiles_after_warmup": self.runner.num_compiles_after_warmup,
            "warmup_seconds": self.warmup_seconds,
            "load_seconds": self.load_seconds,
        }

    def _output_tok_s(self) -> float:
        s = self._stats
        return s["output_tokens"] / s["seconds"] if s["seconds"] else 0.0
