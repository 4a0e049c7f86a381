"""``load_model``: resolve ``model=`` (bundled alias, HF directory or .gguf path) and load the
config, params and tokenizer together."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from paged_jax.io.bundled import BUNDLED, bundled_path
from paged_jax.io.gguf_tokenizer import tokenizer_from_metadata
from paged_jax.io.memory import check_fits_device
from paged_jax.io.tokenizer import Tokenizer, load_tokenizer
from paged_jax.io.weights import (
    load_gguf,
    load_hf_dir,
    open_gguf,
    read_gguf_metadata,
    resolve_dtype,
)
from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params
from paged_jax.model.presets import init_random_params, preset_config

RANDOM_PREFIX = "random:"  # random weights of a named real shape, for benchmarks

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None  # None for random-weight presets
    path: Path | None
    load_seconds: float


def resolve_model_path(model: str) -> Path:
    """A bundled alias is fetched (once); a path must be an HF directory or a .gguf file."""
    if model in BUNDLED:
        return bundled_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model={model!r}: directory has no config.json")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model={model!r}: a file must be a .gguf")
        return path
    raise ValueError(
        f"model={model!r} is neither a bundled alias ({', '.join(BUNDLED)}), "
        f"a {RANDOM_PREFIX}<preset> model, "
        "an existing HF model directory, nor a .gguf file"
    )


def load_model(model: str, dtype: Any = None) -> LoadedModel:
    start = time.perf_counter()
    if model.startswith(RANDOM_PREFIX):
        cfg = preset_config(model[len(RANDOM_PREFIX) :])
        check_fits_device(cfg, resolve_dtype(dtype), model)  # before any allocation
        params = init_random_params(cfg, resolve_dtype(dtype))
        return LoadedModel(cfg, params, None, None, time.perf_counter() - start)
    path = resolve_model_path(model)
    if path.is_dir():
        cfg, params = load_hf_dir(path, dtype)
        tokenizer = load_tokenizer(path)
    else:  # parse the GGUF once for weights and tokenizer (its vocab strings are slow to read)
        reader = open_gguf(path)
        meta = read_gguf_metadata(reader)
        cfg, params = load_gguf(path, dtype, reader=reader, meta=meta)
        tokenizer = tokenizer_from_metadata(meta, source=str(path))
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %d layers) in %.2fs", path.name, cfg.arch, cfg.num_layers, seconds)
    return LoadedModel(cfg, params, tokenizer, path, seconds)
