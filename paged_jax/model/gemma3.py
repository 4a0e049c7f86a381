"""The Gemma 3 family (text decoder), top to bottom: config parsers, forward, lm head, param
layout and GGUF tensor names.

What differs from Llama: layers alternate five sliding-window (local) to one global
(``layer_types``), the two kinds have their own RoPE bases (10k local, 1M global, scaling only on
global layers), the softmax scale is ``query_pre_attn_scalar ** -0.5``, RMSNorm scales by
``1 + w`` and every sub-block is sandwiched (norm before and after attention and MLP), q and k
get a per-head RMSNorm, the MLP is GeGLU (tanh GELU), the embedding is multiplied by
``sqrt(hidden)`` and the lm head is tied, with optional attention / final logit soft caps.

Parameter pytree (the Llama names where the role is the same, so sharding rules by tree path
apply to both):
    embed      [V, D]                    final_norm [D]          lm_head [D, V] (untied only)
    layers[l]: attn_norm [D]  wqkv [D, (Hq + 2 Hkv) Dh]  q_norm [Dh]  k_norm [Dh]
               wo [Hq Dh, D]  post_attn_norm [D]
               mlp_norm [D]  w_gate_up [D, 2 F]  w_down [F, D]  post_mlp_norm [D]
Norm weights are stored as HF stores them (the ``w`` of ``1 + w``); llama.cpp's GGUF stores
``1 + w``, which ``from_gguf_tensor`` undoes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.model.config import (
    FULL,
    SLIDING,
    LinearRopeScaling,
    ModelConfig,
    eos_ids,
    gguf_getter,
    parse_rope,
)
from paged_jax.model.layers import (
    RowMap,
    all_rows,
    apply_rope,
    gated_mlp,
    normal_drawer,
    rope_inv_freq,
)
from paged_jax.model.layers import rms_norm_unit_offset as norm
from paged_jax.model.llama import (  # noqa: F401  (compute_logits: the family's, the same)
    AttnFn,
    GetTensor,
    Params,
    check_shapes,
    compute_logits,
    hf_tensors,
)

HF_MODEL_TYPES = ("gemma3_text",)
GGUF_ARCHS = ("gemma3",)
LOCAL_THETA = 10000.0  # llama.cpp hard-codes it for gemma3; HF's rope_local_base_freq default
GLOBAL_THETA = 1_000_000.0
SLIDING_PATTERN = 6  # every 6th layer is global (llama.cpp hard-codes it; HF's default)


def layer_types(num_layers: int, pattern: int = SLIDING_PATTERN) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Parse a ``gemma3_text`` ``config.json`` (transformers 4.5x or 5.x keys)."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"config.json hidden_activation={act!r} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("config.json use_bidirectional_attention=True is not supported")
    if cfg.get("attention_bias"):
        raise ValueError("config.json attention_bias=True is not supported for gemma3")
    num_layers = int(cfg["num_hidden_layers"])
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one dict per layer type
        theta, scaling = parse_rope({}, rope["full_attention"], GLOBAL_THETA)
        local_theta, local_scaling = parse_rope({}, rope.get("sliding_attention", {}), LOCAL_THETA)
        if local_scaling is not None:
            raise ValueError("config.json rope_parameters.sliding_attention: no scaling supported")
    else:
        theta, scaling = parse_rope(cfg, {}, GLOBAL_THETA)
        local_theta = float(cfg.get("rope_local_base_freq", LOCAL_THETA))
    types = cfg.get("layer_types") or layer_types(
        num_layers, int(cfg.get("sliding_window_pattern", SLIDING_PATTERN))
    )
    num_heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        arch="gemma3",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or 256),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qk_norm=True,
        bos_token_id=cfg.get("bos_token_id", 2),
        eos_token_ids=eos_ids(cfg.get("eos_token_id", 1)),
        hidden_act="gelu_tanh",
        sliding_window=int(cfg.get("sliding_window") or 4096),
        layer_types=tuple(types),
        rope_local_theta=local_theta,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
    )


def from_gguf(
    meta: Mapping[str, Any],
    tensor_names: set[str],
    rope_freq_factors: tuple[float, ...] | None = None,
) -> ModelConfig:
    """Parse gemma3 GGUF metadata. llama.cpp fixes what the file does not say (the 5:1 layer
    pattern, the local RoPE base, scale = head_dim ** -0.5); we follow it, as HF's loader does."""
    if rope_freq_factors is not None:
        raise ValueError("GGUF rope_freqs.weight is not supported for gemma3")
    get = gguf_getter(meta, "gemma3")
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length"))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"GGUF gemma3.attention.value_length must equal key_length={head_dim}")
    num_layers = int(get("block_count"))
    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        scaling = LinearRopeScaling(float(get("rope.scaling.factor")))
    elif kind != "none":
        raise ValueError(f"GGUF gemma3.rope.scaling.type={kind!r} is not supported")
    return ModelConfig(
        arch="gemma3",
        vocab_size=int(get("vocab_size", 0) or len(meta.get("tokenizer.ggml.tokens", ()))),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", GLOBAL_THETA)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 32768)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qk_norm=True,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids(meta.get("tokenizer.ggml.eos_token_id")),
        hidden_act="gelu_tanh",
        sliding_window=int(get("attention.sliding_window")),
        layer_types=layer_types(num_layers),
        rope_local_theta=LOCAL_THETA,
        query_pre_attn_scalar=float(head_dim),
        attn_logit_softcap=meta.get("gemma3.attn_logit_softcapping"),
        final_logit_softcap=meta.get("gemma3.final_logit_softcapping"),
    )


def forward(
    params: Params,
    cfg: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    cache: Any,
    attn_fn: AttnFn,
    all_reduce: Any = None,
    rows: RowMap = all_rows,
) -> tuple[jax.Array, Any]:
    """Run the decoder over packed tokens. Returns the final-normed hidden states and cache.

    ``all_reduce``, ``rows``: as in ``llama.forward`` (tensor parallel: sums ``wo`` /
    ``w_down`` partials, before the sandwich norms)."""
    # token_ids, positions: i32[T] -> hidden [T, D]
    eps = cfg.rms_norm_eps
    reduce = all_reduce or (lambda y: y)
    specs = cfg.attention_specs()
    embed = params["embed"]
    x = embed[token_ids] * jnp.asarray(cfg.hidden_size**0.5, embed.dtype)  # [T, D]
    for layer_idx, layer in enumerate(params["layers"]):
        inv_freq = rope_inv_freq(cfg.head_dim, specs[layer_idx])

        def qkv_block(x, positions, layer=layer, inv_freq=inv_freq):
            # x: [t, D]; positions: i32[t] -> q [t, Hq, Dh], k, v [t, Hkv, Dh]
            num_tokens = x.shape[0]
            qkv = norm(x, layer["attn_norm"], eps) @ layer["wqkv"]  # [t, (Hq + 2 Hkv) Dh]
            q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
            q = norm(q.reshape(num_tokens, cfg.num_heads, cfg.head_dim), layer["q_norm"], eps)
            k = norm(k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim), layer["k_norm"], eps)
            v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

        def out_block(x, attn, layer=layer):
            # x: [t, D]; attn: [t, Hq, Dh] -> x [t, D]
            o = reduce(attn.reshape(x.shape[0], cfg.q_size) @ layer["wo"])
            x = x + norm(o, layer["post_attn_norm"], eps)
            h = norm(x, layer["mlp_norm"], eps)
            h = reduce(gated_mlp(h, layer["w_gate_up"], layer["w_down"], cfg.hidden_act))
            return x + norm(h, layer["post_mlp_norm"], eps)

        q, k, v = rows(qkv_block, x, positions)
        attn, cache = attn_fn(layer_idx, q, k, v, cache)  # [T, Hq, Dh]
        x = rows(out_block, x, attn)
    return rows(lambda x: norm(x, params["final_norm"], eps), x), cache


# ---------------------------------------------------------------- param layout


def build_params(cfg: ModelConfig, get: GetTensor, dtype: jnp.dtype) -> Params:
    """Assemble the param pytree from HF-named tensors (linear weights ``[out, in]``)."""

    arr, linear = hf_tensors(get, dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layers.append(
            {
                "attn_norm": arr(p + "input_layernorm.weight"),
                "wqkv": linear(*(attn + f"{x}_proj.weight" for x in "qkv")),
                "q_norm": arr(attn + "q_norm.weight"),
                "k_norm": arr(attn + "k_norm.weight"),
                "wo": linear(attn + "o_proj.weight"),
                "post_attn_norm": arr(p + "post_attention_layernorm.weight"),
                "mlp_norm": arr(p + "pre_feedforward_layernorm.weight"),
                "w_gate_up": linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                "w_down": linear(p + "mlp.down_proj.weight"),
                "post_mlp_norm": arr(p + "post_feedforward_layernorm.weight"),
            }
        )
    params = {
        "embed": arr("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": arr("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = linear("lm_head.weight")
    check_shapes(cfg, params)
    return params


def init_random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> Params:
    """Random params of ``cfg``'s shapes (normal, std 0.02; norm weights 0, i.e. scale 1)."""
    normal = normal_drawer(4 * cfg.num_layers + 2, dtype, seed)
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def zeros(n: int) -> jax.Array:
        return jnp.zeros((n,), dtype)

    layers = [
        {
            "attn_norm": zeros(d),
            "wqkv": normal((d, cfg.q_size + 2 * cfg.kv_size)),
            "q_norm": zeros(dh),
            "k_norm": zeros(dh),
            "wo": normal((cfg.q_size, d)),
            "post_attn_norm": zeros(d),
            "mlp_norm": zeros(d),
            "w_gate_up": normal((d, 2 * f)),
            "w_down": normal((f, d)),
            "post_mlp_norm": zeros(d),
        }
        for _ in range(cfg.num_layers)
    ]
    params = {"embed": normal((cfg.vocab_size, d)), "layers": layers, "final_norm": zeros(d)}
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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def from_gguf_tensor(cfg: ModelConfig, hf_name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp's converter stores Gemma norm weights as ``1 + w``; back to HF's ``w``."""
    return w - 1.0 if hf_name.endswith("norm.weight") else w


PRESETS: dict[str, ModelConfig] = {
    "gemma3-270m": ModelConfig(
        arch="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, rms_norm_eps=1e-6, rope_theta=GLOBAL_THETA,
        max_position_embeddings=32768, tie_word_embeddings=True, qk_norm=True,
        hidden_act="gelu_tanh", sliding_window=512, layer_types=layer_types(18),
        rope_local_theta=LOCAL_THETA, query_pre_attn_scalar=256.0,
    ),
    "gemma3-1b": ModelConfig(
        arch="gemma3", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, rms_norm_eps=1e-6,
        rope_theta=GLOBAL_THETA, max_position_embeddings=32768, tie_word_embeddings=True,
        qk_norm=True, hidden_act="gelu_tanh", sliding_window=512, layer_types=layer_types(26),
        rope_local_theta=LOCAL_THETA, query_pre_attn_scalar=256.0,
    ),
    "tiny-gemma3": ModelConfig(
        arch="gemma3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=6,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=GLOBAL_THETA,
        max_position_embeddings=2048, tie_word_embeddings=True, qk_norm=True,
        hidden_act="gelu_tanh", sliding_window=16, layer_types=layer_types(6, 3),
        rope_local_theta=LOCAL_THETA, query_pre_attn_scalar=16.0, attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
    ),
}  # fmt: skip
