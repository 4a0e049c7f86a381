"""The research loop at reduced size: train a tokenizer and a tiny Llama on the bundled text, save
an HF directory, and check it reloads exactly, beats the uniform model's perplexity by a wide
margin on held-out text, and generates through the paged engine."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax import train
from paged_jax.io.tokenizer import SentencePieceBackend, load_tokenizer
from paged_jax.io.weights import load_hf_dir
from paged_jax.model.dense import dense_logits

SMALL = train.TrainConfig(
    steps=150, num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, vocab_size=512,
    seq_len=64, batch_size=16, learning_rate=5e-3, seed=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, config, in-memory params, held-out token ids i32[N])."""
    train_paras, heldout_paras = train.split_corpus(train.read_corpus())
    sp_model = train.train_tokenizer(train_paras, SMALL.vocab_size)
    train_ids = train.encode_paragraphs(sp_model, train_paras)
    heldout_ids = train.encode_paragraphs(sp_model, heldout_paras)
    cfg = train.model_config(SMALL)
    state = train.create_state(cfg, SMALL)
    state, losses = train.fit(state, cfg, SMALL, train_ids)
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    out = train.save_hf_dir(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", cfg, state.params, sp_model
    )
    return out, cfg, state.params, heldout_ids, heldout_paras


def heldout_perplexity(params, cfg, ids: np.ndarray, bos: int) -> float:
    # non-overlapping windows of seq_len tokens, each scored after a BOS
    window = SMALL.seq_len
    n = len(ids) // window
    chunks = ids[: n * window].reshape(n, window)  # [N, W]
    rows = np.concatenate([np.full((n, 1), bos, np.int32), chunks], axis=1)  # [N, W + 1]
    logits = dense_logits(params, cfg, jnp.asarray(rows[:, :-1]))  # [N, W, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(chunks)[..., None], axis=-1).mean()
    return float(jnp.exp(nll))


def test_saved_dir_reloads_with_identical_logits(trained):
    out, cfg, params, heldout_ids, _ = trained
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["tie_word_embeddings"] is True
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (1, 2)
    cfg2, params2 = load_hf_dir(out, "float32")
    assert cfg2 == cfg
    ids = jnp.asarray(heldout_ids[: 2 * SMALL.seq_len].reshape(2, -1))
    np.testing.assert_allclose(
        dense_logits(params2, cfg2, ids), dense_logits(params, cfg, ids), rtol=0, atol=1e-6
    )


def test_tokenizer_loads_and_matches_training_encoding(trained):
    out, cfg, _, heldout_ids, heldout_paras = trained
    tok = load_tokenizer(out)
    assert isinstance(tok.backend, SentencePieceBackend)
    assert tok.vocab_size == cfg.vocab_size
    assert (tok.bos_token_id, tok.add_bos) == (1, True)
    assert 2 in tok.eos_token_ids
    text = "\n".join(heldout_paras) + "\n"
    assert tok.encode(text, add_bos=False) == heldout_ids.tolist()
    assert tok.decode(heldout_ids.tolist()) == text


def test_heldout_perplexity_beats_uniform_by_a_wide_margin(trained):
    out, _, _, heldout_ids, _ = trained
    cfg, params = load_hf_dir(out, "float32")
    ppl = heldout_perplexity(params, cfg, heldout_ids, bos=1)
    assert ppl < 0.25 * cfg.vocab_size, f"held-out perplexity {ppl:.1f}"


def test_engine_generates_from_the_saved_dir(trained):
    from paged_jax import LLM, SamplingParams

    out, cfg, params, _, _ = trained
    llm = LLM(model=str(out), max_model_len=SMALL.seq_len, num_pages=16, page_size=8,
              max_num_seqs=8, max_num_batched_tokens=64, warmup=False)  # fmt: skip
    prompt = "Alice was beginning to get very tired"
    result = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    completion = result[0].outputs[0]
    assert len(completion.token_ids) > 0
    # greedy through the paged engine = teacher-forced argmax of the dense path
    prompt_ids = llm.tokenizer.encode(prompt)
    full = jnp.asarray([prompt_ids + list(completion.token_ids)])
    expected = jnp.argmax(dense_logits(params, cfg, full)[0, len(prompt_ids) - 1 : -1], axis=-1)
    assert list(completion.token_ids) == expected.tolist()


def test_untied_round_trip(tmp_path):
    tc = train.TrainConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                           vocab_size=400, tie_word_embeddings=False)  # fmt: skip
    cfg = train.model_config(tc)
    params = train.init_params(cfg, jax.random.PRNGKey(1))
    sp_model = train.train_tokenizer(train.split_corpus(train.read_corpus())[0][:200], 400)
    out = train.save_hf_dir(tmp_path / "untied", cfg, params, sp_model)
    cfg2, params2 = load_hf_dir(out, "float32")
    assert cfg2 == cfg and "lm_head" in params2
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_writes_a_model_dir_and_reports_perplexity(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--out", str(tmp_path / "m"), "--steps", "4", "--layers", "1", "--hidden", "32",
            "--heads", "2", "--kv-heads", "1", "--vocab", "400", "--seq-len", "32", "--batch", "4",
            "--log-every", "2"]  # fmt: skip
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "step     2" in printed and "held-out loss" in printed
    assert "uniform  perplexity   400.00" in printed
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "heldout.txt").is_file()
