"""Train a tiny Llama and its SentencePiece tokenizer on the bundled public-domain text (CPU, under
a minute at the defaults) and save an HF-format directory the engine loads:

    python scripts/train_tiny.py --out out/tiny-llama [--steps N --layers L --hidden D
        --vocab V --seq-len T --batch B --seed S --lr LR --untied --log-every K]

Prints the loss every K steps, then train and held-out loss / perplexity next to the uniform
model's perplexity (= vocab size). Besides the model files, ``heldout.txt`` in the output
directory holds the held-out text (the book's last chapter) for perplexity evals.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax

from paged_jax import train

DEFAULT_OUT = "out/tiny-llama"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, train.TrainConfig]:
    d = train.TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--layers", type=int, default=d.num_layers)
    ap.add_argument("--hidden", type=int, default=d.hidden_size)
    ap.add_argument("--heads", type=int, default=d.num_heads)
    ap.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    ap.add_argument("--vocab", type=int, default=d.vocab_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.learning_rate)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
    ap.add_argument("--log-every", type=int, default=0, help="default: a tenth of the steps")
    args = ap.parse_args(argv)
    tc = train.TrainConfig(
        steps=args.steps,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        batch_size=args.batch,
        learning_rate=args.lr,
        tie_word_embeddings=not args.untied,
        seed=args.seed,
        log_every=args.log_every,
    )
    return args, tc


def main(argv: list[str] | None = None) -> int:
    args, tc = parse_args(argv)
    start = time.perf_counter()
    train_paras, heldout_paras = train.split_corpus(train.read_corpus())
    sp_model = train.train_tokenizer(train_paras, tc.vocab_size)
    train_ids = train.encode_paragraphs(sp_model, train_paras)  # i32[N]
    heldout_ids = train.encode_paragraphs(sp_model, heldout_paras)
    cfg = train.model_config(tc)
    state = train.create_state(cfg, tc)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    print(
        f"corpus: {len(train_ids)} train / {len(heldout_ids)} held-out tokens, vocab "
        f"{tc.vocab_size}; model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{num_params / 1e6:.2f}M params; tokenizer {time.perf_counter() - start:.1f}s"
    )
    log_every = tc.log_every or max(1, tc.steps // 10)
    train_start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if step % log_every == 0 or step == tc.steps:
            print(f"step {step:5d}  loss {loss:.4f}  {time.perf_counter() - train_start:6.1f}s")

    state, _ = train.fit(state, cfg, tc, train_ids, log)
    train_seconds = time.perf_counter() - train_start
    tokens_seen = tc.steps * tc.batch_size * tc.seq_len
    print(
        f"trained {tc.steps} steps in {train_seconds:.1f}s "
        f"({tokens_seen / train_seconds:,.0f} tok/s)"
    )
    out = train.save_hf_dir(args.out, cfg, state.params, sp_model)
    (out / "heldout.txt").write_text("\n".join(heldout_paras) + "\n", encoding="utf-8")
    # score the same number of train tokens as held-out ones, from the start of the book
    sample = train_ids[: len(heldout_ids)]
    for name, ids in (("train", sample), ("held-out", heldout_ids)):
        nll, count = train.heldout_nll(state.params, cfg, ids, cfg.bos_token_id, tc.seq_len)
        print(f"{name:8s} loss {nll:.4f}  perplexity {math.exp(nll):8.2f}  ({count} tokens)")
    print(f"uniform  perplexity {float(tc.vocab_size):8.2f}")
    print(f"saved {out}  (total {time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
