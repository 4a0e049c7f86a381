"""Logit parity with HF transformers (fixtures from scripts/make_fixtures.py; no torch here)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from paged_jax.io.weights import load_gguf, load_hf_dir
from paged_jax.model.config import from_hf_config
from paged_jax.model.dense import dense_logits, greedy_matches

MAX_ABS_LOGIT_DIFF_F32 = 1e-3
TINY = ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"]


def _prompts(npz) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in npz.files if k.startswith("prompt_"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_hf_logits_and_greedy(name, data_dir):
    cfg, params = load_hf_dir(data_dir / name, "float32")
    ref = np.load(data_dir / f"logits_{name}.npz")
    for i in _prompts(ref):
        prompt = ref[f"prompt_{i}"]
        logits = np.asarray(dense_logits(params, cfg, jnp.asarray(prompt)[None])[0])
        assert np.abs(logits - ref[f"logits_{i}"]).max() <= MAX_ABS_LOGIT_DIFF_F32
        assert greedy_matches(params, cfg, prompt.tolist(), ref[f"greedy_{i}"].tolist())


def test_smollm2_gguf_logits_and_greedy(smollm2_gguf, data_dir):
    cfg, params = load_gguf(smollm2_gguf, "float32")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    ref = np.load(data_dir / "logits_smollm2-135m.npz")
    for i in _prompts(ref):
        prompt, greedy = ref[f"prompt_{i}"].tolist(), ref[f"greedy_{i}"].tolist()
        # one teacher-forced forward over prompt + HF's greedy tokens checks both: the logits
        # at prompt positions, and that each greedy token is our argmax (so greedy agrees)
        ids = jnp.asarray([prompt + greedy], jnp.int32)
        logits = np.asarray(dense_logits(params, cfg, ids)[0])  # f32[T, V]
        n = len(prompt)
        top_ids = ref[f"top_ids_{i}"]
        ours_at_ref_top = np.take_along_axis(logits[:n], top_ids, axis=1)
        assert np.abs(ours_at_ref_top - ref[f"top_vals_{i}"]).max() <= MAX_ABS_LOGIT_DIFF_F32
        assert np.abs(logits[n - 1] - ref[f"last_logits_{i}"]).max() <= MAX_ABS_LOGIT_DIFF_F32
        assert logits[n - 1 : n - 1 + len(greedy)].argmax(-1).tolist() == greedy


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(dtype, data_dir, tmp_path):
    """A bf16/f16 safetensors dir loads, keeps its dtype, and stays close to the f32 logits."""
    import ml_dtypes

    src = data_dir / "tiny-qwen3"
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    tensors = {k: v.astype(np_dtype) for k, v in load_file(src / "model.safetensors").items()}
    if dtype == "float16":
        save_file(tensors, tmp_path / "model.safetensors")
    else:  # safetensors.numpy has no bf16: write the raw bytes via the flax backend
        import jax.numpy as jnp_
        from safetensors.flax import save_file as save_flax

        save_flax({k: jnp_.asarray(v) for k, v in tensors.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    cfg, params = load_hf_dir(tmp_path, dtype)
    assert params["layers"][0]["wqkv"].dtype == jnp.dtype(dtype)
    ref = np.load(data_dir / "logits_tiny-qwen3.npz")
    logits = np.asarray(dense_logits(params, cfg, jnp.asarray(ref["prompt_2"])[None])[0])
    scale = np.abs(ref["logits_2"]).max()
    assert np.abs(logits - ref["logits_2"]).max() <= 0.05 * scale


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"use_sliding_window": True, "sliding_window": 128}, "sliding_window"),
    ],
)
def test_unsupported_config_names_the_field(change, field, data_dir):
    raw = json.loads((data_dir / "tiny-qwen2" / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=field):
        from_hf_config(raw)


def test_missing_tensor_and_bad_files(data_dir, tmp_path):
    (tmp_path / "config.json").write_text((data_dir / "tiny-qwen3" / "config.json").read_text())
    tensors = load_file(data_dir / "tiny-qwen3" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_hf_dir(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        load_gguf(bad)
