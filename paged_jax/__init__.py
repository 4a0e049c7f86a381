"""paged_jax: a PagedAttention LLM inference engine in JAX.

The public names are imported lazily, so ``import paged_jax.engine`` (pure Python) or
``paged_jax.io.bundled`` never pulls in jax.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "CompletionOutput",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]

_WHERE = {
    "LLM": "paged_jax.llm",
    "BeamSearchOutput": "paged_jax.engine.outputs",
    "BeamSearchParams": "paged_jax.engine.beam",
    "CompletionOutput": "paged_jax.engine.outputs",
    "Logprob": "paged_jax.engine.outputs",
    "RequestOutput": "paged_jax.engine.outputs",
    "SamplingParams": "paged_jax.engine.sampling_params",
    "StructuredOutputsParams": "paged_jax.engine.structured_params",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'paged_jax' has no attribute {name!r}")
