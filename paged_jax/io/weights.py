"""Checkpoint loading: HF safetensors directories and GGUF files into the model's param pytree.

Both formats are first mapped onto HF tensor names (linear weights ``[out, in]``), then the
model family's ``build_params`` (``model/registry.py``) assembles its pytree. GGUF tensors are
dequantized with the ``gguf`` package (every type it supports); the family names its ``blk.N.``
tensors and undoes what llama.cpp's converter changed (Llama's q/k row permutation for
interleaved RoPE, Gemma's ``1 + w`` norms).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.io.memory import check_fits_device
from paged_jax.model.config import ModelConfig, from_gguf_metadata, from_hf_config
from paged_jax.model.llama import Params
from paged_jax.model.registry import family_of

logger = logging.getLogger(__name__)

GetTensor = Callable[[str], Any]  # HF tensor name -> array in HF layout


def default_dtype() -> jnp.dtype:
    """bf16 on GPU/TPU, f32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve_dtype(dtype: str | jnp.dtype | None) -> jnp.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype()
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} must be one of auto, {', '.join(names)}")
        return names[dtype]
    return jnp.dtype(dtype)


def build_params(cfg: ModelConfig, get: GetTensor, dtype: jnp.dtype) -> Params:
    """Assemble ``cfg``'s family's param pytree from HF-named tensors (``[out, in]`` linears)."""
    check_fits_device(cfg, dtype, cfg.arch)  # before the first weight is placed
    return family_of(cfg).build_params(cfg, get, dtype)


# ---------------------------------------------------------------- HF safetensors directories


def load_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return from_hf_config(raw)


def _hf_tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{index} is not a JSON object: {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) {missing} that do not exist")
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    out = {}
    for f in files:
        with _open_safetensors(f) as sf:
            out.update({name: f for name in sf.keys()})
    return out


def _open_safetensors(path: Path) -> Any:
    """``safe_open`` with errors naming the file (safetensors' own name none)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} does not exist")
    try:
        return safe_open(path, framework="flax")
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def load_hf_dir(model_dir: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, Params]:
    model_dir = Path(model_dir)
    cfg = load_hf_config(model_dir)
    files = _hf_tensor_files(model_dir)
    handles: dict[Path, Any] = {}

    def get(name: str) -> jax.Array:
        if name not in files:
            raise ValueError(f"checkpoint in {model_dir} is missing tensor {name!r}")
        f = files[name]
        if f not in handles:
            handles[f] = _open_safetensors(f)
        try:
            return handles[f].get_tensor(name)
        except Exception as e:  # SafetensorError: the data ends early
            raise ValueError(f"{f}: tensor {name!r} cannot be read: {e}") from None

    params = build_params(cfg, get, resolve_dtype(dtype))
    return cfg, params


# ---------------------------------------------------------------- GGUF files

_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    """HF name of a GGUF tensor; ``layer_names`` is the family's ``blk.N.`` suffix map."""
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
    return None


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value fields as plain Python values (token lists included)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:  # a malformed field: name it rather than fail obscurely later
            raise ValueError(f"GGUF metadata field {key!r} cannot be read: {e}") from e
    return meta


def open_gguf(path: str | os.PathLike) -> Any:
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def load_gguf(
    path: str | os.PathLike, dtype: Any = None, *, reader: Any = None, meta: Any = None
) -> tuple[ModelConfig, Params]:
    """Config and params of a GGUF file (pass an open ``reader``/``meta`` to parse it once)."""
    from gguf.quants import dequantize

    reader = reader if reader is not None else open_gguf(path)
    meta = meta if meta is not None else read_gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    factors = None
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        factors = tuple(float(x) for x in dequantize(t.data, t.tensor_type).reshape(-1))
    cfg = from_gguf_metadata(meta, set(tensors), factors)
    family = family_of(cfg)
    by_hf = {}
    for name in tensors:
        hf = _hf_name(name, family.gguf_layer_names)
        if hf is not None:
            by_hf[hf] = tensors[name]

    def get(name: str) -> np.ndarray:
        if name not in by_hf:
            raise ValueError(f"GGUF file {path} is missing the tensor for {name!r}")
        t = by_hf[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        return family.from_gguf_tensor(cfg, name, w)  # e.g. llama's q/k row order

    params = build_params(cfg, get, resolve_dtype(dtype))
    return cfg, params
