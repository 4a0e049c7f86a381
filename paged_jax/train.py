"""The research loop's reusable half: corpus, tokenizer, a tiny Llama trained with flax + optax,
and saving it as an HF-format directory the engine loads like any other checkpoint.

Owns: reading the bundled public-domain text (``paged_jax/data/``) and splitting it into train
and held-out parts; training a SentencePiece tokenizer on the train part; initialising params in
the pytree layout of ``model/llama.py``; the loss, the jitted train step (a flax ``TrainState``
holding an optax AdamW with warmup + cosine decay) and held-out perplexity, all on
``dense_logits``; and ``save_hf_dir``, the inverse of ``io.weights.build_params`` (un-fuse
``wqkv``/``w_gate_up`` and transpose back to HF ``[out, in]``). ``scripts/train_tiny.py`` is the
thin CLI on top.

Text handling: hard line breaks inside a paragraph become spaces and paragraphs are joined by
one ``"\\n"``, which the tokenizer keeps as a piece of its own. The tokenizer adds no dummy
prefix, so encoding the whole text equals encoding each paragraph and joining with ``"\\n"``.
Training rows and evaluation windows are ``[BOS] + text tokens``, matching how the engine
encodes a prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from paged_jax.model.config import ModelConfig
from paged_jax.model.dense import dense_logits
from paged_jax.model.llama import Params

CORPUS_FILE = "alice_in_wonderland.txt"
HELDOUT_MARKER = "CHAPTER XII."  # the last chapter is held out; its first mention is the TOC
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 0  # 0: a tenth of the steps
    weight_decay: float = 0.1
    tie_word_embeddings: bool = True
    seed: int = 0
    log_every: int = 0  # 0: a tenth of the steps


# ---------------------------------------------------------------- corpus and tokenizer


def read_corpus() -> str:
    """The bundled public-domain text, exactly as stored (see ``paged_jax/data/README.md``)."""
    return (importlib.resources.files("paged_jax") / "data" / CORPUS_FILE).read_text("utf-8")


def paragraphs(raw: str) -> list[str]:
    """Non-empty paragraphs of ``raw`` with each one's hard line breaks turned into spaces."""
    paras = (" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", raw))
    return [p for p in paras if p]


def split_corpus(raw: str) -> tuple[list[str], list[str]]:
    """(train paragraphs, held-out paragraphs): the held-out part is the book's last chapter."""
    cut = raw.rfind(HELDOUT_MARKER)
    if cut <= 0:
        raise ValueError(f"corpus has no {HELDOUT_MARKER!r} heading to split at")
    return paragraphs(raw[:cut]), paragraphs(raw[cut:])


def train_tokenizer(train_paragraphs: list[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE model: Llama ids (unk 0, bos 1, eos 2), byte fallback."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(train_paragraphs),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def encode_paragraphs(sp_model: bytes, paras: list[str]) -> np.ndarray:
    """i32[N]: the tokens of the paragraphs joined by newlines (no BOS)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    return np.asarray(sp.encode("\n".join(paras) + "\n"), np.int32)


# ---------------------------------------------------------------- model, loss, train step


def model_config(tc: TrainConfig) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.hidden_size * 8 // 3 // 32 * 32 or 32,
        num_layers=tc.num_layers,
        num_heads=tc.num_heads,
        num_kv_heads=tc.num_kv_heads,
        head_dim=tc.hidden_size // tc.num_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=tc.seq_len,
        tie_word_embeddings=tc.tie_word_embeddings,
        bos_token_id=1,
        eos_token_ids=(2,),
    )


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Normal(0.02) weights, residual-output projections scaled by 1/sqrt(2 L), norms at 1."""
    from flax.linen import initializers

    normal = initializers.normal(0.02)
    residual = initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
    d, f = cfg.hidden_size, cfg.intermediate_size
    keys = iter(jax.random.split(key, 4 * cfg.num_layers + 2))
    layers = [
        {
            "attn_norm": jnp.ones((d,)),
            "wqkv": normal(next(keys), (d, cfg.q_size + 2 * cfg.kv_size)),
            "wo": residual(next(keys), (cfg.q_size, d)),
            "mlp_norm": jnp.ones((d,)),
            "w_gate_up": normal(next(keys), (d, 2 * f)),
            "w_down": residual(next(keys), (f, d)),
        }
        for _ in range(cfg.num_layers)
    ]
    params: Params = {
        "embed": normal(next(keys), (cfg.vocab_size, d)),
        "layers": layers,
        "final_norm": jnp.ones((d,)),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal(next(keys), (d, cfg.vocab_size))
    return params


def loss_fn(params: Params, cfg: ModelConfig, rows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) over rows i32[B, T + 1]."""
    logits = dense_logits(params, cfg, rows[:, :-1])  # [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = tc.warmup_steps or max(1, tc.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1), end_value=tc.learning_rate / 10
    )
    # decay matrices only, not norm gains
    decay_mask = functools.partial(jax.tree_util.tree_map, lambda p: p.ndim >= 2)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask),
    )


def create_state(cfg: ModelConfig, tc: TrainConfig) -> train_state.TrainState:
    params = init_params(cfg, jax.random.PRNGKey(tc.seed))
    apply_fn = functools.partial(dense_logits, cfg=cfg)
    return train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=make_optimizer(tc))


def make_train_step(cfg: ModelConfig):
    """state, rows i32[B, T + 1] -> (state, loss): one jitted AdamW step, state donated."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: train_state.TrainState, rows: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, cfg, rows)
        return state.apply_gradients(grads=grads), loss

    return step


def sample_rows(
    tokens: np.ndarray, bos_id: int, seq_len: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """i32[B, T + 1]: BOS then T tokens from a random offset of the token stream."""
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)
    rows = np.stack([tokens[s : s + seq_len] for s in starts])
    return np.concatenate([np.full((batch_size, 1), bos_id, np.int32), rows], axis=1)


def heldout_nll(
    params: Params, cfg: ModelConfig, tokens: np.ndarray, bos_id: int, window: int
) -> tuple[float, int]:
    """(mean NLL in nats, tokens scored): non-overlapping windows of ``window`` tokens, each
    scored after a BOS, so every token of ``tokens`` is predicted exactly once."""
    forward = jax.jit(lambda p, rows: dense_logits(p, cfg, rows))
    total, count = 0.0, 0
    for start in range(0, len(tokens), window):
        chunk = tokens[start : start + window]
        rows = np.concatenate([[bos_id], chunk]).astype(np.int32)[None]  # [1, n + 1]
        logp = jax.nn.log_softmax(forward(params, rows)[0, :-1], axis=-1)  # [n, V]
        total -= float(jnp.take_along_axis(logp, jnp.asarray(chunk)[:, None], 1).sum())
        count += len(chunk)
    return total / max(count, 1), count


def fit(
    state: train_state.TrainState,
    cfg: ModelConfig,
    tc: TrainConfig,
    tokens: np.ndarray,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[train_state.TrainState, list[float]]:
    """Run ``tc.steps`` steps on random windows of ``tokens`` i32[N]; returns (state, losses).
    ``on_step(step, loss)`` is called after each step (1-based)."""
    step_fn = make_train_step(cfg)
    rng = np.random.default_rng(tc.seed)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 1
    losses = []
    for step in range(1, tc.steps + 1):
        rows = sample_rows(tokens, bos, tc.seq_len, tc.batch_size, rng)
        state, loss = step_fn(state, jnp.asarray(rows))
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return state, losses


# ---------------------------------------------------------------- HF-format directory


def to_hf_tensors(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named f32 tensors (linear weights ``[out, in]``): the inverse of ``build_params``."""

    def linear_t(w: jax.Array, sizes: list[int]) -> list[np.ndarray]:
        # [in, sum(out)] -> HF [out_i, in] pieces
        w = np.asarray(w, np.float32).T
        return [np.ascontiguousarray(x) for x in np.split(w, np.cumsum(sizes)[:-1], axis=0)]

    def vec(x: jax.Array) -> np.ndarray:
        return np.asarray(x, np.float32)

    qkv_sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
    out = {"model.embed_tokens.weight": vec(params["embed"])}
    for i, layer in enumerate(params["layers"]):
        p, attn = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        q, k, v = linear_t(layer["wqkv"], qkv_sizes)
        gate, up = linear_t(layer["w_gate_up"], [cfg.intermediate_size] * 2)
        out |= {
            p + "input_layernorm.weight": vec(layer["attn_norm"]),
            attn + "q_proj.weight": q,
            attn + "k_proj.weight": k,
            attn + "v_proj.weight": v,
            attn + "o_proj.weight": linear_t(layer["wo"], [cfg.hidden_size])[0],
            p + "post_attention_layernorm.weight": vec(layer["mlp_norm"]),
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": linear_t(layer["w_down"], [cfg.hidden_size])[0],
        }
        if cfg.qkv_bias:
            bq, bk, bv = np.split(vec(layer["bqkv"]), np.cumsum(qkv_sizes)[:-1])
            out |= {attn + "q_proj.bias": bq, attn + "k_proj.bias": bk, attn + "v_proj.bias": bv}
        if cfg.o_bias:
            out[attn + "o_proj.bias"] = vec(layer["bo"])
        if cfg.qk_norm:
            out[attn + "q_norm.weight"] = vec(layer["q_norm"])
            out[attn + "k_norm.weight"] = vec(layer["k_norm"])
    out["model.norm.weight"] = vec(params["final_norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = linear_t(params["lm_head"], [cfg.vocab_size])[0]
    return out


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for a plain Llama (no biases, no q/k norm, no rope scaling)."""
    if cfg.arch != "llama" or cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling is not None:
        raise ValueError(f"hf_config writes plain Llama configs only, got {cfg}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": cfg.o_bias,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def save_hf_dir(out_dir: str | Path, cfg: ModelConfig, params: Params, sp_model: bytes) -> Path:
    """Write config.json, model.safetensors, tokenizer.model and tokenizer_config.json."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    save_file(to_hf_tensors(cfg, params), str(out / "model.safetensors"), {"format": "pt"})
    (out / "tokenizer.model").write_bytes(sp_model)
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": cfg.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return out
