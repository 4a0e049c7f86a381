"""The bundled-model cache: reuse without network, clear errors when a fetch fails."""

from __future__ import annotations

import subprocess

import pytest

from paged_jax.io import bundled
from paged_jax.io.loader import resolve_model_path


def test_cached_file_is_reused_without_fetching(smollm2_gguf, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not fetch when the cache holds a verified file")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert bundled.bundled_path("smollm2-135m") == smollm2_gguf
    assert smollm2_gguf.parent.parent == bundled.cache_dir()


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="no network")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="could not fetch bundled model 'smollm2-135m'"):
        bundled.bundled_path("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        bundled.bundled_path("smollm2-135m", download=False)


def test_corrupt_cache_file_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    spec = bundled.BUNDLED["smollm2-135m"]
    target = tmp_path / "smollm2-135m" / spec.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated download")
    with pytest.raises(FileNotFoundError):
        bundled.bundled_path("smollm2-135m", download=False)


def test_model_argument_forms(smollm2_gguf, data_dir, tmp_path):
    assert resolve_model_path("smollm2-135m") == smollm2_gguf
    assert resolve_model_path(str(data_dir / "tiny-qwen2")) == data_dir / "tiny-qwen2"
    assert resolve_model_path(str(smollm2_gguf)) == smollm2_gguf
    with pytest.raises(ValueError, match="model='nope'"):
        resolve_model_path("nope")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model_path(str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match="bundled"):
        bundled.bundled_path("nope")
