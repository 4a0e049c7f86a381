"""Named real model shapes with random weights, for benchmarks (``model="random:llama2-7b"``).

Each family lists its presets (``model/registry.py``); this module is the one lookup. The
weights are drawn on device (normal, std 0.02; norms at their identity) in the requested dtype,
so an 8B-shaped model needs no checkpoint and no host copy. There is no tokenizer: prompts are
token ids and requests use ``SamplingParams(detokenize=False)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params
from paged_jax.model.registry import FAMILIES, family_of

PRESETS: dict[str, ModelConfig] = {
    name: cfg for family in FAMILIES.values() for name, cfg in family.presets.items()
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model=random:{name} is not a preset; known: {sorted(PRESETS)}")
    return PRESETS[name]


def init_random_params(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> Params:
    """Random params of ``cfg``'s shapes, in its family's layout."""
    return family_of(cfg).init_random_params(cfg, dtype, seed)


def param_bytes(params: Params) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
