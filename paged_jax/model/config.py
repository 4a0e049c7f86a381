"""Model hyper-parameters: one frozen dataclass for every family, its per-layer attention
specs, and the Llama-family parsers of HF ``config.json`` / GGUF metadata.

``from_hf_config`` / ``from_gguf_metadata`` dispatch on ``model_type`` / ``general.architecture``
through ``model/registry.py``. The Llama family parsed here: Llama 1/2/3 (incl. ``rope_scaling``
type llama3 and linear), Mistral (with or without its all-layer sliding window), Qwen2 (qkv bias)
and Qwen3 (per-head q/k RMSNorm). Anything else is rejected with a ``ValueError`` naming the
field, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

LLAMA_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LLAMA_GGUF_ARCHS = ("llama", "qwen2", "qwen3")
SLIDING, FULL = "sliding_attention", "full_attention"  # layer types, as HF names them


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    factor: float  # positions divided by factor (inv_freq / factor)


RopeScaling = Llama3RopeScaling | LinearRopeScaling


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention needs beyond q/k/v: it reaches the kernel call of that layer."""

    sm_scale: float
    sliding_window: int | None = None  # attend to kv positions > pos - window (None: all)
    soft_cap: float | None = None  # scores -> cap * tanh(scores / cap)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # of full-attention layers
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF rope_freqs: inv_freq /= factor
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias=True also sets o_bias
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_tanh (GeGLU)
    sliding_window: int | None = None  # window of the layers whose type is SLIDING
    layer_types: tuple[str, ...] | None = None  # None: all SLIDING if sliding_window, else FULL
    rope_local_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)
    query_pre_attn_scalar: float | None = None  # sm_scale = this ** -0.5 (None: head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a positive multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be a positive even number")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act={self.hidden_act!r} must be 'silu' or 'gelu_tanh'")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be None or >= 1")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(
                    f"layer_types={self.layer_types} must list {self.num_layers} entries, "
                    f"each {SLIDING!r} or {FULL!r}"
                )
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is None")

    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return FULL if self.sliding_window is None else SLIDING

    def attention_specs(self) -> tuple[AttentionSpec, ...]:
        """One spec per layer (window, scale, soft cap, RoPE base/scaling)."""
        scalar = self.query_pre_attn_scalar or self.head_dim
        specs = []
        for layer in range(self.num_layers):
            sliding = self.layer_type(layer) == SLIDING
            # Gemma 3: sliding layers have their own base and no scaling (HF and llama.cpp alike)
            local = sliding and self.rope_local_theta is not None
            specs.append(
                AttentionSpec(
                    sm_scale=float(scalar) ** -0.5,
                    sliding_window=self.sliding_window if sliding else None,
                    soft_cap=self.attn_logit_softcap,
                    rope_theta=self.rope_local_theta if local else self.rope_theta,
                    rope_scaling=None if local else self.rope_scaling,
                )
            )
        return tuple(specs)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_rope(
    cfg: Mapping[str, Any], params: Mapping[str, Any] | None = None, default_theta: float = 1e4
) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either the transformers<5 or the >=5 (rope_parameters) keys."""
    params = params if params is not None else (cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta", params.get("rope_theta", default_theta)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, LinearRopeScaling(factor=float(scaling["factor"]))
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
    return theta, Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def from_hf_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """Parse a HF ``config.json`` dict with its family's parser (``model/registry.py``)."""
    from paged_jax.model.registry import family_for_hf

    return family_for_hf(cfg.get("model_type")).parse_hf(cfg)


def from_gguf_metadata(
    meta: Mapping[str, Any],
    tensor_names: set[str],
    rope_freq_factors: tuple[float, ...] | None = None,
) -> ModelConfig:
    """Parse GGUF key/value metadata with its family's parser (``model/registry.py``)."""
    from paged_jax.model.registry import family_for_gguf

    family = family_for_gguf(meta.get("general.architecture"))
    return family.parse_gguf(meta, tensor_names, rope_freq_factors)


def gguf_getter(meta: Mapping[str, Any], arch: str):
    """``get(key, default)`` of ``{arch}.{key}``; a key without a default must be present."""

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise ValueError(f"GGUF metadata is missing {full!r}")
        return meta.get(full, default)

    return get


def llama_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Parse a Llama-family HF ``config.json`` dict. Raises ValueError naming any unsupported
    field."""
    model_type = cfg.get("model_type")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=True is not supported")
    window = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window", model_type == "mistral"):
        window = None  # Qwen2/3 configs carry a window they do not use
    elif model_type != "mistral" and window is not None:
        # Qwen2's window covers only layers >= max_window_layers: not a single all-layer window
        raise ValueError(f"config.json use_sliding_window=True ({model_type}) is not supported")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise ValueError("config.json num_experts: mixture-of-experts models are not supported")
    theta, scaling = parse_rope(cfg)
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // num_heads
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        arch=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type in ("llama", "mistral") and attention_bias,
        qk_norm=model_type == "qwen3",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
        sliding_window=None if window is None else int(window),
    )


def llama_from_gguf(
    meta: Mapping[str, Any],
    tensor_names: set[str],
    rope_freq_factors: tuple[float, ...] | None = None,
) -> ModelConfig:
    """Parse Llama-family GGUF key/value metadata (already decoded to Python values).

    llama.cpp bakes llama3 rope scaling into a ``rope_freqs.weight`` tensor of per-frequency
    divisors; the loader passes it here as ``rope_freq_factors``.
    """
    arch = meta.get("general.architecture")
    get = gguf_getter(meta, arch)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF {arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}")
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear") or (
        scaling_type == "linear" and float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0
    ):
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported")
    if rope_freq_factors is not None and len(rope_freq_factors) != head_dim // 2:
        raise ValueError(
            f"GGUF rope_freqs.weight has {len(rope_freq_factors)} entries, expected {head_dim // 2}"
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    max_pos = int(get("context_length", 2048))
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=rope_freq_factors,
        max_position_embeddings=max_pos,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids(eos),
    )


def llama3_inv_freq_scale(scaling: Llama3RopeScaling, inv_freq: list[float]) -> list[float]:
    """Apply llama3 frequency-dependent scaling to the RoPE inverse frequencies."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scaling.factor)
        else:
            smooth = (
                scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor
            ) / (scaling.high_freq_factor - scaling.low_freq_factor)
            out.append((1 - smooth) * f / scaling.factor + smooth * f)
    return out
