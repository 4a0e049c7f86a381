"""Import direction: the host engine never touches jax or the rest of paged_jax, and `pack` /
`buckets` (where host data becomes arrays) stay numpy-only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "paged_jax"


def imported_modules(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package_parts = ["paged_jax", *path.parent.relative_to(package_root).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def is_jax(name: str) -> bool:
    root = name.split(".")[0]
    return root in ("jax", "jaxlib", "flax", "optax")


ENGINE_FILES = sorted((PACKAGE / "engine").glob("*.py"))


def test_engine_modules_exist():
    names = {p.name for p in ENGINE_FILES}
    assert {"scheduler.py", "kv_cache.py", "sequence.py", "plan.py", "burst.py"} <= names
    assert "page_allocator.py" not in names  # the KV cache manager replaced it


RUNTIME_FILES = sorted((PACKAGE / "runtime").glob("*.py"))
LIVE_SEQ = re.compile(r"\.seq\b")  # .seq. and item.seq alike; not .seq_len, .seed


def test_runtime_modules_exist():
    assert {"pack.py", "runner.py", "burst.py"} <= {p.name for p in RUNTIME_FILES}


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: p.name)
def test_runtime_never_reads_the_live_sequence(path):
    """The runtime packs from ScheduledSeq's snapshots only (``item.seq`` is the engine's):
    no ``.seq.`` / ``item.seq`` / ``.seq`` anywhere in its source, comments included."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not LIVE_SEQ.search(line), f"{path.name}:{number} reads a live sequence: {line}"


@pytest.mark.parametrize(
    "line", ["x = item.seq.token_ids", "seq = item.seq", "f(plan.scheduled[0].seq)", "a.seq.b"]
)
def test_live_sequence_pattern_catches_reads(line):
    assert LIVE_SEQ.search(line)


@pytest.mark.parametrize("line", ["item.seed", "item.sequence", "num_seqs", "item.seq_len"])
def test_live_sequence_pattern_spares_other_names(line):
    assert not LIVE_SEQ.search(line)


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: p.name)
def test_engine_imports_no_jax_and_nothing_else_of_paged_jax(path):
    for name in imported_modules(path):
        assert not is_jax(name), f"{path.name} imports {name}"
        if name.split(".")[0] == "paged_jax":
            assert name.startswith("paged_jax.engine"), f"{path.name} imports {name}"


@pytest.mark.parametrize("name", ["pack.py", "buckets.py"])
def test_pack_and_buckets_import_no_jax(name):
    path = PACKAGE / "runtime" / name
    for module in imported_modules(path):
        assert not is_jax(module), f"{name} imports {module}"
        if module.split(".")[0] == "paged_jax":
            assert module.startswith("paged_jax.engine"), f"{name} imports {module}"


def test_relative_imports_are_resolved(tmp_path):
    engine = tmp_path / "paged_jax" / "engine"
    engine.mkdir(parents=True)
    probe = engine / "probe.py"
    probe.write_text("from . import plan\nfrom .. import runtime\nfrom .sequence import Sequence\n")
    names = imported_modules(probe, package_root=tmp_path / "paged_jax")
    assert {"paged_jax.engine.plan", "paged_jax.runtime", "paged_jax.engine.sequence"} <= names


def test_engine_import_does_not_load_jax():
    import subprocess
    import sys

    code = (
        "import sys, paged_jax.engine.scheduler, paged_jax.io.bundled; print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
