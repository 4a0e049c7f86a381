"""``StructuredOutputsParams``: vLLM's shape for constraining a completion to a JSON schema, a
regex, a list of choices or a Lark grammar. Validated here for form only; the grammar itself is
compiled (and rejected when malformed or unsatisfiable) by ``paged_jax.structured`` when the
request is made, so a bad one fails that request alone."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or its JSON text), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (Lark syntax, as llguidance
    reads it; GBNF is converted), ``json_object=True`` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs={self!r} must set exactly one of {list(_KINDS)}, "
                f"got {given or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError(f"structured_outputs.json={self.json!r} must be a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name}={value!r} must be a non-empty str")
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"structured_outputs.choice={self.choice!r} must be a non-empty list of "
                "non-empty str"
            )
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object={self.json_object!r} must be a bool")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams:
        """From a StructuredOutputsParams or a dict of its fields (a JSONL line's value)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(_KINDS))
            if unknown:
                raise ValueError(f"structured_outputs={value!r}: unknown field(s) {unknown}")
            return cls(**value)
        raise ValueError(
            f"structured_outputs={value!r} must be StructuredOutputsParams or a dict of "
            f"{list(_KINDS)}"
        )
