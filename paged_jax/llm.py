"""``LLM``: the user-facing, vLLM-shaped entry point. A thin facade: it builds the model, the KV
cache manager, the scheduler, the runner, the metrics and the driver, and exposes generate /
stream / stats / close. The loop itself is ``paged_jax.driver``.

A prompt is a string, a list of token ids, or a chat (a list of ``{"role", "content"}``
messages rendered with the model's chat template).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from paged_jax.config import EngineConfig, load_config
from paged_jax.driver import Driver
from paged_jax.engine.beam import BeamSearchParams
from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.outputs import BeamSearchOutput, RequestOutput
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.io.loader import load_model
from paged_jax.io.weights import resolve_dtype
from paged_jax.metrics import EngineMetrics, StepRecord
from paged_jax.model.presets import param_bytes
from paged_jax.request import Prompt, as_params_list, as_prompt_list, encode_prompt
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.runner import ModelRunner, enable_compilation_cache
from paged_jax.runtime.state import num_pages_for_budget

logger = logging.getLogger(__name__)


class LLM:
    """``LLM(model="smollm2-135m", page_size=16, ...)``; options are ``EngineConfig`` fields.
    Use as a context manager (or call ``close``) to free the KV pool at once."""

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
            reserve_full=cfg.reserve_full,
            decode_steps=cfg.decode_steps,
        )
        self.kv_cache = KVCacheManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        scheduler = Scheduler(self.scheduler_config, self.kv_cache, eos_token_ids=eos)
        runner = ModelRunner(
            self.model_config,
            loaded.params,
            num_pages=num_pages,
            page_size=cfg.page_size,
            max_pages_per_seq=self.kv_cache.pages_for(max_model_len),
            buckets=Buckets.create(cfg.max_num_batched_tokens, cfg.max_num_seqs),
            kv_dtype=kv_dtype,
            attn_impl=cfg.attn_impl,
            eos_token_ids=tuple(sorted(eos)),
        )
        self.metrics = EngineMetrics(self.kv_cache)
        self._driver = Driver(
            scheduler,
            runner,
            self.metrics,
            encode=self.encode_prompt,
            tokenizer=self.tokenizer,
            model_name=cfg.model,
            default_seed=cfg.seed,
        )
        self.warmup_seconds = 0.0
        if cfg.warmup:
            self.warmup_seconds = runner.warmup(
                logprobs=cfg.warmup_logprobs,
                decode_bursts=cfg.decode_steps > 1,
                progress=cfg.warmup_progress,
            )
            logger.info(
                "warmup compiled %d executables in %.1fs (persistent cache: %s)",
                len(runner.warmup_seconds),
                self.warmup_seconds,
                runner.warmup_cache,
            )
        self._closed = False

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text (when there is one) and token ids of one prompt; ValueError naming the problem."""
        return encode_prompt(
            self.tokenizer, self.model_config.vocab_size, prompt, self.config.model
        )

    def check_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text and token ids of one prompt that fits max_model_len; ValueError otherwise."""
        text, ids = self.encode_prompt(prompt)
        if len(ids) > self.scheduler_config.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len="
                f"{self.scheduler_config.max_model_len}"
            )
        return text, ids

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order. Validates everything first."""
        self._check_open()
        prompts = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompts))
        driver = self._driver
        requests = [driver.make_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        for r in requests:
            driver.add(r)
        for _ in driver.run_until_done(requests, use_tqdm):
            pass
        return [r.output() for r in requests]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as it is generated.
        Other calls may run between two pieces; closing the generator aborts the request."""
        self._check_open()
        driver = self._driver
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() yields one completion: n={params.n} must be 1")
        request = driver.make_request(prompt, params)
        return _stream_text(driver, request)

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams | Sequence[BeamSearchParams],
        use_tqdm: bool = True,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (HF transformers' algorithm, ``engine.beam``), all in
        one continuous batch; the beams of a prompt share KV pages. ``params``: one for all
        prompts or one per prompt. Outputs in input order, ``beam_width`` sequences each, best
        first."""
        self._check_open()
        driver = self._driver
        prompts = as_prompt_list(prompts)
        if isinstance(params, BeamSearchParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        requests = [driver.make_beam_request(p, bp) for p, bp in zip(prompts, params, strict=True)]
        for r in requests:
            driver.add(r)
        for _ in driver.run_until_done(requests, use_tqdm):
            pass
        return [r.output(self.tokenizer) for r in requests]

    @property
    def timeline(self) -> list[StepRecord]:
        """One StepRecord per engine step since the last ``reset_stats``."""
        return self.metrics.timeline

    def reset_stats(self) -> None:
        """Zero the counters and the timeline (e.g. after a benchmark's warm-up requests)."""
        self.metrics.reset()

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (e.g. between two benchmark runs)."""
        self.kv_cache.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        runner = self._driver.runner
        k_pages = runner.kv.k_pages  # per layer [Hkv, P, page_size, D]
        hkv, _, _, head_dim = k_pages[0].shape
        return {
            **self.metrics.stats(),
            "compiles_after_warmup": runner.num_compiles_after_warmup,
            "warmup_seconds": self.warmup_seconds,
            "warmup_executables": len(runner.warmup_seconds),
            "warmup_steps": sum(k.kind in ("plain", "prompt") for k in runner.warmup_seconds),
            "warmup_cache": dict(runner.warmup_cache),
            "compile_seconds": {  # every executable compiled so far, warmup or not
                f"T={k.num_tokens} S={k.num_seqs} {k.kind}": v
                for k, v in runner.warmup_seconds.items()
            },
            "load_seconds": self.load_seconds,
            "param_bytes": param_bytes(runner.params),
            "embed_bytes": runner.params["embed"].nbytes,
            "kv_bytes_per_token": 2 * len(k_pages) * hkv * head_dim * k_pages[0].dtype.itemsize,
        }

    def close(self) -> None:
        """Abort what is in flight and free the KV pages and executables now."""
        if not self._closed:
            self._driver.abort_all()
            self._driver.runner.close()
            self._closed = True

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM is closed")


def _stream_text(driver: Driver, request: Any) -> Iterator[str]:
    driver.add(request)  # at the first next(): a stream never started holds nothing
    steps = driver.run_until_done([request], use_tqdm=False)
    emitted = 0
    try:
        for _ in steps:
            if len(request.text) > emitted:
                yield request.text[emitted:]
                emitted = len(request.text)
    finally:
        steps.close()  # aborts the request when the stream is abandoned
