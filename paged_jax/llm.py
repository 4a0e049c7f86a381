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
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from paged_jax.config import EngineConfig, load_config
from paged_jax.engine.outputs import CompletionOutput, RequestOutput
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import Sequence as Seq
from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.loader import load_model
from paged_jax.io.weights import resolve_dtype
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.runner import ModelRunner, enable_compilation_cache
from paged_jax.runtime.state import num_pages_for_budget

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]]


class StepRecord(NamedTuple):
    """One engine step, for benchmarks and plots (seconds; time is perf_counter at its end)."""

    time: float
    num_seqs: int
    num_tokens: int
    num_used_pages: int
    step_s: float
    schedule_s: float
    pack_s: float
    dispatch_s: float
    device_wait_s: float
    update_s: float


class _Request:
    """A sequence plus its detokenizer and stop-string state."""

    def __init__(self, seq: Seq, detok: IncrementalDetokenizer | None) -> None:
        self.seq = seq
        self.detok = detok
        self.text = ""  # returned text: detokenized output, cut at a stop string

    def output(self) -> RequestOutput:
        seq = self.seq
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=list(seq.prompt_token_ids),
            outputs=[completion],
            finished=seq.is_finished,
            metrics=seq.metrics(),
        )


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
        self.warmup_seconds = self.runner.warmup() if cfg.warmup else 0.0
        if cfg.warmup:
            logger.info(
                "warmup compiled %d buckets in %.1fs",
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
        tok = self.tokenizer
        if tok is None and not (
            isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], int)
        ):
            raise ValueError(
                f"model={self.config.model!r} has no tokenizer: prompts must be token ids"
            )
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, message in enumerate(prompt):
                if not isinstance(message.get("role"), str) or "content" not in message:
                    raise ValueError(f"messages[{i}] must have a 'role' and a 'content'")
            if tok.chat_template is None:
                raise ValueError("messages given, but the model has no chat template")
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
            return text, tok.encode(text, add_bos=False)
        if isinstance(prompt, list | tuple) and prompt:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            for i, t in enumerate(ids):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise ValueError(
                        f"prompt_token_ids[{i}]={t!r} is not a token id in [0, {vocab})"
                    )
            return None, ids
        raise ValueError(
            f"prompt must be a non-empty str, token id list or message list, got {prompt!r}"
        )

    def _make_request(self, prompt: Prompt, params: SamplingParams) -> _Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name) is not None:
                raise ValueError(f"{name}={getattr(params, name)} is not supported yet")
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
        return _Request(seq, detok)

    # ------------------------------------------------------------------ the loop

    def _step(self, live: dict[int, _Request]) -> list[_Request]:
        """One engine step. Returns requests that got new text or finished."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            raise RuntimeError("scheduler made no progress with requests pending")
        scheduled = time.perf_counter()
        sampled = self.runner.run(plan)
        ran = time.perf_counter()
        finished = {s.seq_id for s in self.scheduler.update(plan, sampled.tolist())}
        end = time.perf_counter()
        self._stats["seconds"] += end - start
        self._stats["steps"] += 1
        self._stats["kv_utilization_sum"] += self.scheduler.kv_utilization()
        pack_s, dispatch_s, wait_s = self.runner.last_timing
        self.timeline.append(
            StepRecord(end, plan.num_seqs, plan.num_tokens,
                       self.scheduler.allocator.num_used_pages, end - start,
                       scheduled - start, pack_s, dispatch_s, wait_s, end - ran)
        )  # fmt: skip
        touched = []
        for item in plan.scheduled:
            req = live[item.seq.seq_id]
            if not item.sample:
                continue
            self._stats["output_tokens"] += 1
            self._on_token(req, item.seq.output_token_ids[-1], item.seq.seq_id in finished)
            touched.append(req)
        self._stats["scheduled_tokens"] += plan.num_tokens
        return touched

    def _on_token(self, req: _Request, token_id: int, finished: bool) -> None:
        seq, params = req.seq, req.seq.sampling_params
        if not params.detokenize:
            return
        before = len(req.detok.text)
        req.detok.add(token_id)
        if finished:
            req.detok.flush()
        text = req.detok.text
        stops = params.stop_strings
        if stops and seq.num_output_tokens >= params.min_tokens:
            window_start = max(0, before - max(len(s) for s in stops) + 1)
            hits = [(text.find(s, window_start), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                req.text = text[:index]
                self.scheduler.finish(seq, "stop", stop)
                return
        req.text = text

    def _run(self, requests: list[_Request], use_tqdm: bool) -> Iterator[list[_Request]]:
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
        prompts = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompts))
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


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts:
        first = prompts[0]
        if isinstance(first, int) or isinstance(first, dict):
            return [list(prompts)]  # one token-id prompt or one chat
        return list(prompts)
    raise ValueError(f"prompts must be a prompt or a non-empty list of prompts, got {prompts!r}")


def _as_params_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
