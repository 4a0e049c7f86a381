"""Shared fixtures: the bundled SmolLM2 GGUF (fetched once into the cache) and data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from paged_jax.io.bundled import bundled_path

    return bundled_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from paged_jax.io.bundled import bundled_path

    return bundled_path("gemma3-270m")
