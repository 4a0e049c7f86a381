"""Every public entry point fails clearly, naming the field, before any work is lost: engine
options, configs, model files and sizes, prompts and request fields (the table of cases is
``docs/errors.md``). The batch-level cases (a bad line among good ones) are in test_cli.py and
test_resume.py; the fuzz's own (groups that cannot fit the pool) in test_fuzz_engine.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.config import EngineConfig, load_config
from paged_jax.io import memory
from paged_jax.request import as_params_list, encode_prompt

TINY = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_pages=32,
            warmup=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    llm = LLM("random:tiny", **TINY)
    yield llm
    llm.close()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(page_size=0), "page_size"),
        (dict(num_pages=1), "num_pages"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=7), "max_num_batched_tokens"),  # crashed inside jax
        (dict(max_num_batched_tokens=1), "max_num_batched_tokens"),
        (dict(page_size="16"), "page_size"),  # a kwarg of the wrong type
        (dict(warmup="yes"), "warmup"),
        (dict(seed=2**32), "seed"),
        (dict(kv_memory_fraction=0), "kv_memory_fraction"),
    ],
)
def test_engine_options_that_cannot_work(options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**options)


def test_smallest_budget_accepted():
    assert EngineConfig(max_num_batched_tokens=8).max_num_batched_tokens == 8


def test_yaml_key_set_twice_names_the_file(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("page_size: 8\nmax_num_seqs: 2\npage_size: 16\n")
    with pytest.raises(ValueError, match=r"engine\.yaml: key 'page_size' is set twice \(line 3\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_model_len=4096), "max_position_embeddings=2048"),  # above the model's limit
        (dict(max_model_len=64, page_size=16, num_pages=4), "num_pages=4 leaves 3 usable"),
        (dict(max_model_len=64, num_pages=None, kv_cpu_bytes=1000), "kv_cpu_bytes=1000"),
    ],
)
def test_pools_and_lengths_the_model_cannot_hold(options, message):
    with pytest.raises(ValueError, match=message) as e:
        LLM("random:tiny", **{**TINY, **options})
    assert "num_pages=0" not in str(e.value)  # a key the user never set


def test_model_too_large_for_the_accelerator_names_both_sizes(monkeypatch):
    monkeypatch.setattr(memory, "free_device_bytes", lambda: 2 * 2**30)
    with pytest.raises(ValueError, match=r"needs 12\.55 GiB .* more than the 2\.00 GiB free"):
        LLM("random:llama2-7b", dtype="bfloat16", **TINY)


def test_missing_model_path(tmp_path):
    with pytest.raises(ValueError, match="neither a bundled alias"):
        LLM(str(tmp_path / "nope"), **TINY)


@pytest.fixture
def checkpoint(tmp_path, data_dir):
    """A copy of the 3-shard tiny llama checkpoint, to break."""
    shutil.copytree(data_dir / "tiny-llama3", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_sharded_checkpoint_with_a_missing_shard(checkpoint):
    (checkpoint / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors"):
        LLM(str(checkpoint), **TINY)


@pytest.mark.parametrize("keep", [4, 1000])  # inside the header, inside the data
def test_truncated_safetensors_shard_names_the_file(checkpoint, keep):
    shard = checkpoint / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"model-00003-of-00003\.safetensors"):
        LLM(str(checkpoint), **TINY)


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf at all"])
def test_corrupt_gguf(tmp_path, content):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"m\.gguf"):
        LLM(str(path), **TINY)


def test_truncated_gguf(tmp_path, smollm2_gguf):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        path.write_bytes(src.read(2**16))  # cut inside the metadata
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        LLM(str(path), **TINY)


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "non-empty"),
        ([1, 512], r"prompt_token_ids\[1\]=512 is not a token id in \[0, 512\)"),
        ([1, -1], r"prompt_token_ids\[1\]=-1 is not a token id"),
        ([1, 2.0], r"prompt_token_ids\[1\]=2.0 must be an int, got float"),
        ([1] * 65, "more than max_model_len=64"),
        (np.array([1, 2]), r"got ndarray .*: use \.tolist\(\)"),
    ],
)
def test_bad_prompts(tiny, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny.check_prompt(prompt)


def test_numpy_token_ids_are_token_ids(tiny):
    assert tiny.check_prompt(list(np.array([1, 2, 3]))) == (None, [1, 2, 3])


def test_stream_of_a_list_of_prompts_says_so(tiny):
    class Tok:  # the message comes before any tokenizer use
        chat_template = None

    with pytest.raises(ValueError, match="list of 2 str: one call takes one prompt"):
        encode_prompt(Tok(), 512, ["a", "b"], "m")


def test_chat_content_null_is_named():
    class Tok:
        chat_template = "{{ messages }}"

    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\]=None must be a str"):
        encode_prompt(Tok(), 512, [{"role": "user", "content": "hi"},
                                   {"role": "user", "content": None}], "m")  # fmt: skip


def test_dict_as_sampling_params_is_named():
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams .* got dict"):
        as_params_list({"temperature": 0}, 1)


def test_bad_request_leaves_the_batch_alone(tiny):
    params = SamplingParams(temperature=0, max_tokens=3, detokenize=False)
    good = tiny.generate([[1, 2, 3]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        tiny.generate([[1, 2, 3], [1, 999]], params, use_tqdm=False)  # all or none queued
    again = tiny.generate([[1, 2, 3]], params, use_tqdm=False)
    assert again[0].outputs[0].token_ids == good[0].outputs[0].token_ids
    assert tiny.kv_cache.num_used_pages == 0


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("n", [0, -1, 1.5, "2", True]),
        ("temperature", [-0.1, float("nan"), float("inf"), "1", None, True]),
        ("top_p", [0, 1.5, -1, "1", None]),
        ("top_k", [0, -2, 1.5, "5", None]),
        ("min_p", [-0.1, 1.1, "0", None]),
        ("seed", [-1, 2**32, 1.0, "1"]),
        ("max_tokens", [0, -1, 1.5, "16", None]),
        ("min_tokens", [-1, 17, 1.5, "0", None]),
        ("stop", [3, [""], [1], {"a": 1}]),
        ("stop_token_ids", [5, [-1], ["5"], [1.5]]),
        ("ignore_eos", [1, "no", None]),
        ("logprobs", [-1, 21, 1.5, "2"]),
        ("prompt_logprobs", [-1, 21, 1.5, "2"]),
        ("skip_special_tokens", [1, None]),
        ("detokenize", [0, "yes", None]),
        ("cache_salt", ["", 5]),
        ("best_of", [2]),
    ],
)
def test_every_sampling_field_out_of_range_or_of_the_wrong_type(field, values):
    for value in values:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})


def test_readme_gin_override_changes_the_stride():
    from pathlib import Path

    from paged_jax.eval.loaders import load_gin

    gin = Path(__file__).parents[1] / "configs/eval/smollm2-135m.gin"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    binding = "declaration_ppl/PerplexityTask.stride=128"
    assert f"--gin-param '{binding}'" in readme
    assert load_gin([gin], [binding]).tasks["declaration_ppl"].stride == 128
    assert load_gin([gin]).tasks["declaration_ppl"].stride == 256


def test_tokenizer_with_ids_beyond_the_vocab():
    from paged_jax.build import _check_model
    from paged_jax.model.presets import preset_config

    class Tok:
        vocab_size = 600

    with pytest.raises(ValueError, match="600 ids, more than the model's vocab_size=512"):
        _check_model(EngineConfig(model="m"), preset_config("tiny"), Tok())
    Tok.vocab_size = 512
    _check_model(EngineConfig(model="m"), preset_config("tiny"), Tok())
