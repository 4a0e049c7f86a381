"""The compiled step and selectors, lowered for CUDA on the CPU: no XLA control flow.

On GPU, XLA runs a conditional or a while loop by reading its predicate back to the host,
which blocks the thread that dispatches the step until the device has caught up: steps (and
bursts) could then never be queued ahead. The Pallas kernel's own loops are inside its
custom call, so they do not count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from paged_jax.engine.plan import StepPlan
from paged_jax.model.presets import PRESETS, init_random_params
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.controls import STEP_INPUTS, make_process, pack_controls
from paged_jax.runtime.runner import ModelRunner
from paged_jax.runtime.select import SELECT_INPUTS, SelectMode, make_select
from paged_jax.runtime.step import make_step

CONTROL_FLOW = ("stablehlo.while", "stablehlo.case", "stablehlo.if")


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cfg = PRESETS["tiny"]
    params = init_random_params(cfg, jnp.bfloat16)
    return ModelRunner(
        cfg, params, num_pages=16, page_size=16, max_pages_per_seq=4,
        buckets=Buckets.create(32, 8), kv_dtype=jnp.bfloat16, attn_impl="gpu",
    )  # fmt: skip


def _cuda_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("variant", ["plain", "prompt", "decode"])
def test_step_has_no_control_flow(runner, variant):
    step = make_step(runner.cfg, attn_impl="gpu", eos_token_ids=(1, 2), variant=variant)
    num_tokens = 8 if variant == "decode" else 32  # decode-only steps have T == S
    text = _cuda_text(step, runner.params, runner.kv, runner._inputs_spec(num_tokens, 8))
    assert "rpa_decode" in text  # the kernel is in there
    assert ("rpa_prefill" in text) == (variant != "decode")  # decode steps skip the chunk pass
    assert not [op for op in CONTROL_FLOW if op in text]


def test_selectors_have_no_control_flow(runner):
    spec = runner._inputs_spec(8, 8)
    logits = jax.ShapeDtypeStruct((8, runner.cfg.vocab_size), jnp.float32)
    greedy = jax.ShapeDtypeStruct((8,), jnp.int32)
    for mode in (SelectMode(True, True, True), SelectMode(True, False, False)):
        select = make_select(mode, eos_token_ids=(1,), vocab_size=runner.cfg.vocab_size)
        text = _cuda_text(select, logits, logits, greedy, {k: spec[k] for k in SELECT_INPUTS})
        assert not [op for op in CONTROL_FLOW if op in text]


def test_controls_have_no_control_flow(runner):
    spec = runner._inputs_spec(8, 8)
    logits = jax.ShapeDtypeStruct((8, runner.cfg.vocab_size), jnp.float32)
    controls = pack_controls(StepPlan(scheduled=()), {}, 8, runner.cfg.vocab_size)
    process = make_process((1,), runner.cfg.vocab_size)
    chosen = {k: spec[k] for k in STEP_INPUTS}
    text = _cuda_text(process, logits, runner.kv.token_pages, chosen, controls)
    assert "scatter" in text  # the token counts are in there
    assert not [op for op in CONTROL_FLOW if op in text]
