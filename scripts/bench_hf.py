"""Baseline for ``scripts/bench_throughput.py``: HF transformers ``generate`` on the same card,
the same model shapes (random bf16 weights, ``LlamaConfig`` from ``paged_jax.model.presets``,
SDPA attention) and the same synthetic workload (``bench_workload.make_workload``, same seed:
by default its first 64 requests), in static left-padded batches.

Each batch decodes greedily for the longest ``max_tokens`` in it (EOS never stops it); only each
request's own ``max_tokens`` count as useful output, the rest is waste. Prints one JSON line
(``useful_output_tokens_per_s`` is the figure to compare with the engine's
``output_tokens_per_s``) and writes ``hf-<model>.json`` / ``.md`` under ``--out``::

    python scripts/bench_hf.py [--model random:llama2-7b] [--num-requests 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

PAD_ID = 0


def make_batches(
    workload: list[tuple[list[int], int]], batch_size: int
) -> list[tuple[list[list[int]], list[list[int]], int, int]]:
    """Consecutive batches, left-padded: (input_ids, attention_mask, max_new_tokens, useful)."""
    batches = []
    for i in range(0, len(workload), batch_size):
        chunk = workload[i : i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = [[PAD_ID] * (width - len(p)) + p for p, _ in chunk]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk]
        batches.append((ids, mask, max(n for _, n in chunk), sum(n for _, n in chunk)))
    return batches


def build_model(preset: str, device: str, dtype: Any, attn_impl: str, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from paged_jax.model.presets import preset_config

    cfg = preset_config(preset.removeprefix("random:"))
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=attn_impl,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise on the device in bf16: no fp32 host copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: run every batch to its length
    model.generation_config.pad_token_id = PAD_ID
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from paged_jax.bench_workload import make_workload, workload_summary
    from paged_jax.model.presets import preset_config

    dtype = getattr(torch, args.dtype)
    cfg = preset_config(args.model.removeprefix("random:"))
    workload = make_workload(
        args.num_requests, args.seed, vocab_size=cfg.vocab_size, max_len=args.max_len
    )
    if args.max_tokens:
        workload = [(p, args.max_tokens) for p, _ in workload]
    model = build_model(args.model, args.device, dtype, args.attn_impl, args.seed)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def generate(ids: list[list[int]], mask: list[list[int]], new: int) -> Any:
        return model.generate(
            input_ids=torch.tensor(ids, device=args.device),
            attention_mask=torch.tensor(mask, device=args.device),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        )

    with torch.inference_mode():
        generate([[1] * 8] * 2, [[1] * 8] * 2, 4)  # warm-up
        sync()
        batch_s, generated, useful = [], 0, 0
        for ids, mask, new, num_useful in make_batches(workload, args.batch_size):
            start = time.perf_counter()
            out = generate(ids, mask, new)
            sync()
            batch_s.append(time.perf_counter() - start)
            generated += (out.shape[1] - len(ids[0])) * len(ids)
            useful += num_useful
    seconds = sum(batch_s)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    return {
        "bench": "hf.generate",
        "tag": args.tag,
        "device": device,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "workload": {
            "source": "synthetic",
            **workload_summary([len(p) for p, _ in workload], [n for _, n in workload]),
        },
        "seconds": seconds,
        "batch_seconds": batch_s,
        "requests_per_s": len(workload) / seconds,
        "useful_output_tokens": useful,
        "generated_tokens": generated,
        "waste_fraction": 1 - useful / generated,
        "useful_output_tokens_per_s": useful / seconds,
        "generated_tokens_per_s": generated / seconds,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        ),
    }


def to_markdown(r: dict[str, Any]) -> str:
    w, a = r["workload"], r["args"]
    return (
        f"### HF transformers generate, {a['model']}, batch {a['batch_size']}\n\n"
        f"{r['device']}, torch {r['torch_version']}, transformers "
        f"{r['transformers_version']}, {r['date']}. {w['num_requests']} requests (seed "
        f"{a['seed']}): prompt mean {w['prompt_len']['mean']:.0f}, output mean "
        f"{w['output_len']['mean']:.0f} tokens; static left-padded batches, {a['attn_impl']}.\n\n"
        "| metric | value |\n| --- | --- |\n"
        f"| useful output tok/s | {r['useful_output_tokens_per_s']:.1f} |\n"
        f"| generated tok/s (incl. waste) | {r['generated_tokens_per_s']:.1f} |\n"
        f"| waste fraction | {r['waste_fraction']:.3f} |\n"
        f"| requests/s | {r['requests_per_s']:.3f} |\n"
        f"| seconds | {r['seconds']:.1f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ["JAX_PLATFORMS"] = "cpu"  # paged_jax imports jax: keep it off torch's GPU
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from paged_jax.bench_workload import MAX_LEN

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama2-7b", help="random:<preset>")
    ap.add_argument("--num-requests", type=int, default=64, help="the workload's first N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=MAX_LEN, help="length clip, as the engine's")
    ap.add_argument("--max-tokens", type=int, default=None, help="fixed max_tokens for all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--attn-impl", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--out", default="out/bench", help="directory for the .json and .md")
    ap.add_argument("--tag", default=None, help="names the output files; default hf-<model>")
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"hf-{args.model.removeprefix('random:')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "batch_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
