"""vLLM's logits controls on the device: token masks, logit bias and the three penalties.

One executable per sequence bucket S applies all of them to the step's logits, with per-row
values (a row that sets none carries the identity: an all-ones mask, no bias, penalties 1, 0,
0), so a batch mixing any of them compiles nothing new. The runner calls it only when some
row sets a control; otherwise the step's own argmax stands. In vLLM's order:

1. the token mask (``allowed_token_ids``, ``bad_words``, a structured-output grammar): a
   packed bitmask i32[S, ceil(V / 32)] made on the host (llguidance's layout: bit ``t % 32``
   of word ``t // 32`` set = token t allowed);
2. ``logit_bias``: sparse (ids, values) of a fixed width ``MAX_LOGIT_BIAS``;
3. repetition penalty over prompt and output tokens, then frequency and presence penalties
   over output tokens (vLLM's ``apply_penalties``).

The penalties' token counts come from the device: the step writes every token id into
``KVState.token_pages`` (same slots as its K/V), so a row's tokens are read through its page
table: no per-step upload of token histories (which would be S x max_model_len ids), and
right inside a decode burst, where the host does not see the tokens until the burst ends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sampling_params import MAX_LOGIT_BIAS
from paged_jax.model.layers import argmax_last
from paged_jax.runtime.select import mask_eos

CONTROL_INPUTS = ("num_prompt_tokens", "penalties", "bias_ids", "bias_values", "token_mask")
STEP_INPUTS = ("page_tables", "kv_lens", "suppress_eos")  # what ``process`` reads of the step's


def mask_words(vocab_size: int) -> int:
    """i32 words of one row's packed token mask."""
    return (vocab_size + 31) // 32


def unpack_mask(mask: jax.Array, vocab_size: int) -> jax.Array:
    """mask i32[S, W] (bit t % 32 of word t // 32) -> allowed bool[S, V]."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # i32[S, W, 32]
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].astype(bool)


def token_counts(
    token_pages: jax.Array,
    page_tables: jax.Array,
    kv_lens: jax.Array,
    num_prompt_tokens: jax.Array,
    vocab_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Per row: each token's count among its outputs, and whether it occurs at all.

    token_pages i32[P, page_size]; page_tables i32[S, M]; kv_lens, num_prompt_tokens i32[S]
    -> output_counts i32[S, V], seen bool[S, V] (in prompt or output)
    """
    num_rows = page_tables.shape[0]
    tokens = token_pages[page_tables].reshape(num_rows, -1)  # i32[S, M * page_size]
    position = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    known = position < kv_lens[:, None]  # bool[S, L]: the row's tokens so far
    is_output = known & (position >= num_prompt_tokens[:, None])
    rows = jnp.broadcast_to(jnp.arange(num_rows, dtype=jnp.int32)[:, None], tokens.shape)
    counts = jnp.zeros((num_rows, vocab_size), jnp.int32).at[rows, tokens].add(is_output)
    seen = jnp.zeros((num_rows, vocab_size), jnp.int32).at[rows, tokens].max(known)
    return counts, seen.astype(bool)


def apply_controls(
    logits: jax.Array,
    token_pages: jax.Array,
    page_tables: jax.Array,
    kv_lens: jax.Array,
    controls: dict[str, jax.Array],
) -> jax.Array:
    """logits f32[S, V] with every row's controls applied (see the module docstring).

    controls: ``num_prompt_tokens`` i32[S]; ``penalties`` f32[S, 3] (repetition, frequency,
    presence); ``bias_ids`` i32[S, B], ``bias_values`` f32[S, B]; ``token_mask`` i32[S, W].
    """
    num_rows, vocab_size = logits.shape
    logits = jnp.where(unpack_mask(controls["token_mask"], vocab_size), logits, -jnp.inf)
    rows = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    logits = logits.at[rows, controls["bias_ids"]].add(controls["bias_values"])
    counts, seen = token_counts(
        token_pages, page_tables, kv_lens, controls["num_prompt_tokens"], vocab_size
    )
    repetition, frequency, presence = (controls["penalties"][:, i, None] for i in range(3))
    penalised = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(seen, penalised, logits)
    logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def pack_controls(
    plan: StepPlan, token_masks: dict[int, np.ndarray], num_seqs_bucket: int, vocab_size: int
) -> dict[str, np.ndarray]:
    """The controls of a plan's rows as padded arrays; ``token_masks``: row -> i32[W]."""
    S = num_seqs_bucket
    num_prompt_tokens = np.zeros(S, np.int32)  # i32[S]
    penalties = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (S, 1))  # f32[S, 3]
    bias_ids = np.zeros((S, MAX_LOGIT_BIAS), np.int32)  # i32[S, B]; padding adds 0 to token 0
    bias_values = np.zeros((S, MAX_LOGIT_BIAS), np.float32)  # f32[S, B]
    token_mask = np.full((S, mask_words(vocab_size)), -1, np.int32)  # i32[S, W]; all allowed
    for row, item in enumerate(plan.scheduled):
        p = item.params
        num_prompt_tokens[row] = item.num_prompt_tokens
        penalties[row] = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        if p.logit_bias:
            bias_ids[row, : len(p.logit_bias)] = list(p.logit_bias)
            bias_values[row, : len(p.logit_bias)] = list(p.logit_bias.values())
        if row in token_masks:
            token_mask[row] = token_masks[row]
    return {
        "num_prompt_tokens": num_prompt_tokens,
        "penalties": penalties,
        "bias_ids": bias_ids,
        "bias_values": bias_values,
        "token_mask": token_mask,
    }


def make_process(eos_token_ids: tuple[int, ...], vocab_size: int):
    """``process(logits, token_pages, inputs, controls) -> (logits, greedy)``: the controlled
    logits f32[S, V] and their argmax i32[S] (EOS masked in rows under min_tokens); inputs:
    the step's ``page_tables``, ``kv_lens`` and ``suppress_eos``."""
    eos_ids = jnp.asarray([t for t in eos_token_ids if 0 <= t < vocab_size], jnp.int32)

    def process(logits, token_pages, inputs, controls):
        logits = apply_controls(
            logits, token_pages, inputs["page_tables"], inputs["kv_lens"], controls
        )
        greedy = argmax_last(mask_eos(logits, inputs["suppress_eos"], eos_ids))
        return logits, greedy

    return process
