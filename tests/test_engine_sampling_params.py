from __future__ import annotations

import math

import pytest

from paged_jax.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from paged_jax.engine.sampling_params import SamplingParams


def test_defaults_are_valid():
    params = SamplingParams()
    assert params.temperature == 1.0 and params.top_k == -1 and params.max_tokens == 16
    assert params.stop_strings == () and not params.greedy
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 2.0}, "n"),
        ({"n": 0}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": 5}, "cache_salt"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {1: 101.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"bad_words": ["ok", " "]}, "bad_words"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
        ({"spaces_between_special_tokens": None}, "spaces_between_special_tokens"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"colour": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ],
)
def test_bad_field_raises_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        SamplingParams(**kwargs)


def test_logprobs_minus_one_is_refused_clearly():
    with pytest.raises(ValueError, match="whole vocabulary"):
        SamplingParams(logprobs=-1)


def test_controls_are_normalised():
    p = SamplingParams(
        logit_bias={"12": 1, 3: -100}, structured_outputs={"json": '{"type": "object"}'}
    )
    assert p.logit_bias == {12: 1.0, 3: -100.0}
    assert p.structured_outputs.json == {"type": "object"} and p.needs_mask_per_step
    assert p.uses_controls and not SamplingParams().uses_controls
    assert SamplingParams(repetition_penalty=1.1).uses_controls
    assert not SamplingParams(allowed_token_ids=[1]).needs_mask_per_step  # static: bursts ok


def test_edges_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, seed=0)
    SamplingParams(max_tokens=1, min_tokens=1, stop_token_ids=[], logprobs=0)
    assert SamplingParams(cache_salt="tenant-1").cache_salt == "tenant-1"
    assert SamplingParams().cache_salt is None


def test_params_are_frozen():
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]


def test_metrics_and_outputs():
    metrics = RequestMetrics(arrival_time=10.0)
    assert metrics.time_to_first_token is None and metrics.latency is None
    metrics.first_token_time = 10.25
    metrics.finished_time = 11.5
    assert metrics.time_to_first_token == 0.25 and metrics.latency == 1.5
    completion = CompletionOutput(0, "hi", [1, 2], finish_reason="stop", stop_reason=2)
    output = RequestOutput("r", "p", [5], [completion], finished=True, metrics=metrics)
    assert output.outputs[0].finished and output.metrics.latency == 1.5
