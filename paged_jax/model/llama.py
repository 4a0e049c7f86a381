"""The Llama family, top to bottom, as pure functions over a parameter pytree: forward, lm head,
param layout (from HF-named tensors, random init) and the GGUF tensor names.

Covers Llama 1/2/3 (llama3 RoPE scaling), Mistral (all-layer sliding window), Qwen2 (qkv bias)
and Qwen3 (q/k RMSNorm). Tokens arrive packed: ``token_ids i32[T]`` with their absolute
``positions``. Attention is a callback so one model file serves both the dense path
(``model/dense.py``: each sequence on its own, causal) and the paged path (``runtime/``), which
writes K/V into pages and calls the ragged paged attention kernel with the layer's spec.

Parameter pytree (per-layer dicts, so a layer's weights are separate buffers that the paged
step can read without slicing a stacked array):
    embed      [V, D]                    final_norm [D]          lm_head [D, V] (untied only)
    layers[l]: attn_norm [D]  wqkv [D, (Hq + 2 Hkv) Dh]  bqkv [(Hq + 2 Hkv) Dh] (qkv_bias)
               q_norm [Dh] k_norm [Dh] (qk_norm)  wo [Hq Dh, D]  bo [D] (o_bias)
               mlp_norm [D]  w_gate_up [D, 2 F]  w_down [F, D]
Letters: T tokens, D hidden, F ffn, V vocab, Hq/Hkv heads, Dh head_dim, B batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.model.config import ModelConfig
from paged_jax.model.layers import (
    RowMap,
    all_rows,
    apply_rope,
    gated_mlp,
    lm_head_logits,
    normal_drawer,
    rms_norm,
    rope_inv_freq,
)

Params = dict[str, Any]
# attn_fn(layer, q [T, Hq, Dh], k [T, Hkv, Dh], v [T, Hkv, Dh], cache) -> (out [T, Hq, Dh], cache)
AttnFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
GetTensor = Callable[[str], Any]  # HF tensor name -> array in HF layout ([out, in] linears)


def forward(
    params: Params,
    cfg: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    cache: Any,
    attn_fn: AttnFn,
    all_reduce: Callable[[jax.Array], jax.Array] | None = None,
    rows: RowMap = all_rows,
) -> tuple[jax.Array, Any]:
    """Run the decoder over packed tokens. Returns the final-normed hidden states and cache.

    ``all_reduce`` sums the partial outputs of ``wo`` and ``w_down`` across tensor-parallel
    shards (``runtime/tp.py``: each shard holds some heads and FFN columns); None: one device.
    ``rows`` maps the per-token blocks around attention over the rows (``layers.row_tiles``:
    the batch-invariant mode).
    """
    # token_ids, positions: i32[T] -> hidden [T, D]
    specs = cfg.attention_specs()
    reduce = all_reduce or (lambda y: y)
    x = params["embed"][token_ids]  # [T, D]
    for layer_idx, layer in enumerate(params["layers"]):
        inv_freq = rope_inv_freq(cfg.head_dim, specs[layer_idx], cfg.rope_freq_factors)

        def qkv_block(x, positions, layer=layer, inv_freq=inv_freq):
            # x: [t, D]; positions: i32[t] -> q [t, Hq, Dh], k, v [t, Hkv, Dh]
            num_tokens = x.shape[0]
            qkv = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps) @ layer["wqkv"]
            if cfg.qkv_bias:
                qkv = qkv + layer["bqkv"]
            q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
            q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
            k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
            return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

        def out_block(x, attn, layer=layer):
            # x: [t, D]; attn: [t, Hq, Dh] -> x [t, D]
            o = reduce(attn.reshape(x.shape[0], cfg.q_size) @ layer["wo"])
            if cfg.o_bias:
                o = o + layer["bo"]
            x = x + o
            h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
            return x + reduce(gated_mlp(h, layer["w_gate_up"], layer["w_down"], cfg.hidden_act))

        q, k, v = rows(qkv_block, x, positions)
        attn, cache = attn_fn(layer_idx, q, k, v, cache)  # [T, Hq, Dh]
        x = rows(out_block, x, attn)
    return rows(lambda x: rms_norm(x, params["final_norm"], cfg.rms_norm_eps), x), cache


def compute_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    # hidden: [N, D] -> f32[N, V]
    return lm_head_logits(
        params, hidden, tied=cfg.tie_word_embeddings, final_soft_cap=cfg.final_logit_softcap
    )


# ---------------------------------------------------------------- param layout


def hf_tensors(get: GetTensor, dtype: jnp.dtype) -> tuple[Callable, Callable]:
    """(arr, linear): an HF tensor as ``dtype``, and HF ``[out, in]`` linears concatenated on
    the output axis and transposed to ``[in, sum(out)]``."""

    def arr(name: str) -> jax.Array:
        return jnp.asarray(get(name), dtype=dtype)

    def linear(*names: str) -> jax.Array:
        return jnp.concatenate([arr(n) for n in names], axis=0).T

    return arr, linear


def build_params(cfg: ModelConfig, get: GetTensor, dtype: jnp.dtype) -> Params:
    """Assemble the param pytree from HF-named tensors (linear weights ``[out, in]``)."""

    arr, linear = hf_tensors(get, dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layer = {
            "attn_norm": arr(p + "input_layernorm.weight"),
            "wqkv": linear(*(attn + f"{x}_proj.weight" for x in "qkv")),
            "wo": linear(attn + "o_proj.weight"),
            "mlp_norm": arr(p + "post_attention_layernorm.weight"),
            "w_gate_up": linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "w_down": linear(p + "mlp.down_proj.weight"),
        }
        if cfg.qkv_bias:
            layer["bqkv"] = jnp.concatenate([arr(attn + f"{x}_proj.bias") for x in "qkv"])
        if cfg.o_bias:
            layer["bo"] = arr(attn + "o_proj.bias")
        if cfg.qk_norm:
            layer["q_norm"] = arr(attn + "q_norm.weight")
            layer["k_norm"] = arr(attn + "k_norm.weight")
        layers.append(layer)
    params = {
        "embed": arr("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": arr("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = linear("lm_head.weight")
    check_shapes(cfg, params)
    return params


def check_shapes(cfg: ModelConfig, params: Params) -> None:
    qkv = cfg.q_size + 2 * cfg.kv_size
    want = {
        "embed": (cfg.vocab_size, cfg.hidden_size),
        "wqkv": (cfg.hidden_size, qkv),
        "wo": (cfg.q_size, cfg.hidden_size),
        "w_gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size),
        "w_down": (cfg.intermediate_size, cfg.hidden_size),
    }
    layer0 = params["layers"][0]
    got = {k: params["embed"].shape if k == "embed" else layer0[k].shape for k in want}
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise ValueError(f"weight {name} has shape {tuple(got[name])}, config implies {shape}")


def init_random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> Params:
    """Random params of ``cfg``'s shapes (normal, std 0.02; norms at 1; biases at 0)."""
    normal = normal_drawer(8 * cfg.num_layers + 8, dtype, seed)
    d, f = cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    layers = []
    for _ in range(cfg.num_layers):
        layer = {
            "attn_norm": jnp.ones((d,), dtype),
            "wqkv": normal((d, qkv)),
            "wo": normal((cfg.q_size, d)),
            "mlp_norm": jnp.ones((d,), dtype),
            "w_gate_up": normal((d, 2 * f)),
            "w_down": normal((f, d)),
        }
        if cfg.qkv_bias:
            layer["bqkv"] = jnp.zeros((qkv,), dtype)
        if cfg.qk_norm:
            layer["q_norm"] = jnp.ones((cfg.head_dim,), dtype)
            layer["k_norm"] = jnp.ones((cfg.head_dim,), dtype)
        layers.append(layer)
    params = {
        "embed": normal((cfg.vocab_size, d)),
        "layers": layers,
        "final_norm": jnp.ones((d,), dtype),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal((d, cfg.vocab_size))
    return params


# ---------------------------------------------------------------- GGUF tensor names

GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of a q/k weight or bias (HF layout)."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf_tensor(cfg: ModelConfig, hf_name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp permutes the q/k rows of ``llama`` models for interleaved RoPE; undo it so the
    model keeps a single (rotate-half) RoPE. Qwen2/3 are stored unpermuted."""
    if cfg.arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
        return unpermute_rows(w, cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads)
    return w


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
    ),
    "tiny-8kv": ModelConfig(  # 8 kv heads: tensor parallel tests shard them 2 and 4 ways
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=8, num_kv_heads=8, head_dim=16, max_position_embeddings=2048,
    ),
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "llama-1b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "llama2-7b": ModelConfig(
        arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
    ),
    "llama3-8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "llama3-70b": ModelConfig(  # tensor parallel benchmarks (140 GB in bf16: tp >= 2 on H200)
        arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}  # fmt: skip
