"""Shared fixtures: the bundled SmolLM2 GGUF (fetched once into the cache), data paths, and
shortened random presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from paged_jax.model import presets

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


@pytest.fixture
def short_preset(monkeypatch):
    """``short_preset(name, num_layers)`` -> "random:<name>-<n>l": a random preset with the
    same layer shapes and fewer layers (a shorter compile), registered for this test only."""

    def make(name: str, num_layers: int) -> str:
        short = dataclasses.replace(presets.PRESETS[name], num_layers=num_layers)
        monkeypatch.setitem(presets.PRESETS, f"{name}-{num_layers}l", short)
        return f"random:{name}-{num_layers}l"

    return make
