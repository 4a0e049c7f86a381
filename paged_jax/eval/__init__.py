"""Evaluation runs configured by yaml or gin: perplexity, multiple choice and generation tasks
on an ``LLM`` (see ``config`` for the schema, ``tasks`` for the scoring, ``runner`` for the
result file). Names are imported lazily: ``paged_jax.eval.scoring`` needs neither jax nor yaml.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvalConfig", "load_gin", "load_yaml", "run_eval", "summary_line"]

_WHERE = {
    "EvalConfig": "paged_jax.eval.config",
    "load_gin": "paged_jax.eval.loaders",
    "load_yaml": "paged_jax.eval.loaders",
    "run_eval": "paged_jax.eval.runner",
    "summary_line": "paged_jax.eval.runner",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'paged_jax.eval' has no attribute {name!r}")
