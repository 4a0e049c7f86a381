"""The jitted engine step: embed, per layer write K/V into pages and run ragged paged
attention, logits at each sequence's last scheduled token, sample.

One function serves prefill, decode and mixed batches; it is compiled once per (T, S) bucket
with the KV state donated, so XLA scatters new K/V into the existing page buffers in place.
Variants (each its own executable, picked per step by the runner): ``plain`` samples only;
``logprobs`` also returns the sampled tokens' logprobs and the top MAX_LOGPROBS; ``prompt``
adds scores of every packed token against the next prompt token (an lm head over all T rows).
The step holds no data-dependent control flow (no ``lax.cond``): on GPU a conditional makes
XLA copy its predicate to the host mid-step, which turns an asynchronous dispatch into a
synchronous one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paged_jax.engine.sampling_params import MAX_LOGPROBS
from paged_jax.kernels import ragged_paged_attention, write_kv
from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params, compute_logits, forward
from paged_jax.model.sampler import sample
from paged_jax.runtime.state import KVState

VARIANTS = ("plain", "logprobs", "prompt")
StepFn = Callable[[Params, KVState, dict[str, Any]], tuple[KVState, dict[str, jax.Array]]]


def top_logprobs(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Log-probabilities of ``targets`` and the MAX_LOGPROBS most likely tokens per row.

    logits f32[N, V]; targets i32[N] -> target f32[N], top_ids i32[N, K], top f32[N, K]
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    return {"target": target, "top_ids": top_ids.astype(jnp.int32), "top": top}


def make_step(
    cfg: ModelConfig,
    *,
    attn_impl: str = "auto",
    eos_token_ids: tuple[int, ...] = (),
    variant: str = "plain",
) -> StepFn:
    """Build ``step(params, kv, inputs) -> (kv, outputs)`` (not yet jitted).

    outputs: ``sampled`` i32[S]; for the ``logprobs`` and ``prompt`` variants ``logprobs``
    (of the sampled tokens under the raw model distribution); for ``prompt`` also ``prompt``,
    scores of every packed token against ``target_ids``. Rows flagged ``suppress_eos`` (fewer
    than min_tokens outputs) cannot sample an EOS id.
    """
    if variant not in VARIANTS:
        raise ValueError(f"{variant=} must be one of {VARIANTS}")
    sm_scale = cfg.head_dim**-0.5
    eos_ids = jnp.asarray([t for t in eos_token_ids if 0 <= t < cfg.vocab_size], jnp.int32)

    def step(params: Params, kv: KVState, inputs: dict[str, Any]):
        # inputs: the arrays of runtime.pack.StepInputs for one (T, S) bucket
        def attn_fn(layer: int, q, k, v, cache):
            # q: [T, Hq, Dh]; k, v: [T, Hkv, Dh]
            k_pages, v_pages = cache
            k_layer, v_layer = write_kv(
                k_pages[layer], v_pages[layer], k, v, inputs["slot_mapping"]
            )
            out = ragged_paged_attention(
                q,
                k_layer,
                v_layer,
                inputs["kv_lens"],
                inputs["page_tables"],
                inputs["cu_q_lens"],
                inputs["num_seqs"],
                sm_scale=sm_scale,
                impl=attn_impl,
            )
            k_pages = k_pages[:layer] + (k_layer,) + k_pages[layer + 1 :]
            v_pages = v_pages[:layer] + (v_layer,) + v_pages[layer + 1 :]
            return out, (k_pages, v_pages)

        hidden, (k_pages, v_pages) = forward(
            params, cfg, inputs["token_ids"], inputs["positions"], (kv.k_pages, kv.v_pages), attn_fn
        )
        logits = compute_logits(params, cfg, hidden[inputs["logits_indices"]])  # f32[S, V]
        masked = logits
        if eos_ids.size:
            no_eos = logits.at[:, eos_ids].set(-jnp.inf)
            masked = jnp.where(inputs["suppress_eos"][:, None], no_eos, logits)
        sampled = sample(
            masked,
            inputs["temperature"],
            inputs["top_k"],
            inputs["top_p"],
            inputs["min_p"],
            inputs["seeds"],
            inputs["sample_positions"],
        )
        outputs = {"sampled": sampled}
        if variant != "plain":
            outputs["logprobs"] = top_logprobs(logits, sampled)
        if variant == "prompt":
            all_logits = compute_logits(params, cfg, hidden)  # f32[T, V]
            outputs["prompt"] = top_logprobs(all_logits, inputs["target_ids"])
        return KVState(k_pages=k_pages, v_pages=v_pages), outputs

    return step
