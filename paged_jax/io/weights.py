"""Checkpoint loading: HF safetensors directories and GGUF files into the model's param pytree.

Both formats are first mapped onto HF tensor names (linear weights ``[out, in]``), then one
function, ``build_params``, assembles the pytree documented in ``model/llama.py``. GGUF tensors
are dequantized with the ``gguf`` package (every type it supports); llama.cpp stores the rows of
``attn_q``/``attn_k`` of ``llama`` models permuted for interleaved RoPE, which we undo here so
the model keeps a single (rotate-half) RoPE.
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
    """Assemble the param pytree from HF-named tensors (linear weights ``[out, in]``)."""
    check_fits_device(cfg, dtype, cfg.arch)  # before the first weight is placed

    def arr(name: str) -> jax.Array:
        return jnp.asarray(get(name), dtype=dtype)

    def linear(*names: str) -> jax.Array:
        # HF [out, in] pieces -> [in, sum(out)]
        return jnp.concatenate([arr(n) for n in names], axis=0).T

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        layer = {
            "attn_norm": arr(p + "input_layernorm.weight"),
            "wqkv": linear(*(attn + f"{x}_proj.weight" for x in "qkv")),
            "wo": linear(attn + "o_proj.weight"),
            "mlp_norm": arr(p + "post_attention_layernorm.weight"),
            "w_gate_up": linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "w_down": linear(p + "mlp.down_proj.weight"),
        }
        if cfg.qkv_bias:
            layer["bqkv"] = jnp.concatenate([arr(attn + f"{x}_proj.bias") for x in "qkv"])
        if cfg.o_bias:
            layer["bo"] = arr(attn + "o_proj.bias")
        if cfg.qk_norm:
            layer["q_norm"] = arr(attn + "q_norm.weight")
            layer["k_norm"] = arr(attn + "k_norm.weight")
        layers.append(layer)
    params = {
        "embed": arr("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": arr("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = linear("lm_head.weight")
    _check_shapes(cfg, params)
    return params


def _check_shapes(cfg: ModelConfig, params: Params) -> None:
    qkv = cfg.q_size + 2 * cfg.kv_size
    want = {
        "embed": (cfg.vocab_size, cfg.hidden_size),
        "wqkv": (cfg.hidden_size, qkv),
        "wo": (cfg.q_size, cfg.hidden_size),
        "w_gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size),
        "w_down": (cfg.intermediate_size, cfg.hidden_size),
    }
    layer0 = params["layers"][0]
    got = {k: params["embed"].shape if k == "embed" else layer0[k].shape for k in want}
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise ValueError(f"weight {name} has shape {tuple(got[name])}, config implies {shape}")


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

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of a q/k weight or bias (HF layout)."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    by_hf = {}
    for name in tensors:
        hf = _hf_name(name)
        if hf is not None:
            by_hf[hf] = tensors[name]

    def get(name: str) -> np.ndarray:
        if name not in by_hf:
            raise ValueError(f"GGUF file {path} is missing the tensor for {name!r}")
        t = by_hf[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if cfg.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            w = _unpermute_rows(w, heads)
        return w

    params = build_params(cfg, get, resolve_dtype(dtype))
    return cfg, params
