"""Step executables that unpack their own inputs (``fold_inputs``, the default on GPU).

Unfolded, a fed step costs the host three executable calls: ``widen`` (the step in flight's
samples to i32[S_max]), ``unpack_feed`` (the wire buffer to the step's arrays, placeholder
tokens fed) and the step. On a GPU each call costs the host its launch and, whenever one of its
buffers moved since the last call, a re-recording of its CUDA graph: a mixed step's three calls
took longer on the host than a small model's step on the device. Folded, the step executable
takes the wire buffer and the previous samples itself and hands back its unpacked inputs for
what follows (token selection, a non-fused burst's ``advance``), so a step is one call. It also
returns its greedy samples already widened (``wide``), and a folded fused burst its last
samples, so that the step fed from them needs no ``widen`` either. An unfed step gets a resident
row of zeros and source rows of -1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paged_jax.runtime.burst import FusedBurst
from paged_jax.runtime.feed import widen
from paged_jax.runtime.wire import Layout, from_wire, layout_of, unpack_feed, wire_size


class Folded(NamedTuple):
    """The kind of an ``ExecutableKey`` whose step unpacks its wire buffer: a step variant
    ("plain" | "prompt" | "decode") or a fused burst."""

    kind: str | FusedBurst


def fold_step(step: Callable, *, layout: Layout, device: Any, width: int) -> Callable:
    """``folded(params, kv, flat, previous) -> (kv, outputs, inputs)``.

    ``step``: ``runtime.step``'s (unjitted); flat i32[N] (``runtime.wire``, ending in
    ``source_rows``); previous i32[width] (the samples that feed this step's placeholders).
    outputs: the step's, plus ``wide`` i32[width] (``greedy`` widened); inputs: the unpacked
    arrays, for the token selection and a burst's next steps.
    """

    def folded(params: Any, kv: Any, flat: jax.Array, previous: jax.Array):
        inputs = unpack_feed(flat, previous, layout=layout, device=device)
        kv, out = step(params, kv, inputs)
        return kv, dict(out, wide=widen(out["greedy"], size=width)), inputs

    return folded


def fold_fused(fused: Callable, *, layout: Layout, device: Any, width: int) -> Callable:
    """``folded(params, kv, flat, previous) -> (kv, tokens, last)`` of ``burst.make_fused``'s
    ``fused``, with last i32[width] (widened)."""

    def folded(params: Any, kv: Any, flat: jax.Array, previous: jax.Array):
        kv, tokens, last = fused(params, kv, unpack_feed(flat, previous, layout=layout,
                                                         device=device))  # fmt: skip
        return kv, tokens, widen(last, size=width)

    return folded


def lower_wired(
    runner: Any, key: Any, inputs: dict[str, jax.ShapeDtypeStruct]
) -> tuple[Any, tuple]:
    """(jitted function, abstract arguments) of an executable that takes a wire buffer: "unpack",
    "unpack_feed", or a ``Folded`` step (``runner``: the ``ModelRunner``; ``inputs``: the
    bucket's step input structs)."""
    num_tokens, num_seqs, kind = key
    feeds = kind != "unpack"
    if feeds:
        inputs = dict(inputs, source_rows=runner._struct((max(num_tokens, num_seqs),), jnp.int32))
    layout = layout_of(inputs)
    flat = jax.ShapeDtypeStruct((wire_size(layout),), jnp.int32, sharding=runner.wire_sharding)
    width = runner.buckets.seq_buckets[-1]
    previous = runner._struct((width,), jnp.int32)
    move = None if runner.wire_memory == "device" else runner._on_device
    if isinstance(kind, Folded):
        opts = dict(layout=layout, device=move, width=width)
        if isinstance(kind.kind, FusedBurst):
            fn = fold_fused(runner._fused_fn(key._replace(kind=kind.kind)), **opts)
        else:
            fn = fold_step(runner._make_step(variant=kind.kind, **runner._step_options), **opts)
        return jax.jit(fn, donate_argnums=(1,)), (runner.params, runner.kv, flat, previous)
    out = move or runner._replicated
    shardings = {} if out is None else {"out_shardings": out}
    unpack = unpack_feed if feeds else from_wire
    fn = jax.jit(functools.partial(unpack, layout=layout, device=move), **shardings)
    return fn, ((flat, previous) if feeds else (flat,))
