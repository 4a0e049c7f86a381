"""What a long-context request holds in KV memory for a model with sliding-window layers, and
what a hybrid KV manager (vLLM's: per layer group, pages that no layer can see any more freed)
would hold instead.

The engine keeps one page table per sequence for all layers (``engine/kv_cache.py``), so every
layer, local or global, holds every token's K/V: ``ceil(n / page_size)`` pages of
``runtime.state.bytes_per_page`` bytes. A hybrid manager would keep all pages for the global
layers but only the pages that hold the last ``window`` tokens for the local ones (the window
may start mid-page: at most ``ceil((window - 1) / page_size) + 1`` pages). Page counts do not
depend on the device, so this runs anywhere:

    python scripts/kv_memory_sliding.py --model gemma3-270m --dtype bfloat16

Prints one JSON line per context length and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math

import jax.numpy as jnp

from paged_jax.model.config import SLIDING
from paged_jax.model.presets import preset_config
from paged_jax.runtime.state import bytes_per_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="a random:<preset> shape name")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--lengths", default="512,2048,8192,32768")
    args = parser.parse_args()
    cfg = preset_config(args.model)
    dtype = jnp.dtype(args.dtype)
    ps = args.page_size
    page_bytes = bytes_per_page(cfg, ps, dtype)  # all layers
    layer_page_bytes = page_bytes // cfg.num_layers
    local = [i for i in range(cfg.num_layers) if cfg.layer_type(i) == SLIDING]
    num_global = cfg.num_layers - len(local)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        pages = math.ceil(n / ps)
        held = pages * page_bytes
        window_pages = min(pages, math.ceil((cfg.sliding_window - 1) / ps) + 1) if local else 0
        hybrid = (num_global * pages + len(local) * window_pages) * layer_page_bytes
        row = {
            "model": args.model, "dtype": args.dtype, "page_size": ps, "tokens": n,
            "pages": pages, "held_bytes": held, "hybrid_bytes": hybrid,
            "saving": 1 - hybrid / held, "local_layers": len(local), "global_layers": num_global,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    print(
        "\n| tokens | held now (MiB) | hybrid manager (MiB) | saving |\n| --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['tokens']} | {r['held_bytes'] / 2**20:.1f} | {r['hybrid_bytes'] / 2**20:.1f} "
            f"| {r['saving']:.1%} |"
        )


if __name__ == "__main__":
    main()
