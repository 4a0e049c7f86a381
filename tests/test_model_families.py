"""The model registry and per-layer attention specs: family lookup, clear rejections, specs that
reach the kernel, a sliding-window Mistral against HF (fixture), and tiny random Gemma 3 / Mistral
through the paged engine against the dense reference (windows smaller than a page and spanning
pages, chunked prefill, preemption, page sizes 8/16/32)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.io.weights import load_hf_dir
from paged_jax.model import registry
from paged_jax.model.config import FULL, SLIDING, ModelConfig, from_hf_config
from paged_jax.model.dense import dense_logits
from paged_jax.model.presets import PRESETS, init_random_params

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, detokenize=False)


def test_registry_maps_types_and_archs_to_families():
    assert registry.family_for_hf("qwen3").name == "llama"
    assert registry.family_for_hf("mistral").name == "llama"
    assert registry.family_for_hf("gemma3_text").name == "gemma3"
    assert registry.family_for_gguf("gemma3").name == "gemma3"
    assert registry.family_for_gguf("qwen2").name == "llama"
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*gemma3_text"):
        registry.family_for_hf("gpt2")
    with pytest.raises(ValueError, match="general.architecture='phi3'"):
        registry.family_for_gguf("phi3")
    for name, cfg in PRESETS.items():  # every preset belongs to the family that lists it
        assert name in registry.family_of(cfg).presets


def test_gemma3_specs_alternate_local_and_global():
    cfg = PRESETS["gemma3-270m"]
    specs = cfg.attention_specs()
    assert [cfg.layer_type(i) for i in range(6)] == [SLIDING] * 5 + [FULL]
    local, full = specs[0], specs[5]
    assert (local.sliding_window, local.rope_theta) == (512, 10000.0)
    assert (full.sliding_window, full.rope_theta) == (None, 1e6)
    assert local.sm_scale == full.sm_scale == 256**-0.5
    # Llama: one spec for all layers, no window, 1/sqrt(head_dim)
    tiny = PRESETS["tiny"].attention_specs()
    assert len(set(tiny)) == 1 and tiny[0].sliding_window is None and tiny[0].sm_scale == 0.25


def test_gemma3_hf_config_both_rope_key_styles():
    base = dict(
        model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
    )  # fmt: skip
    old = from_hf_config({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                          "rope_scaling": {"rope_type": "linear", "factor": 8.0}})  # fmt: skip
    new = from_hf_config(
        {
            **base,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    assert old == new
    assert old.layer_types == (SLIDING,) * 5 + (FULL, SLIDING)
    specs = old.attention_specs()
    assert specs[0].rope_scaling is None and specs[5].rope_scaling.factor == 8.0
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        from_hf_config({**base, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="hidden_activation"):
        from_hf_config({**base, "hidden_activation": "relu"})


def test_config_rejects_inconsistent_layer_types():
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(cfg, layer_types=(SLIDING,))
    with pytest.raises(ValueError, match="sliding_window is None"):
        dataclasses.replace(cfg, layer_types=(SLIDING, FULL))
    with pytest.raises(ValueError, match="use_sliding_window"):
        from_hf_config(
            {
                "model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "use_sliding_window": True,
                "sliding_window": 4,
            }
        )  # fmt: skip


def test_tiny_mistral_sliding_window_matches_hf(data_dir):
    cfg, params = load_hf_dir(data_dir / "tiny-mistral", "float32")
    assert cfg.sliding_window == 8 and cfg.attention_specs()[1].sliding_window == 8
    meta = json.loads((data_dir / "tiny-mistral.json").read_text())
    assert meta["sliding_window"] == 8
    ref = np.load(data_dir / "logits_tiny-mistral.npz")
    for i in range(2):
        # one teacher-forced forward over prompt + HF's greedy tokens checks logits and greedy
        prompt, greedy = ref[f"prompt_{i}"].tolist(), ref[f"greedy_{i}"].tolist()
        logits = np.asarray(dense_logits(params, cfg, jnp.asarray([prompt + greedy]))[0])
        n = len(prompt)
        assert np.abs(logits[:n] - ref[f"logits_{i}"]).max() <= 1e-3
        assert logits[n - 1 : -1].argmax(-1).tolist() == greedy
    # without the window the long prompt's logits differ: the fixture exercises it
    no_window = dataclasses.replace(cfg, sliding_window=None)
    logits = np.asarray(dense_logits(params, no_window, jnp.asarray(ref["prompt_1"])[None])[0])
    assert np.abs(logits - ref["logits_1"]).max() > 1e-2


def _dense_greedy(params, cfg: ModelConfig, prompt: list[int], n: int) -> list[int]:
    # Causal: tokens after a position never change its logits, so one padded length (one
    # compile) serves every step.
    ids = np.zeros((1, 64), np.int32)
    ids[0, : len(prompt)] = prompt
    logits_fn = jax.jit(lambda x: dense_logits(params, cfg, x))
    for t in range(len(prompt), len(prompt) + n):
        ids[0, t] = int(jnp.argmax(logits_fn(jnp.asarray(ids))[0, t - 1]))
    return ids[0, len(prompt) : len(prompt) + n].tolist()


PROMPTS = [[5, 6, 7], list(range(1, 45)), [9, 3] * 13, list(range(100, 131))]


@pytest.fixture(scope="module")
def tiny_gemma3():
    """The tiny Gemma 3 preset (window 16, 2:1 local/global, soft caps) and dense greedy refs."""
    cfg = PRESETS["tiny-gemma3"]
    params = init_random_params(cfg, jnp.float32, seed=0)
    params = _perturb_norms(params)
    return cfg, params, [_dense_greedy(params, cfg, p, GREEDY.max_tokens) for p in PROMPTS]


def _perturb_norms(params):
    """Non-zero Gemma norm weights, so that (1 + w) is exercised (random init leaves them 0)."""
    rng = np.random.default_rng(0)
    out = dict(params, final_norm=jnp.asarray(rng.uniform(-0.5, 0.5, params["final_norm"].shape)))
    out["layers"] = [
        {k: jnp.asarray(rng.uniform(-0.5, 0.5, v.shape), v.dtype) if k.endswith("norm") else v
         for k, v in layer.items()}
        for layer in params["layers"]
    ]  # fmt: skip
    return out


@pytest.mark.parametrize(
    "opts",
    [
        dict(page_size=8, num_pages=64),  # window 16 spans two pages
        dict(page_size=32, num_pages=16),  # window smaller than a page
        dict(page_size=16, num_pages=64, max_num_batched_tokens=16),  # chunks cross the edge
        dict(page_size=8, num_pages=12),  # 11 usable pages for ~4 x 6 needed: preempts
    ],
    ids=["ps8", "ps32", "chunk16", "preempt"],
)
def test_tiny_gemma3_paged_equals_dense(tiny_gemma3, opts, monkeypatch):
    cfg, params, expected = tiny_gemma3
    import paged_jax.build as build
    from paged_jax.io.loader import LoadedModel

    monkeypatch.setattr(
        build, "load_model", lambda *a, **k: LoadedModel(cfg, params, None, None, 0)
    )
    llm = LLM(
        "random:tiny-gemma3", max_model_len=64, max_num_seqs=4, warmup=False,
        **{"max_num_batched_tokens": 32, **opts},
    )  # fmt: skip
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    if opts["num_pages"] == 12:
        assert llm.stats()["preemptions"] > 0


def test_each_layers_spec_reaches_its_kernel_call(monkeypatch):
    """Trace the paged step of the tiny Gemma 3 and record what each attention call got."""
    import jax

    import paged_jax.runtime.step as step_module
    from paged_jax.runtime.buckets import Buckets
    from paged_jax.runtime.runner import ModelRunner

    cfg = PRESETS["tiny-gemma3"]
    runner = ModelRunner(
        cfg, init_random_params(cfg, jnp.float32), num_pages=16, page_size=16,
        max_pages_per_seq=4, buckets=Buckets.create(32, 8), kv_dtype=jnp.float32,
        attn_impl="reference",
    )  # fmt: skip
    calls = []
    real = step_module.ragged_paged_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["sm_scale"], kwargs["sliding_window"], kwargs["soft_cap"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "ragged_paged_attention", spy)
    step = step_module.make_step(cfg, attn_impl="reference")
    jax.eval_shape(step, runner.params, runner.kv, runner._inputs_spec(32, 8))
    want = [(s.sm_scale, s.sliding_window, s.soft_cap) for s in cfg.attention_specs()]
    assert calls == want
    assert want[0] == (0.25, 16, 50.0) and want[2] == (0.25, None, 50.0)  # local, global
