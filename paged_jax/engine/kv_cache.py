"""KVCacheManager: the one owner of KV pages on the host.

It alone knows ``page_size``, the free list, each page's reference count, every sequence's page
table and the prefix-hash index. The scheduler and burst planning ask it (``can_allocate`` /
``allocate`` at admission, ``can_append`` / ``append`` while running, ``free`` at preemption
and finish, ``fork`` to share) and never touch page ids or divide by ``page_size`` themselves.

Page 0 is ``NULL_PAGE``: never handed out. Padding tokens write their K/V there and padding rows
of page tables point there, so it always holds garbage that no live sequence reads.

Prefix caching: a full page whose K/V has been computed is keyed by its hash chain
(``engine.prefix_hash``: salted by the request's ``cache_salt``, so different salts never
share a page). A page whose count drops to 0 keeps its
key and waits in an LRU queue (a sequence's tail pages first) until an allocation with no
never-cached page left evicts it. Admission reuses the longest chain of cached pages of the
sequence's known tokens, but always leaves at least one token to compute (the step needs its
logits), so a fully cached prompt recomputes its last page. Pages are keyed only once their
K/V is written (``commit`` after the step), so a page never serves a hit before its step ran.

Copy-on-write: a sequence that must write into its last, partly filled page while another
sequence shares it (count > 1) gets a private copy first; ``append`` queues the (src, dst)
pair and ``take_copies`` hands a step's pairs to the plan.
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict, deque

from paged_jax.engine.prefix_hash import extend_chain
from paged_jax.engine.sequence import Sequence, cdiv

logger = logging.getLogger(__name__)

NULL_PAGE = 0


class KVCacheManager:
    """Pages 1..num_pages-1, their counts, the sequences' page tables and the prefix cache."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"{num_pages=} must be an int >= 2 (page 0 is NULL_PAGE)")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"{page_size=} must be an int >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        self._filled = [0] * num_pages  # tokens with K/V in each used page
        self._num_filled_tokens = 0  # over pages with count > 0
        self._free: deque[int] = deque(range(NULL_PAGE + 1, num_pages))  # count 0, no key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # count 0, keyed; LRU first
        self._page_hash: list[bytes | None] = [None] * num_pages
        self._index: dict[bytes, int] = {}  # hash -> page holding that chain's K/V
        self._tables: dict[int, array] = {}  # seq_id -> page ids, i32
        self._hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full known pages
        self._num_committed: dict[int, int] = {}  # seq_id -> tokens whose K/V commit has seen
        self._copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) pending a step
        self._num_table_pages = 0  # sum of the page tables' lengths
        self.num_queries = 0  # tokens of admitted sequences looked up in the cache
        self.num_hits = 0  # of those, tokens found cached
        self.num_evictions = 0

    # ------------------------------------------------------------------ counts

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: never-cached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages with a prefix key (in use or evictable)."""
        return len(self._index)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - self.num_free_pages

    @property
    def num_table_pages(self) -> int:
        """Pages the sequences would hold with no sharing (the sum of their tables' lengths);
        ``1 - num_used_pages / num_table_pages`` is the memory sharing saves."""
        return self._num_table_pages

    @property
    def num_filled_tokens(self) -> int:
        """Tokens whose K/V is held by pages in use (a shared page counts once)."""
        return self._num_filled_tokens

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def page_table(self, seq: Sequence) -> tuple[int, ...]:
        return tuple(self._tables.get(seq.seq_id, ()))

    def page_row(self, seq: Sequence) -> array:
        """A snapshot of the sequence's page table as i32 ``array("i")`` (what a plan carries:
        ``runtime.pack`` joins the rows' buffers without touching each int)."""
        table = self._tables.get(seq.seq_id)
        return table[:] if table is not None else array("i")

    def num_pages_of(self, seq: Sequence) -> int:
        return len(self._tables.get(seq.seq_id, ()))

    def pages_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.page_size)

    def capacity(self, num_pages: int) -> int:
        """Tokens that ``num_pages`` pages hold."""
        return num_pages * self.page_size

    # ------------------------------------------------------------------ admission

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding the longest prefix of ``seq``'s known tokens, leaving at least
        one token to compute and not passing its ``prefill_limit``. Empty when caching is off
        or the request scores its prompt."""
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        num_pages = (seq.num_tokens - 1) // self.page_size
        if seq.prefill_limit is not None:  # a group's leader stops there, then forks
            num_pages = min(num_pages, seq.prefill_limit // self.page_size)
        hashes = self._seq_hashes(seq, num_pages)
        hit = []
        for h in hashes:
            page = self._index.get(h)
            if page is None:
                break
            hit.append(page)
        return hit

    def num_admissible_tokens(self, hit_pages: list[int], num_spare_pages: int = 0) -> int:
        """Tokens past the hit that a new sequence can get pages for, keeping
        ``num_spare_pages`` free."""
        num_free = self.num_free_pages - self._num_evictable_in(hit_pages) - num_spare_pages
        return self.capacity(max(0, num_free))

    def can_allocate(self, hit_pages: list[int], num_tokens: int) -> bool:
        """Whether a sequence can hold ``num_tokens`` tokens from the hit onwards."""
        num_new = self.pages_for(num_tokens) - len(hit_pages)
        return num_new + self._num_evictable_in(hit_pages) <= self.num_free_pages

    def allocate(self, seq: Sequence, hit_pages: list[int], num_tokens: int) -> int:
        """Give a waiting sequence its page table: the hit pages (shared), then new pages up to
        ``num_tokens`` tokens. Returns the tokens whose K/V the hit already holds."""
        if seq.seq_id in self._tables:
            raise ValueError(f"{seq!r} already holds pages")
        if not self.can_allocate(hit_pages, num_tokens):
            raise RuntimeError("cannot allocate: callers must check can_allocate first")
        for page in hit_pages:
            self._take(page)
        table = array("i", hit_pages)  # i32 page ids: ``page_row`` snapshots copy it whole
        table.extend(self._new_pages(self.pages_for(num_tokens) - len(hit_pages)))
        self._tables[seq.seq_id] = table
        self._num_table_pages += len(table)
        num_hit_tokens = self.capacity(len(hit_pages))
        self._num_committed[seq.seq_id] = num_hit_tokens
        if self.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None:
            self.num_queries += seq.num_tokens
            self.num_hits += num_hit_tokens
        return num_hit_tokens

    # ------------------------------------------------------------------ running

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """More tokens (past the computed ones) that fit in the sequence's pages plus every
        free page, after any copy-on-write its next write needs."""
        table = self._tables[seq.seq_id]
        num_free = self.num_free_pages - len(self._shared_tail(seq, table))
        if num_free < 0:
            return 0
        return self.capacity(len(table) + num_free) - seq.num_computed_tokens

    def num_pages_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        """Pages ``append(seq, num_new_tokens)`` would take (a copy-on-write included)."""
        table = self._tables[seq.seq_id]
        need = self.pages_for(seq.num_computed_tokens + num_new_tokens) - len(table)
        return max(0, need) + len(self._shared_tail(seq, table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_pages_to_append(seq, num_new_tokens) <= self.num_free_pages

    def append(self, seq: Sequence, num_new_tokens: int) -> array:
        """Grow the page table to hold ``num_new_tokens`` more tokens past the computed ones.
        A shared page the write may touch is first replaced by a private one: a copy of it
        (queued for the step) when it holds computed tokens, else just a fresh page. Returns
        the grown table's snapshot (``page_row``), what the plan carries."""
        table = self._tables[seq.seq_id]
        shared = self._shared_tail(seq, table)
        need = self.pages_for(seq.num_computed_tokens + num_new_tokens) - len(table)
        if max(0, need) + len(shared) > self.num_free_pages:
            raise RuntimeError("cannot append: callers must check can_append first")
        for i in shared:
            src = table[i]
            (dst,) = self._new_pages(1)
            num_ours = seq.num_computed_tokens - self.capacity(i)  # our tokens in it
            if num_ours > 0:
                self._copies.append((src, dst))
                self._set_filled(dst, min(self.page_size, num_ours))
            self._release(src)
            table[i] = dst
        if need > 0:
            table.extend(self._new_pages(need))
            self._num_table_pages += need
        return table[:]

    def take_copies(self) -> tuple[tuple[int, int], ...]:
        """The copy-on-write (src, dst) pairs queued since the last call."""
        copies, self._copies = tuple(self._copies), []
        return copies

    def commit(self, seq: Sequence) -> None:
        """Record that ``seq.num_computed_tokens`` tokens now have K/V (call after each step):
        fill counts, and a prefix key for every newly full page."""
        table = self._tables[seq.seq_id]
        start = self._num_committed[seq.seq_id]
        end = seq.num_computed_tokens
        if end <= start:
            return
        ps = self.page_size
        for i in range(start // ps, cdiv(end, ps)):
            self._set_filled(table[i], min(ps, end - i * ps))
        self._num_committed[seq.seq_id] = end
        if not self.enable_prefix_caching or end // ps == start // ps:
            return
        hashes = self._seq_hashes(seq, end // ps)
        for i in range(start // ps, end // ps):
            page, h = table[i], hashes[i]
            if self._page_hash[page] is None and h not in self._index:
                self._index[h] = page
                self._page_hash[page] = h

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every page of ``parent`` (counts + 1)."""
        if child.seq_id in self._tables:
            raise ValueError(f"{child!r} already holds pages")
        table = self._tables[parent.seq_id]
        for page in table:
            self._ref_counts[page] += 1
        self._tables[child.seq_id] = array("i", table)
        self._num_table_pages += len(table)
        self._num_committed[child.seq_id] = self._num_committed[parent.seq_id]
        if parent.seq_id in self._hashes:
            self._hashes[child.seq_id] = list(self._hashes[parent.seq_id])

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references, tail page first; its keyed pages stay cached."""
        table = self._tables.pop(seq.seq_id, array("i"))
        self._num_table_pages -= len(table)
        if self._copies:  # a copy into a page this sequence no longer holds is moot
            self._copies = [(s, d) for s, d in self._copies if d not in table]
        self._hashes.pop(seq.seq_id, None)
        self._num_committed.pop(seq.seq_id, None)
        for page in reversed(table):
            self._release(page)

    def reset_prefix_cache(self) -> None:
        """Forget every key: evictable pages become free, pages in use lose their key."""
        for page in self._evictable:
            self._free.append(page)
        self._evictable.clear()
        for page in self._index.values():
            self._page_hash[page] = None
        self._index.clear()

    def free_page_ids(self) -> list[int]:
        """Pages no sequence holds: never-cached free ones, then evictable cached ones (whose
        K/V a later hit still reads: poison ``uncached_free_page_ids`` to test stray reads)."""
        return [*self._free, *self._evictable]

    def uncached_free_page_ids(self) -> list[int]:
        """Free pages holding nothing a hit could read: safe to fill with garbage."""
        return list(self._free)

    def check(self) -> None:
        """Assert the invariants (tests): every page free, evictable or owned, exactly once;
        counts equal the tables' references; keys consistent; NULL_PAGE never used."""
        owned = [0] * self.num_pages
        for table in self._tables.values():
            for page in table:
                owned[page] += 1
        assert owned[NULL_PAGE] == 0 and self._ref_counts[NULL_PAGE] == 0
        assert owned == self._ref_counts, "reference counts differ from the page tables"
        assert sum(owned) == self._num_table_pages
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        idle = {p for p in range(1, self.num_pages) if owned[p] == 0}
        assert free | evictable == idle, "a page is neither free, evictable nor owned"
        assert all(self._page_hash[p] is not None for p in evictable)
        assert all(self._page_hash[p] is None for p in free)
        for h, page in self._index.items():
            assert self._page_hash[page] == h
        assert sum(h is not None for h in self._page_hash) == len(self._index)
        assert self._num_filled_tokens == sum(self._filled[p] for p in range(self.num_pages)
                                              if owned[p])  # fmt: skip

    # ------------------------------------------------------------------ internals

    def _seq_hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """The hash chain of the sequence's first ``num_pages`` pages (computed once)."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        if len(hashes) < num_pages:
            salt = seq.sampling_params.cache_salt
            extend_chain(hashes, seq.token_ids, self.page_size, salt, num_pages)
        return hashes if len(hashes) == num_pages else hashes[:num_pages]

    def _shared_tail(self, seq: Sequence, table: array) -> list[int]:
        """Indices of pages the next write may touch (from the first uncomputed token on)
        that another sequence shares: each needs a private page first."""
        first = seq.num_computed_tokens // self.page_size
        counts = self._ref_counts
        if first >= len(table) - 1:  # the usual case: at most the last page
            return [first] if first < len(table) and counts[table[first]] > 1 else []
        return [i for i in range(first, len(table)) if counts[table[i]] > 1]

    def _num_evictable_in(self, hit_pages: list[int]) -> int:
        """Hit pages nobody holds: taking them shrinks the free count."""
        return sum(self._ref_counts[p] == 0 for p in hit_pages)

    def _take(self, page: int) -> None:
        """One more reference to a cached page (a prefix hit)."""
        if self._ref_counts[page] == 0:
            del self._evictable[page]
            self._num_filled_tokens += self._filled[page]
        self._ref_counts[page] += 1

    def _new_pages(self, num_pages: int) -> list[int]:
        pages = []
        for _ in range(num_pages):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._index[self._page_hash[page]]
                self._page_hash[page] = None
                self.num_evictions += 1
            assert page != NULL_PAGE and self._ref_counts[page] == 0
            self._ref_counts[page] = 1
            self._filled[page] = 0
            pages.append(page)
        return pages

    def _release(self, page: int) -> None:
        assert self._ref_counts[page] > 0, f"page {page} freed more often than taken"
        self._ref_counts[page] -= 1
        if self._ref_counts[page] == 0:
            self._num_filled_tokens -= self._filled[page]
            if self._page_hash[page] is not None:
                self._evictable[page] = None
            else:
                self._free.append(page)

    def _set_filled(self, page: int, num_tokens: int) -> None:
        self._num_filled_tokens += num_tokens - self._filled[page]
        self._filled[page] = num_tokens
