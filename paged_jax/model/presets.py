"""Named real model shapes with random weights, for benchmarks (``model="random:llama2-7b"``).

The weights are drawn on device (normal, std 0.02; norms at 1) in the requested dtype, so an
8B-shaped model needs no checkpoint and no host copy. There is no tokenizer: prompts are token
ids and requests use ``SamplingParams(detokenize=False)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params

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


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model=random:{name} is not a preset; known: {sorted(PRESETS)}")
    return PRESETS[name]


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> Params:
    """Random params of ``cfg``'s shapes, laid out as ``model/llama.py`` documents."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8 * cfg.num_layers + 8))

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return _normal(next(keys), shape, jnp.dtype(dtype))  # one compile per distinct shape

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


def param_bytes(params: Params) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
