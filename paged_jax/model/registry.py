"""The model registry: one place maps an HF ``model_type`` / GGUF ``general.architecture`` to a
family (config parsers, GGUF weight names, param layout, forward, presets).

``FAMILIES`` holds functions and constant tables only (no model objects). Everything that
depends on the family (the loaders in ``io/weights.py``, the paged step, the dense reference,
random presets) asks ``family_of(cfg)``, so adding a family is one module plus one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from paged_jax.model import gemma3, llama
from paged_jax.model.config import (
    LLAMA_GGUF_ARCHS,
    LLAMA_HF_TYPES,
    ModelConfig,
    llama_from_gguf,
    llama_from_hf,
)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    parse_hf: Callable[[Mapping[str, Any]], ModelConfig]
    parse_gguf: Callable[..., ModelConfig]  # (meta, tensor_names, rope_freq_factors)
    gguf_layer_names: Mapping[str, str]  # GGUF ``blk.N.<x>`` suffix -> HF ``model.layers.N.<y>``
    from_gguf_tensor: Callable[[ModelConfig, str, np.ndarray], np.ndarray]  # (cfg, hf_name, w)
    build_params: Callable[..., llama.Params]  # (cfg, get HF-named tensor, dtype)
    init_random_params: Callable[..., llama.Params]  # (cfg, dtype, seed)
    forward: Callable[..., tuple[Any, Any]]  # (params, cfg, token_ids, positions, cache, attn_fn)
    compute_logits: Callable[..., Any]  # (params, cfg, hidden [N, D]) -> f32[N, V]
    presets: Mapping[str, ModelConfig]


FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama",
        hf_model_types=LLAMA_HF_TYPES,
        gguf_archs=LLAMA_GGUF_ARCHS,
        parse_hf=llama_from_hf,
        parse_gguf=llama_from_gguf,
        gguf_layer_names=llama.GGUF_LAYER_NAMES,
        from_gguf_tensor=llama.from_gguf_tensor,
        build_params=llama.build_params,
        init_random_params=llama.init_random_params,
        forward=llama.forward,
        compute_logits=llama.compute_logits,
        presets=llama.PRESETS,
    ),
    "gemma3": Family(
        name="gemma3",
        hf_model_types=gemma3.HF_MODEL_TYPES,
        gguf_archs=gemma3.GGUF_ARCHS,
        parse_hf=gemma3.from_hf,
        parse_gguf=gemma3.from_gguf,
        gguf_layer_names=gemma3.GGUF_LAYER_NAMES,
        from_gguf_tensor=gemma3.from_gguf_tensor,
        build_params=gemma3.build_params,
        init_random_params=gemma3.init_random_params,
        forward=gemma3.forward,
        compute_logits=gemma3.compute_logits,
        presets=gemma3.PRESETS,
    ),
}


def supported_hf_types() -> tuple[str, ...]:
    return tuple(t for f in FAMILIES.values() for t in f.hf_model_types)


def supported_gguf_archs() -> tuple[str, ...]:
    return tuple(a for f in FAMILIES.values() for a in f.gguf_archs)


def _find(owned: Callable[[Family], tuple], value: Any, what: str, supported: tuple) -> Family:
    for family in FAMILIES.values():
        if value in owned(family):
            return family
    raise ValueError(f"{what}={value!r} is not supported (supported: {', '.join(supported)})")


def family_for_hf(model_type: Any) -> Family:
    return _find(lambda f: f.hf_model_types, model_type, "config.json model_type",
                 supported_hf_types())  # fmt: skip


def family_for_gguf(arch: Any) -> Family:
    return _find(lambda f: f.gguf_archs, arch, "GGUF general.architecture",
                 supported_gguf_archs())  # fmt: skip


def family_of(cfg: ModelConfig) -> Family:
    """The family of a parsed config (``cfg.arch`` is a model_type or GGUF arch it owns)."""
    for family in FAMILIES.values():
        if cfg.arch in family.hf_model_types + family.gguf_archs:
            return family
    raise ValueError(f"arch={cfg.arch!r} belongs to no model family ({', '.join(FAMILIES)})")


def forward(params: llama.Params, cfg: ModelConfig, *args: Any) -> tuple[Any, Any]:
    """The family's forward: ``(params, cfg, token_ids, positions, cache, attn_fn)``."""
    return family_of(cfg).forward(params, cfg, *args)


def compute_logits(params: llama.Params, cfg: ModelConfig, hidden: Any) -> Any:
    return family_of(cfg).compute_logits(params, cfg, hidden)
