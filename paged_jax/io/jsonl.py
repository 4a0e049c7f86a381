"""JSON Lines: one JSON object per line, errors naming the line. Shared by the batch CLI, the
benchmark's prompt files and the eval tasks' data files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def json_object(line: str, where: str) -> dict[str, Any]:
    """The JSON object on ``line``; ValueError prefixed with ``where`` (e.g. "file:3")."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    return record


def json_objects(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) for every non-blank line of ``text`` (from file ``name``)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, json_object(line, f"{name}:{number}")
