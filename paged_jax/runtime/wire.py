"""A step's host inputs sent to the device as one buffer.

``pack`` makes 19 small arrays per step (``runtime.pack.StepInputs``). Sent one by one, each is
its own host-to-device transfer, and on a small model their dispatch is a large share of the
step. ``to_wire`` lays them one after the other in one i32 buffer, each 256-byte aligned (f32
and u32 bit for bit, bool as 0 / 1); ``from_wire``, inside a tiny executable per bucket, cuts
it back into the same arrays on the device. With async scheduling the same executable also
feeds each placeholder token from the step in flight's samples (``runtime.feed``, in place of
its own executable), so a fed step costs one transfer and as many executable calls as before;
an unfed step costs one call more. With ``fold_inputs`` the step executable itself unpacks
(``runtime.folded``).

With ``pinned_inputs`` (the default on GPU) the buffer is put in pinned host memory and the
unpack executable copies it to the device (``from_wire``'s ``device``): a call whose input was
just put in device memory waits on the host for the work queued before it, while a pinned
buffer lets the host go on (``scripts/probe_wire.py``).

A ``Layout`` is the static (name, shape, dtype) list of a bucket's inputs, in ``pack``'s order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.runtime.feed import feed

Layout = tuple[tuple[str, tuple[int, ...], str], ...]

_WIRE_DTYPES = ("int32", "uint32", "float32", "bool")


def layout_of(arrays: dict[str, Any]) -> Layout:
    """The layout of host arrays or ``jax.ShapeDtypeStruct``s, in their order."""
    out = []
    for name, a in arrays.items():
        dtype = np.dtype(a.dtype).name
        if dtype not in _WIRE_DTYPES:
            raise TypeError(f"step input {name!r} is {dtype}; the wire carries {_WIRE_DTYPES}")
        out.append((name, tuple(a.shape), dtype))
    return tuple(out)


# Each array starts a multiple of this many i32 (256 bytes) into the buffer. An executable that
# unpacks its own inputs (runtime.folded) may hand a kernel a slice of the buffer as it is, and
# Mosaic GPU kernels require 256-byte aligned operands.
ALIGN = 64


def _padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def wire_size(layout: Layout) -> int:
    return sum(_padded(int(np.prod(shape, dtype=np.int64))) for _, shape, _ in layout)


def to_wire(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Host arrays -> i32[N], in dict order, each from a multiple of ``ALIGN`` (zeros between;
    f32 / u32 reinterpreted, bool 0 / 1)."""
    parts = [np.ascontiguousarray(a).reshape(-1) for a in arrays.values()]
    flat = np.zeros(sum(_padded(a.size) for a in parts), np.int32)
    offset = 0
    for a in parts:
        flat[offset : offset + a.size] = a if a.dtype == np.bool_ else a.view(np.int32)
        offset += _padded(a.size)
    return flat


def from_wire(
    flat: jax.Array, layout: Layout, device: jax.sharding.Sharding | None = None
) -> dict[str, jax.Array]:
    """i32[N] -> the arrays of ``layout``, with their shapes and dtypes (on the device).
    ``device``: first move ``flat`` there (it was sent to host memory the device reads)."""
    if device is not None:
        flat = jax.device_put(flat, device)
    out, offset = {}, 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        part = flat[offset : offset + size].reshape(shape)
        offset += _padded(size)
        if dtype == "bool":
            part = part != 0
        elif dtype != "int32":
            part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
        out[name] = part
    return out


def unpack_feed(
    flat: jax.Array,
    previous: jax.Array,
    *,
    layout: Layout,
    device: jax.sharding.Sharding | None = None,
) -> dict[str, jax.Array]:
    """``unpack`` of a layout that ends in ``source_rows`` i32[T]: each token with a source row
    >= 0 becomes that row's sample in ``previous`` i32[S_max] (``feed.widen``'s)."""
    inputs = from_wire(flat, layout, device)
    rows = inputs.pop("source_rows")
    inputs["token_ids"] = feed(inputs["token_ids"], rows, previous)
    return inputs
