"""The KV page state threaded through the jitted step, and how many pages fit a memory budget.

``KVState`` is a registered dataclass pytree holding one K and one V page array per layer,
each ``[Hkv, num_pages, page_size, Dh]`` (the kernel layout). Per-layer arrays let the step
hand a layer's pages straight to the attention kernel and scatter new K/V into them in place
(the state is donated), with no slicing of a stacked array. Page 0 is NULL_PAGE: padding
tokens write there and nothing live is ever read from it.

``token_pages`` i32[num_pages, page_size] holds the token id of every slot, written by the step
through the same slot mapping as K/V: the penalties of ``runtime.controls`` count a row's
prompt and output tokens from it through the row's page table, so they need no per-step
upload of token histories, stay right inside decode bursts and come with shared pages.

Page tables are not part of the state: the host allocator is their source of truth and each
step uploads the rows it needs (``StepInputs.page_tables``, i32[S, max_pages_per_seq]).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from paged_jax.model.config import ModelConfig

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVState:
    k_pages: tuple[jax.Array, ...]  # L x [Hkv, num_pages, page_size, Dh]
    v_pages: tuple[jax.Array, ...]  # L x [Hkv, num_pages, page_size, Dh]
    token_pages: jax.Array  # i32[num_pages, page_size]  the token id in each slot

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: jnp.dtype,
        *,
        num_kv_heads: int | None = None,
        sharding: jax.sharding.Sharding | None = None,
    ) -> KVState:
        """Zeroed pages; tensor parallel passes the stored kv heads (``tp`` when kv heads are
        replicated) and their sharding (kv heads across the mesh)."""
        shape = (num_kv_heads or cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        replicated = None  # token ids: every device holds all of them
        if sharding is None:  # one device: today's path
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype))  # one buffer per call
        else:
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return cls(
            k_pages=tuple(zeros() for _ in range(cfg.num_layers)),
            v_pages=tuple(zeros() for _ in range(cfg.num_layers)),
            token_pages=jnp.zeros((num_pages, page_size), jnp.int32, device=replicated),
        )

    @property
    def num_pages(self) -> int:
        return self.k_pages[0].shape[1]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k_pages + self.v_pages)


def copy_pages(kv: KVState, src: jax.Array, dst: jax.Array) -> KVState:
    """Copy-on-write: page ``src[i]`` -> ``dst[i]`` in every layer's K and V, all in one
    executable (the state donated, so in place). src, dst: i32[C]; padding pairs are
    (NULL_PAGE, NULL_PAGE). A dst is a freshly allocated page, never another pair's src."""

    def copy(pages: jax.Array) -> jax.Array:  # [Hkv, P, page_size, Dh]
        return pages.at[:, dst].set(pages[:, src])

    tokens = kv.token_pages.at[dst].set(kv.token_pages[src])  # i32[P, page_size]
    return KVState(tuple(map(copy, kv.k_pages)), tuple(map(copy, kv.v_pages)), tokens)


def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """K and V bytes of one page across all layers."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * itemsize


def free_device_bytes(devices: Sequence[jax.Device] | None = None) -> int | None:
    """The smallest free accelerator memory in bytes among ``devices`` (default: the first
    local device), or None where the backend does not report it (CPU)."""
    free = []
    for device in devices or jax.local_devices()[:1]:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free)


def num_pages_for_budget(
    cfg: ModelConfig,
    *,
    page_size: int,
    dtype: jnp.dtype,
    memory_fraction: float,
    cpu_bytes: int,
    devices: Sequence[jax.Device] | None = None,
) -> int:
    """Pages that fit ``memory_fraction`` of free accelerator memory (``cpu_bytes`` on CPU).

    Tensor parallel: ``cfg`` is one shard's config (its kv heads) and the budget is the
    smallest free memory among ``devices``, since every device holds every page's slice."""
    free = free_device_bytes(devices)
    budget = cpu_bytes if free is None else int(free * memory_fraction)
    num_pages = budget // bytes_per_page(cfg, page_size, dtype)
    logger.info("KV budget %.2f GiB -> %d pages of %d tokens", budget / 2**30, num_pages, page_size)
    return int(num_pages)
