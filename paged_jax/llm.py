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

from paged_jax.build import build_engine, runner_stats
from paged_jax.config import EngineConfig, load_config
from paged_jax.engine.beam import BeamSearchParams
from paged_jax.engine.outputs import BeamSearchOutput, RequestOutput
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.metrics import StepRecord
from paged_jax.request import Prompt, as_params_list, as_prompt_list, encode_prompt

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
        engine = build_engine(self.config, encode=self.encode_prompt)
        self.model_config, self.tokenizer = engine.model_config, engine.tokenizer
        self.scheduler_config, self.kv_cache = engine.scheduler_config, engine.kv_cache
        self.metrics, self._driver = engine.metrics, engine.driver
        self.load_seconds, self.warmup_seconds = engine.load_seconds, engine.warmup_seconds
        self._closed = False

    # ------------------------------------------------------------------ prompts

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text (when there is one) and token ids of one prompt; ValueError naming the problem."""
        return encode_prompt(
            self.tokenizer, self.model_config.vocab_size, prompt, self.config.model
        )

    def check_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Text and token ids of one prompt that fits max_model_len; ValueError otherwise."""
        return self._driver.encode_checked(prompt)

    def check_request(
        self, prompt: Prompt, params: SamplingParams | BeamSearchParams
    ) -> tuple[str | None, list[int]]:
        """Everything ``generate`` / ``beam_search`` would reject about this request, checked
        now (ValueError naming the field); queues nothing."""
        if isinstance(params, BeamSearchParams):
            return self._driver.check_beam(prompt, params)
        return self._driver.check(prompt, params)

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order. Validates everything first."""
        requests = self._queue(prompts, sampling_params)
        for _ in self._driver.run_until_done(requests, use_tqdm):
            pass
        return [r.output() for r in requests]

    def _queue(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list:
        """Validate every prompt and its params, then queue them all (or none)."""
        self._check_open()
        prompts = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompts))
        driver = self._driver
        requests = [driver.make_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        driver.add_all(requests)
        return requests

    def chat(
        self,
        messages: list[dict[str, str]] | Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` messages)
        or a list of them, each rendered with the model's chat template (generation prompt
        added) and generated as ``generate`` does; one RequestOutput per conversation."""
        if isinstance(messages, list | tuple) and messages and isinstance(messages[0], dict):
            messages = [messages]
        if not isinstance(messages, list | tuple) or not messages:
            raise ValueError("messages must be a conversation or a non-empty list of them")
        for i, conversation in enumerate(messages):
            if (
                not isinstance(conversation, list | tuple)
                or not conversation
                or not all(isinstance(m, dict) for m in conversation)
            ):
                raise ValueError(f"messages[{i}] must be a non-empty list of message dicts")
        return self.generate([list(c) for c in messages], sampling_params, use_tqdm)

    def generate_as_completed(
        self,
        prompts: Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """``generate``, yielding (input index, output) as each request finishes (a batch
        job writes its results as they come: a kill then loses only the unfinished ones).
        Validates and queues everything before the first step; closing it aborts the rest."""
        requests = self._queue(prompts, sampling_params)
        return self._driver.iter_completed(requests, lambda r: r.output(), use_tqdm)

    def beam_search_as_completed(
        self, prompts: Sequence[Prompt], params: BeamSearchParams, use_tqdm: bool = True
    ) -> Iterator[tuple[int, BeamSearchOutput]]:
        """``beam_search`` with one ``params`` for all, yielding (input index, output) as
        each prompt's search ends."""
        self._check_open()
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        driver = self._driver
        requests = [driver.make_beam_request(p, params) for p in as_prompt_list(prompts)]
        driver.add_all(requests)
        return driver.iter_completed(requests, lambda r: r.output(self.tokenizer), use_tqdm)

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
        return driver.stream_text(request)

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
        if not isinstance(params, list | tuple):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        if len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        requests = [driver.make_beam_request(p, bp) for p, bp in zip(prompts, params, strict=True)]
        driver.add_all(requests)
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
        """Counters, prefix-cache and sharing figures, compiles, warmup, model sizes and the
        host time of token masks."""
        return {
            **self.metrics.stats(),
            **runner_stats(self._driver.runner),
            "warmup_seconds": self.warmup_seconds,
            "load_seconds": self.load_seconds,
            # host seconds making token masks (grammars, bad words, allowed ids), and the
            # steps that made some: their ratio is the host's mask time per such step
            "mask_seconds": self._driver.token_masks.seconds,
            "mask_steps": self._driver.token_masks.num_steps,
            # mask seconds spent while the step's forward still ran on the device
            "mask_hidden_seconds": self._driver.token_masks.hidden_seconds,
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
