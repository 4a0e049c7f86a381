"""The jitted engine step: embed, per layer write K/V into pages and run ragged paged
attention with that layer's spec (window, scale, soft cap), logits at each sequence's last
scheduled token, and their argmax.

One function serves prefill, decode and mixed batches; it is compiled once per (T, S) bucket
with the KV state donated, so XLA scatters new K/V into the existing page buffers in place.
The ``prompt`` variant (its own executable, used only when asked for) also scores every packed
token against the next prompt token (an lm head over all T rows). The ``decode`` variant is
``plain`` for decode-only steps (every sequence one token, T == S): it tells the attention
kernel so, and the GPU kernel skips its chunk launch. Random draws and logprobs of
sampled tokens happen after the step (``runtime.select``), so the step holds no data-dependent
control flow: on GPU a ``lax.cond`` makes XLA read its predicate back mid-step, which turns an
asynchronous dispatch into a synchronous one.

``batch_invariant``: a row's result must not depend on what else is in the step. The per-token
blocks (norms, projections, MLP, lm head) run on fixed-size row tiles (``layers.row_tiles``),
so every bucket runs the same kernels on the same shapes, and the attention kernel uses tiles
and a kv-block order fixed per row (no split that depends on the batch, one loop for decode
rows and chunk rows); see docs/batch-invariance.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from paged_jax.kernels import ragged_paged_attention, write_kv
from paged_jax.model.config import ModelConfig
from paged_jax.model.layers import all_rows, argmax_last, row_tiles
from paged_jax.model.llama import Params
from paged_jax.model.registry import family_of
from paged_jax.runtime.select import mask_eos, top_logprobs
from paged_jax.runtime.state import KVState

VARIANTS = ("plain", "prompt", "decode")
# Rows per tile in batch-invariant mode: one tile holds a whole decode batch on the GPU (the
# weights are read once a tile); small on CPU, where padding rows cost compute.
INVARIANT_ROW_TILE = {"gpu": 256, "reference": 8}


def invariant_rows(attn_impl: str):
    """The row map of batch-invariant mode for a resolved ``attn_impl``."""
    if attn_impl not in INVARIANT_ROW_TILE:
        raise ValueError(
            f"batch_invariant=True is supported with attn_impl reference (CPU) and gpu, "
            f"not {attn_impl!r}"
        )
    return row_tiles(INVARIANT_ROW_TILE[attn_impl])


StepFn = Callable[[Params, KVState, dict[str, Any]], tuple[KVState, dict[str, jax.Array]]]


def make_step(
    cfg: ModelConfig,
    *,
    attn_impl: str = "auto",
    eos_token_ids: tuple[int, ...] = (),
    variant: str = "plain",
    all_reduce: Callable[[jax.Array], jax.Array] | None = None,
    batch_invariant: bool = False,
) -> StepFn:
    """Build ``step(params, kv, inputs) -> (kv, outputs)`` (not yet jitted).

    outputs: ``logits`` f32[S, V] (raw, at each sequence's last token); ``greedy`` i32[S], their
    argmax with EOS ids masked in rows flagged ``suppress_eos`` (fewer than min_tokens outputs);
    for the ``prompt`` variant also ``prompt``, scores of every packed token against
    ``target_ids``. ``all_reduce``: see ``model.llama.forward`` (tensor parallel only).
    ``batch_invariant``: see the module docstring (``attn_impl`` resolved: reference or gpu).
    """
    if variant not in VARIANTS:
        raise ValueError(f"{variant=} must be one of {VARIANTS}")
    family = family_of(cfg)
    specs = cfg.attention_specs()  # per layer: window, scale, soft cap reach the kernel
    eos_ids = jnp.asarray([t for t in eos_token_ids if 0 <= t < cfg.vocab_size], jnp.int32)
    rows = invariant_rows(attn_impl) if batch_invariant else all_rows

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
                sm_scale=specs[layer].sm_scale,
                sliding_window=specs[layer].sliding_window,
                soft_cap=specs[layer].soft_cap,
                impl=attn_impl,
                decode_only=variant == "decode",
                batch_invariant=batch_invariant,
            )
            k_pages = k_pages[:layer] + (k_layer,) + k_pages[layer + 1 :]
            v_pages = v_pages[:layer] + (v_layer,) + v_pages[layer + 1 :]
            return out, (k_pages, v_pages)

        hidden, (k_pages, v_pages) = family.forward(
            params,
            cfg,
            inputs["token_ids"],
            inputs["positions"],
            (kv.k_pages, kv.v_pages),
            attn_fn,
            all_reduce,
            rows,
        )

        def logits_of(hidden: jax.Array) -> jax.Array:  # [N, D] -> f32[N, V]
            return rows(lambda h: family.compute_logits(params, cfg, h), hidden)

        logits = logits_of(hidden[inputs["logits_indices"]])  # f32[S, V]
        greedy = argmax_last(mask_eos(logits, inputs["suppress_eos"], eos_ids))
        outputs = {"logits": logits, "greedy": greedy}
        if variant == "prompt":
            all_logits = logits_of(hidden)  # f32[T, V]
            outputs["prompt"] = rows(top_logprobs, all_logits, inputs["target_ids"])
        tokens = kv.token_pages.reshape(-1).at[inputs["slot_mapping"]].set(inputs["token_ids"])
        token_pages = tokens.reshape(kv.token_pages.shape)  # i32[P, page_size]
        return KVState(k_pages=k_pages, v_pages=v_pages, token_pages=token_pages), outputs

    return step
