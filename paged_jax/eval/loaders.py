"""Read eval configs: yaml files (``base_config`` chains, dotted ``key=value`` overrides) and
gin files (gin bindings). Both yield plain data that ``config.from_dict`` turns into the same
``EvalConfig``.

yaml: ``base_config: other.yaml`` (relative to the file) is read first and mappings merge key by
key; overrides are dotted, e.g. ``tasks.ppl.stride=64``. Keys set twice are errors.

gin: ``EvalConfig.<field> = ...``, ``EvalConfig.tasks = {'ppl': @ppl/PerplexityTask()}`` and
``ppl/PerplexityTask.stride = 64``. Each configurable has exactly its dataclass's fields as
parameters, so gin itself rejects one the dataclass lacks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

from paged_jax.config import merge_mappings, parse_overrides, read_yaml_chain
from paged_jax.eval.config import TASK_TYPES, EvalConfig, from_dict

# ------------------------------------------------------------------ yaml


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` sets values["a"]["b"]["c"] (value parsed as a yaml scalar)."""
    out = merge_mappings({}, values)
    for dotted, value in parse_overrides(overrides).items():
        node, parts = out, dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is no mapping")
            node = child
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike, overrides: list[str] | None = None) -> EvalConfig:
    values = apply_overrides(read_yaml_chain(Path(path)), overrides or [])
    return from_dict(values, source=str(path))


# ------------------------------------------------------------------ gin


_GIN: dict[str, Any] = {}


def _gin_collector(cls: type, fields: list[str]) -> Any:
    """A function whose keyword parameters are ``fields`` and that returns what it was given
    (gin passes only the bound ones), plus the task type; gin validates names against it."""

    def collect(**values: Any) -> dict[str, Any]:
        return {"type": cls.type, **values} if hasattr(cls, "type") else values

    collect.__name__ = collect.__qualname__ = cls.__name__
    collect.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=None) for f in fields]
    )
    return collect


def _register_gin() -> Any:
    import gin

    if not _GIN:
        for cls in (EvalConfig, *TASK_TYPES.values()):
            fields = [f.name for f in dataclasses.fields(cls)]
            fn = _gin_collector(cls, fields)
            _GIN[cls.__name__] = gin.external_configurable(fn, cls.__name__, "paged_jax.eval")
    return gin


def load_gin(files: list[str | os.PathLike], bindings: list[str] | None = None) -> EvalConfig:
    """Parse gin files and bindings, call ``EvalConfig()`` and build the dataclasses."""
    try:
        gin = _register_gin()
    except ImportError:
        raise ValueError("gin files need gin-config: pip install 'paged_jax[eval]'") from None
    source = ", ".join(map(str, files)) or "gin bindings"
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], bindings or [])
        values = _GIN["EvalConfig"]()
    finally:
        gin.clear_config()
    return from_dict(values, source=source)
