"""Data parallel batch jobs across processes (and hosts) over JAX's multi-controller runtime.

Each process calls ``initialize`` (``jax.distributed.initialize``: a coordinator address,
the process count and this process's id, from arguments or from what JAX detects in the
environment of Cloud TPU, SLURM, Open MPI or Kubernetes), takes its shard of the input
(``local_items``: every ``num_processes``-th item, so long and short prompts spread evenly),
runs its own engine over its own local devices (its own tensor-parallel mesh), and hands its
results to ``write_merged``: each process writes a part file next to the output, a barrier
of the runtime waits for all of them, and process 0 merges the parts into one file in input
order, checking that every input index is there exactly once. The parts must be on a file
system every process sees (one host; NFS / a GCS mount across hosts).

No transport of our own: the runtime's barrier (``multihost_utils.sync_global_devices``) is
the only cross-process traffic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    process_id: int = 0
    num_processes: int = 1


SINGLE = ProcessGroup()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    from_environment: bool = False,
) -> ProcessGroup:
    """Join the job (``jax.distributed.initialize``) and return this process's place in it.

    With none of the three arguments and ``from_environment`` False: a single process, JAX
    left alone. Call it before anything else touches jax."""
    given = [coordinator_address, num_processes, process_id]
    if all(v is None for v in given) and not from_environment:
        return SINGLE
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    group = ProcessGroup(jax.process_index(), jax.process_count())
    logger.info(
        "process %d of %d, %d local device(s)",
        group.process_id,
        group.num_processes,
        jax.local_device_count(),
    )
    return group


def local_items(items: Sequence[T], group: ProcessGroup) -> list[T]:
    """This process's shard: items ``process_id``, ``process_id + num_processes``, ..."""
    return list(items[group.process_id :: group.num_processes])


def part_path(output: Path, group: ProcessGroup, process_id: int | None = None) -> Path:
    i = group.process_id if process_id is None else process_id
    return output.with_name(f"{output.name}.part-{i:05d}-of-{group.num_processes:05d}")


def barrier(name: str, group: ProcessGroup) -> None:
    """Wait until every process of the job reaches ``name`` (a no-op for one process)."""
    if group.num_processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_merged(
    output: str | Path,
    records: Iterable[tuple[int, dict[str, Any]]],
    expected: Iterable[int],
    group: ProcessGroup,
) -> None:
    """Write (input index, record) pairs of every process as one JSONL file in input order.

    Each process writes its part; after a barrier process 0 merges them (every index in
    ``expected`` exactly once, else ValueError) and removes the parts; a second barrier
    holds the others until the merged file exists."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r[0])
    if group.num_processes == 1:
        _write_lines(output, (r for _, r in records))
        return
    _write_lines(part_path(output, group), ([i, r] for i, r in records))
    barrier("paged_jax: parts written", group)
    try:
        if group.process_id == 0:
            _merge(output, expected, group)
    finally:  # the others wait for the merge, and are released even if it failed
        barrier("paged_jax: merged", group)


def _merge(output: Path, expected: Iterable[int], group: ProcessGroup) -> None:
    merged = _read_parts(output, group)
    want = sorted(expected)
    got = [i for i, _ in merged]
    if got != want:
        missing, extra = sorted(set(want) - set(got)), len(got) - len(set(got))
        raise ValueError(f"merging {output}: input lines {missing} missing, {extra} twice")
    _write_lines(output, (r for _, r in merged))
    for i in range(group.num_processes):
        part_path(output, group, i).unlink()
    logger.info("merged %d parts into %s (%d lines)", group.num_processes, output, len(got))


def _read_parts(output: Path, group: ProcessGroup) -> list[tuple[int, dict[str, Any]]]:
    merged = []
    for i in range(group.num_processes):
        for line in part_path(output, group, i).read_text().splitlines():
            index, record = json.loads(line)
            merged.append((int(index), record))
    return sorted(merged, key=lambda r: r[0])


def _write_lines(path: Path, objects: Iterable[Any]) -> None:
    with open(path, "w") as f:
        for obj in objects:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
