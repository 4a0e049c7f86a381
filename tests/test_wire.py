"""runtime.wire: a bucket's step inputs through one i32 buffer come back bit for bit, and the
feeding variant puts the step in flight's samples at the fed tokens only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from paged_jax.runtime.wire import ALIGN, from_wire, layout_of, to_wire, unpack_feed, wire_size


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(0, 1000, 8).astype(np.int32),
        "page_tables": rng.integers(-5, 50, (3, 4)).astype(np.int32),
        "temperature": np.array([0.0, -0.0, np.nan, 1e-38, np.inf, 0.7], np.float32),
        "seeds": np.array([0, 1, 2**31, 2**32 - 1], np.uint32),
        "do_sample": np.array([True, False, True]),
        "num_seqs": np.array([3], np.int32),
    }


def test_round_trip_is_bit_exact():
    host = _arrays()
    layout = layout_of(host)
    flat = to_wire(host)
    # each of the 6 arrays (34 values) starts 256 bytes after the last (Mosaic GPU's alignment)
    assert flat.dtype == np.int32 and flat.shape == (wire_size(layout),) == (6 * ALIGN,) == (384,)
    assert flat[ALIGN : ALIGN + 12].tolist() == host["page_tables"].reshape(-1).tolist()
    assert not flat[8:ALIGN].any()
    back = jax.jit(lambda f: from_wire(f, layout))(flat)
    assert sorted(back) == sorted(host)
    for name, a in host.items():
        b = np.asarray(back[name])
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert b.tobytes() == a.tobytes(), name  # NaN, -0.0 and large u32 included


def test_unpack_feed_replaces_only_fed_tokens():
    host = _arrays()
    host["source_rows"] = np.array([-1, 2, -1, -1, 0, -1, -1, 1], np.int32)
    previous = np.array([70, 71, 72, 0, 0], np.int32)  # widen's i32[S_max]
    out = unpack_feed(to_wire(host), previous, layout=layout_of(host))
    expected = host["token_ids"].copy()
    expected[[1, 4, 7]] = [72, 70, 71]
    assert np.asarray(out["token_ids"]).tolist() == expected.tolist()
    assert "source_rows" not in out


def test_rejects_an_input_the_wire_cannot_carry():
    with pytest.raises(TypeError, match="'positions' is int64"):
        layout_of({"positions": np.zeros(4, np.int64)})
