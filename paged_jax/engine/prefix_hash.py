"""Prefix-cache keys: the hash chain of a sequence's full pages.

Page i of a sequence is keyed by ``h_i = blake2b(h_{i-1} || token ids of page i)``, with
``h_{-1}`` made from the request's ``cache_salt``: two pages share a key only when every token
before them and the salt are the same, so tenants with different salts never share a page.
``engine.kv_cache.KVCacheManager`` keeps each sequence's chain and extends it as pages fill.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable


def _root_hash(cache_salt: str | None) -> bytes:
    return hashlib.blake2b(f"paged_jax/{cache_salt!r}".encode(), digest_size=16).digest()


def chain_hashes(
    token_ids: list[int], page_size: int, cache_salt: str | None, start: Iterable[bytes] = ()
) -> list[bytes]:
    """The hash chain of every full page of ``token_ids``, extending ``start`` (earlier pages)."""
    hashes = list(start)
    extend_chain(hashes, token_ids, page_size, cache_salt, len(token_ids) // page_size)
    return hashes


def extend_chain(
    hashes: list[bytes], token_ids: list[int], page_size: int, cache_salt: str | None, n: int
) -> None:
    """Extend ``hashes`` (the chain of token_ids' first pages) in place to ``n`` pages."""
    parent = hashes[-1] if hashes else _root_hash(cache_salt)
    for i in range(len(hashes), n):
        page = array("q", token_ids[i * page_size : (i + 1) * page_size]).tobytes()
        parent = hashlib.blake2b(parent + page, digest_size=16).digest()
        hashes.append(parent)
