"""JSON Lines: one JSON object per line, errors naming the line. Shared by the batch CLI, the
benchmark's prompt files and the eval tasks' data files; and the CLI's result file, written a
record at a time so that a killed job can resume.

Lines are split on ``"\\n"`` only (a final ``"\\r"`` dropped), never with ``str.splitlines``:
U+2028, U+2029 and NEL are ordinary characters inside a JSON string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def json_object(line: str, where: str) -> dict[str, Any]:
    """The JSON object on ``line``; ValueError prefixed with ``where`` (e.g. "file:3")."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    return record


def split_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split on "\\n" only, a trailing "\\r" dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def decode_lines(data: bytes, name: str) -> Iterator[tuple[int, str | ValueError]]:
    """(line number from 1, text) of every line of ``data``; for a line that is not UTF-8, a
    ValueError naming the line and column instead of its text (the other lines stay)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            yield number, raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            byte, column = raw[e.start], e.start + 1
            yield (
                number,
                ValueError(f"{name}:{number}: not UTF-8 (byte 0x{byte:02x} at column {column})"),
            )


def json_objects(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) for every non-blank line of ``text`` (from file ``name``)."""
    for number, line in enumerate(split_lines(text), start=1):
        if line.strip():
            yield number, json_object(line, f"{name}:{number}")


class ResultFile:
    """A JSONL result file written one record at a time, each line flushed as it is written,
    so a job killed at any point loses at most the line being written. Every record has an
    ``"id"``. With ``resume`` the records already in the file are kept (a line cut short by
    a kill is dropped) and ``in`` tells which ids to skip; ``finish`` puts the file in input
    order. Opening checks at once that the file can be written (before any work is done)."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.check_writable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, str] = {}  # id -> its line, in the order written
        if resume and self.path.exists():
            for line in self.path.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # blank, or the line a kill cut short
                if isinstance(record, dict) and "id" in record:
                    self._records[str(record["id"])] = line.decode("utf-8")
        self.num_resumed = len(self._records)
        self._replace(self._records.values())  # atomically: a kill now keeps the old file
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish)

    @staticmethod
    def check_writable(path: str | os.PathLike) -> None:
        """ValueError (OSError for a folder that cannot be made) when ``path`` cannot become
        the result file; creates nothing (folders excepted)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"output {str(path)!r} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"output {str(path)!r} cannot be written")

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (its ``"id"`` must be new) and flush it to the file."""
        request_id = str(record["id"])
        if request_id in self._records:
            raise ValueError(f"id {request_id!r} written twice")
        line = json.dumps(record, ensure_ascii=False)
        self._records[request_id] = line
        self._file.write(line + "\n")
        self._file.flush()

    def records(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        return [json.loads(self._records[i]) for i in ids if i in self._records]

    def finish(self, ids: list[str]) -> None:
        """Rewrite the file with the records of ``ids`` in that order (atomically); ids not
        written are left out, and records of ids not listed are kept at the end."""
        self._file.close()
        listed = set(ids)
        lines = [self._records[i] for i in ids if i in self._records]
        lines += [line for i, line in self._records.items() if i not in listed]
        self._replace(lines)

    def close(self) -> None:
        self._file.close()

    def _replace(self, lines: Iterable[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, self.path)
