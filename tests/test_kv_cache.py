"""KVCacheManager on its own: page accounting, prefix hits, eviction, salts, fork and
copy-on-write; then a hypothesis state machine that drives it the way the scheduler does and
checks, after every rule, that the pages' (modelled) contents are what every holder reads.

The state machine keeps a shadow "device": for every page, what each of its slots holds,
written only when a sequence computes those positions (and copied for a copy-on-write pair).
A slot's content is the identity of the K/V at that position, ``(cache_salt, tokens[:pos+1])``:
so a wrong prefix hit, a copy that is missing or late, a write into a page another sequence
still reads, or a prefix key on the wrong page all show up as a content mismatch.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from paged_jax.engine.kv_cache import NULL_PAGE, KVCacheManager
from paged_jax.engine.prefix_hash import chain_hashes
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.sequence import Sequence, cdiv

_ids = itertools.count()


def make_seq(tokens, **params) -> Sequence:
    params.setdefault("max_tokens", 100)
    return Sequence(f"r{next(_ids)}", tokens, SamplingParams(**params))


def admit(kv: KVCacheManager, seq: Sequence, num_new: int | None = None) -> int:
    """What the scheduler does at admission: hit, allocate, then the step computes
    ``num_new`` tokens (all the rest by default) and commits. Returns the hit tokens."""
    hit = kv.match_prefix(seq)
    num_hit = kv.capacity(len(hit))
    num_new = seq.num_tokens - num_hit if num_new is None else num_new
    assert kv.can_allocate(hit, num_hit + num_new)
    seq.num_computed_tokens = kv.allocate(seq, hit, num_hit + num_new)
    assert seq.num_computed_tokens == num_hit
    compute(kv, seq, num_new)
    return num_hit


def compute(kv: KVCacheManager, seq: Sequence, num_new: int) -> None:
    """One step's pages for ``num_new`` tokens, then their K/V is computed and committed."""
    kv.append(seq, num_new)
    seq.num_computed_tokens += num_new
    kv.commit(seq)


def all_pages(kv: KVCacheManager) -> set[int]:
    return set(range(NULL_PAGE + 1, kv.num_pages))


# ---------------------------------------------------------------------------- unit tests


def test_allocate_append_free_and_null_page_never_handed_out():
    kv = KVCacheManager(num_pages=8, page_size=4)
    a = make_seq(range(10, 20))  # 10 tokens: 3 pages
    assert kv.match_prefix(a) == []
    assert kv.allocate(a, [], 10) == 0
    table = kv.page_table(a)
    assert len(table) == 3 == kv.num_pages_of(a) and NULL_PAGE not in table
    assert all(kv.ref_count(p) == 1 for p in table)
    assert (kv.num_used_pages, kv.num_free_pages) == (3, 4)
    a.num_computed_tokens = 10
    kv.commit(a)
    assert kv.num_filled_tokens == 10
    assert kv.num_pages_to_append(a, 2) == 0 and kv.num_pages_to_append(a, 3) == 1
    kv.append(a, 3)  # 13 tokens: a 4th page
    assert kv.page_table(a)[:3] == table and len(kv.page_table(a)) == 4
    assert kv.num_tokens_fitting(a) == kv.capacity(4 + 3) - 10
    kv.check()
    # Everything else: 3 pages left; a request wanting 4 is refused, one wanting 3 is not.
    b = make_seq(range(100, 116))
    assert not kv.can_allocate([], 16)
    with pytest.raises(RuntimeError, match="can_allocate"):
        kv.allocate(b, [], 16)
    assert kv.page_table(b) == ()
    kv.allocate(b, [], 12)
    assert kv.num_free_pages == 0 and not kv.can_append(a, 7) and kv.can_append(a, 6)
    with pytest.raises(RuntimeError, match="can_append"):
        kv.append(a, 7)
    with pytest.raises(ValueError, match="already holds"):
        kv.allocate(b, [], 1)
    used = set(kv.page_table(a)) | set(kv.page_table(b))
    assert used == all_pages(kv) and NULL_PAGE not in used  # the whole pool, but page 0
    kv.check()
    kv.free(a)
    kv.free(b)
    kv.free(b)  # a second free is a no-op
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0
    assert sorted(kv.free_page_ids()) == sorted(all_pages(kv))
    kv.check()


@pytest.mark.parametrize("num_pages, page_size", [(1, 4), (0, 4), (4, 0), (4.0, 4)])
def test_validation(num_pages, page_size):
    with pytest.raises(ValueError):
        KVCacheManager(num_pages, page_size)


def test_hits_at_admission_share_committed_pages_only():
    kv = KVCacheManager(num_pages=32, page_size=4)
    a = make_seq(range(12))
    kv.allocate(a, [], 12)
    b = make_seq([*range(8), 50, 51, 52])
    assert kv.match_prefix(b) == []  # a's K/V is not computed yet: no key, no hit
    a.num_computed_tokens = 12
    kv.commit(a)
    assert kv.num_cached_pages == 3
    hit = kv.match_prefix(b)
    assert hit == list(kv.page_table(a)[:2])
    queries, hits = kv.num_queries, kv.num_hits
    assert kv.allocate(b, hit, 11) == 8
    assert kv.page_table(b)[:2] == kv.page_table(a)[:2]
    assert kv.page_table(b)[2] not in kv.page_table(a)
    assert [kv.ref_count(p) for p in kv.page_table(a)] == [2, 2, 1]
    assert (kv.num_queries - queries, kv.num_hits - hits) == (11, 8)
    assert kv.num_filled_tokens == 12  # the shared pages count once
    kv.check()
    # A differing first token breaks the chain at page 0, even with later pages equal.
    c = make_seq([99, *range(1, 12)])
    assert kv.match_prefix(c) == []


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(num_pages=32, page_size=4)
    a = make_seq(range(8))  # exactly two pages
    admit(kv, a)
    same = make_seq(range(8))
    hit = kv.match_prefix(same)
    assert hit == list(kv.page_table(a)[:1])  # not both: the last page is recomputed
    assert admit(kv, same) == 4 and same.num_computed_tokens == 8
    longer = make_seq(range(9))  # one token past the two cached pages: both hit
    assert kv.match_prefix(longer) == list(kv.page_table(a))
    assert kv.capacity(len(kv.match_prefix(longer))) == longer.num_tokens - 1
    one = make_seq([0])
    assert kv.match_prefix(one) == []
    kv.check()


def test_eviction_is_lru_and_tail_pages_go_first():
    kv = KVCacheManager(num_pages=7, page_size=2)  # 6 usable pages
    a = make_seq([1, 2, 3, 4, 5, 6])
    admit(kv, a)
    pa = kv.page_table(a)
    kv.free(a)
    b = make_seq([7, 8, 9, 10])
    admit(kv, b)
    pb = kv.page_table(b)
    kv.free(b)
    # a freed first (oldest), and each sequence's tail page before its head.
    assert list(kv._evictable) == [pa[2], pa[1], pa[0], pb[1], pb[0]]
    assert kv.num_free_pages == 6 and kv.num_cached_pages == 5 and kv.num_used_pages == 0
    kv.check()
    c = make_seq([20, 21, 22, 23, 24, 25])  # 3 pages: the never-cached one, then 2 evicted
    evictions = kv.num_evictions
    admit(kv, c)
    pc = kv.page_table(c)
    assert kv.num_evictions - evictions == 2
    assert set(pc) - set(pa) - set(pb) and {pa[2], pa[1]} <= set(pc)
    assert pa[0] not in pc and not set(pb) & set(pc)
    # a's first page is still a hit (its chain head survived); its second page is gone.
    a2 = make_seq([1, 2, 3, 4, 5, 6, 7])
    assert kv.match_prefix(a2) == [pa[0]]
    assert kv.match_prefix(make_seq([7, 8, 9, 10, 11])) == list(pb)
    # A hit takes an evictable page out of the LRU: it is no longer free, nor evicted later.
    kv.free(c)
    admit(kv, a2)
    assert kv.page_table(a2)[0] == pa[0] and pa[0] not in kv.free_page_ids()
    kv.check()


def test_a_hit_on_evictable_pages_counts_them_as_taken():
    kv = KVCacheManager(num_pages=4, page_size=2)  # 3 usable pages
    a = make_seq([1, 2, 3, 4, 5])
    admit(kv, a)  # 3 pages, 2 of them keyed
    kv.free(a)
    b = make_seq([1, 2, 3, 4, 5, 6, 7])  # hits a's 2 keyed pages, needs 2 more
    hit = kv.match_prefix(b)
    assert len(hit) == 2 and all(kv.ref_count(p) == 0 for p in hit)
    assert kv.num_admissible_tokens(hit) == kv.capacity(1)
    assert not kv.can_allocate(hit, 7) and kv.can_allocate(hit, 6)


def test_reset_prefix_cache_forgets_every_key():
    kv = KVCacheManager(num_pages=16, page_size=4)
    a, b = make_seq(range(8)), make_seq(range(100, 109))
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    assert kv.num_cached_pages == 4
    kv.reset_prefix_cache()
    assert kv.num_cached_pages == 0
    assert kv.match_prefix(make_seq(range(9))) == [] == kv.match_prefix(make_seq(range(100, 110)))
    assert kv.num_free_pages == 15 - 3 and kv.num_used_pages == 3
    kv.check()
    kv.free(b)  # b's pages lost their keys: they go back to the free list, not the LRU
    assert not kv._evictable and kv.num_free_pages == 15
    kv.check()


def test_cache_salt_separates_hash_chains_and_hits():
    tokens = list(range(12))
    plain = chain_hashes(tokens, 4, None)
    salted = chain_hashes(tokens, 4, "tenant-a")
    assert len(plain) == len(salted) == 3
    assert not set(plain) & set(salted)
    assert not set(salted) & set(chain_hashes(tokens, 4, "tenant-b"))
    assert chain_hashes(tokens, 4, "tenant-a") == salted
    assert chain_hashes(tokens[:8], 4, "tenant-a") == salted[:2]  # a chain extends its prefix
    assert chain_hashes(tokens, 4, "tenant-a", start=salted[:1]) == salted
    assert not set(chain_hashes([99, *tokens[1:]], 4, None)) & set(plain)  # hashes chain the prefix

    kv = KVCacheManager(num_pages=32, page_size=4)
    admit(kv, make_seq(tokens, cache_salt="tenant-a"))
    assert kv.match_prefix(make_seq([*tokens, 1], cache_salt="tenant-b")) == []
    assert kv.match_prefix(make_seq([*tokens, 1])) == []
    assert len(kv.match_prefix(make_seq([*tokens, 1], cache_salt="tenant-a"))) == 3
    assert kv.match_prefix(make_seq([*tokens, 1], cache_salt="tenant-a", prompt_logprobs=1)) == []
    no_cache = KVCacheManager(num_pages=32, page_size=4, enable_prefix_caching=False)
    admit(no_cache, make_seq(tokens))
    assert no_cache.match_prefix(make_seq([*tokens, 1])) == [] and no_cache.num_cached_pages == 0
    assert no_cache.num_queries == 0


def test_fork_shares_every_page_by_count():
    kv = KVCacheManager(num_pages=16, page_size=4)
    parent = make_seq(range(10))
    admit(kv, parent)
    child = make_seq(parent.token_ids)
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    assert kv.page_table(child) == kv.page_table(parent)
    assert all(kv.ref_count(p) == 2 for p in kv.page_table(parent))
    assert kv.num_used_pages == 3 and kv.num_filled_tokens == 10
    with pytest.raises(ValueError, match="already holds"):
        kv.fork(parent, child)
    kv.check()
    table = kv.page_table(parent)
    kv.free(parent)
    assert all(kv.ref_count(p) == 1 for p in table) and kv.num_used_pages == 3
    kv.check()
    kv.free(child)
    assert kv.num_used_pages == 0
    kv.check()


def test_copy_on_write_into_a_shared_partly_filled_last_page():
    kv = KVCacheManager(num_pages=16, page_size=4)
    parent = make_seq(range(6))  # pages: [0..3] full, [4, 5] half
    admit(kv, parent)
    child = make_seq(parent.token_ids)
    kv.fork(parent, child)
    child.num_computed_tokens = 6
    head, src = kv.page_table(parent)
    assert kv.take_copies() == ()
    assert kv.num_pages_to_append(child, 1) == 1 and kv.can_append(child, 1)
    kv.append(child, 1)
    ((copy_src, dst),) = kv.take_copies()
    assert copy_src == src and dst not in (NULL_PAGE, head, src)
    assert kv.page_table(child) == (head, dst) and kv.page_table(parent) == (head, src)
    assert kv.ref_count(src) == 1  # the parent still holds it
    assert kv.ref_count(dst) == 1 and kv.ref_count(head) == 2
    assert kv.num_filled_tokens == 4 + 2 + 2  # the copy holds the child's 2 tokens too
    assert kv.take_copies() == ()  # handed over once
    kv.check()
    # The parent is the only holder now: it writes in place.
    kv.append(parent, 1)
    assert kv.take_copies() == () and kv.page_table(parent) == (head, src)
    # A copy into a page its sequence gave up before the step is dropped.
    other = make_seq(parent.token_ids)
    kv.fork(parent, other)
    other.num_computed_tokens = 6
    kv.append(other, 1)
    kv.free(other)
    assert kv.take_copies() == ()
    kv.check()


def test_no_copy_when_the_shared_last_page_is_full():
    kv = KVCacheManager(num_pages=16, page_size=4)
    parent = make_seq(range(8))
    admit(kv, parent)
    child = make_seq(parent.token_ids)
    kv.fork(parent, child)
    child.num_computed_tokens = 8
    kv.append(child, 1)
    assert kv.take_copies() == ()
    assert kv.page_table(child)[:2] == kv.page_table(parent) and len(kv.page_table(child)) == 3
    kv.check()


def test_preempted_sequence_hits_its_own_pages_on_recompute():
    kv = KVCacheManager(num_pages=16, page_size=4)
    a = make_seq(range(10))
    admit(kv, a)
    a.append_token(42)
    table = kv.page_table(a)
    kv.free(a)  # preempted: prompt + output recomputed later
    a.num_computed_tokens = 0
    assert admit(kv, a) == 8 and kv.page_table(a)[:2] == table[:2]
    kv.check()


# ---------------------------------------------------------------------------- state machine

VOCAB = 4  # few token ids: prompts collide, chains share prefixes
CHUNK = st.one_of(st.just(64), st.integers(1, 12))  # the whole rest, or a chunk of it


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / append / commit / free / preempt / fork / hit / evict / reset."""

    @initialize(
        num_pages=st.integers(3, 20),
        page_size=st.integers(1, 4),
        caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, num_pages, page_size, caching):
        self.kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=caching)
        self.ps = page_size
        self.live: list[Sequence] = []  # holding pages
        self.waiting: list[Sequence] = []  # preempted, to be re-admitted
        self.history: list[tuple[list[int], str | None]] = []  # tokens and salt ever admitted
        self.content: dict[int, list] = {}  # page -> per-slot identity of the K/V it holds
        self.meaning: dict[bytes, tuple] = {}  # chain hash -> (salt, tokens of the chain)
        self.fresh = itertools.count(1000)  # token ids no other sequence has

    # ------------------------------------------------------------------ model

    def identity(self, seq: Sequence, pos: int) -> tuple:
        return (seq.sampling_params.cache_salt, tuple(seq.token_ids[: pos + 1]))

    def slot(self, page: int, offset: int):
        return self.content.get(page, [None] * self.ps)[offset]

    def compute(self, seq: Sequence, num_new: int) -> None:
        """append, the device's copies then writes, the step's token, commit."""
        kv, ps = self.kv, self.ps
        assert kv.can_append(seq, num_new) == (num_new <= kv.num_tokens_fitting(seq))
        kv.append(seq, num_new)
        for src, dst in kv.take_copies():  # before the step writes into the copies
            assert src != NULL_PAGE and dst != NULL_PAGE and kv.ref_count(dst) >= 1
            self.content[dst] = list(self.content.get(src, [None] * ps))
        table = kv.page_table(seq)
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        assert len(table) == cdiv(end, ps)
        for pos in range(start, end):
            page = table[pos // ps]
            assert page != NULL_PAGE
            assert kv.ref_count(page) == 1, "a write into a page another sequence reads"
            self.content.setdefault(page, [None] * ps)[pos % ps] = self.identity(seq, pos)
        seq.num_computed_tokens = end
        if end == seq.num_tokens:  # the step sampled a token
            seq.append_token((seq.seq_id + seq.num_tokens) % VOCAB)
        kv.commit(seq)
        salt = seq.sampling_params.cache_salt
        computed = seq.token_ids[:end]
        for i, h in enumerate(chain_hashes(computed, ps, salt)):
            self.meaning[h] = (salt, tuple(computed[: (i + 1) * ps]))

    def admit_seq(self, seq: Sequence, chunk: int) -> bool:
        kv, ps = self.kv, self.ps
        hit = kv.match_prefix(seq)
        num_hit = kv.capacity(len(hit))
        assert num_hit <= seq.num_tokens - 1, "a hit must leave a token to compute"
        if not kv.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            assert hit == []
        for i, page in enumerate(hit):  # the hit holds exactly this sequence's K/V
            assert page != NULL_PAGE
            for j in range(ps):
                assert self.slot(page, j) == self.identity(seq, i * ps + j), "a wrong hit"
        if kv.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None:
            hashes = chain_hashes(seq.token_ids, ps, seq.sampling_params.cache_salt)
            num_hashable = (seq.num_tokens - 1) // ps
            if len(hit) < num_hashable:  # the longest chain: the next page is not cached
                assert hashes[len(hit)] not in kv._index
        num_new = min(chunk, seq.num_tokens - num_hit)
        num_new_pages = cdiv(num_hit + num_new, ps) - len(hit)
        num_taken = sum(kv.ref_count(p) == 0 for p in hit)
        fits = num_new_pages + num_taken <= kv.num_free_pages
        assert kv.can_allocate(hit, num_hit + num_new) == fits
        assert kv.num_admissible_tokens(hit) == kv.capacity(kv.num_free_pages - num_taken)
        if not fits:
            return False
        free_before = list(kv._free)
        lru = [p for p in kv._evictable if p not in hit]  # oldest first
        evictions, queries, hits = kv.num_evictions, kv.num_queries, kv.num_hits
        assert kv.allocate(seq, hit, num_hit + num_new) == num_hit
        table = kv.page_table(seq)
        assert list(table[: len(hit)]) == hit
        num_evicted = max(0, num_new_pages - len(free_before))
        assert kv.num_evictions - evictions == num_evicted
        assert set(table[len(hit) :]) == set(free_before[:num_new_pages]) | set(lru[:num_evicted])
        if kv.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None:
            assert (kv.num_queries - queries, kv.num_hits - hits) == (seq.num_tokens, num_hit)
        else:
            assert (kv.num_queries, kv.num_hits) == (queries, hits)
        seq.num_computed_tokens = num_hit
        self.live.append(seq)
        self.history.append((list(seq.token_ids), seq.sampling_params.cache_salt))
        self.compute(seq, num_new)
        return True

    # ------------------------------------------------------------------ rules

    @rule(
        tokens=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
        chunk=CHUNK,
        salt=st.sampled_from([None, None, "s"]),
        scored=st.sampled_from([False, False, False, True]),
    )
    def allocate(self, tokens, chunk, salt, scored):
        seq = make_seq(tokens, cache_salt=salt, prompt_logprobs=1 if scored else None)
        self.admit_seq(seq, chunk)

    @precondition(lambda self: self.history)
    @rule(
        back=st.integers(1, 4),
        drop=st.integers(0, 6),
        tail=st.lists(st.integers(0, VOCAB - 1), max_size=4),
        chunk=CHUNK,
        same_salt=st.sampled_from([True, True, True, False]),
    )
    def hit(self, back, drop, tail, chunk, same_salt):
        """A sequence repeating (a prefix of) one admitted recently."""
        tokens, salt = self.history[-min(back, len(self.history))]
        if not same_salt:
            salt = None if salt else "s"
        cut = max(1, len(tokens) - drop)
        self.admit_seq(make_seq(tokens[:cut] + tail, cache_salt=salt), chunk)

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 10**6), chunk=CHUNK)
    def readmit(self, i, chunk):
        """A preempted sequence is recomputed (prompt + outputs): it hits its own pages."""
        seq = self.waiting[i % len(self.waiting)]
        if self.admit_seq(seq, chunk):
            self.waiting.remove(seq)

    @rule(tokens=st.integers(1, 48))
    def evict(self, tokens):
        """An allocation under pressure: as many never-seen tokens as the free pages hold."""
        kv = self.kv
        num_tokens = min(tokens, kv.capacity(kv.num_free_pages))
        if num_tokens == 0:
            return
        seq = make_seq([next(self.fresh) for _ in range(num_tokens)])
        never_cached, evictions = len(kv._free), kv.num_evictions
        free_before = kv.num_free_pages
        assert self.admit_seq(seq, num_tokens)
        assert kv.num_evictions - evictions == max(0, kv.pages_for(num_tokens) - never_cached)
        if kv.pages_for(num_tokens) == free_before:  # took every free page
            assert kv.num_free_pages == 0 and not kv._evictable

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6), num_new=st.integers(1, 12))
    def step(self, i, num_new):
        """A running sequence computes a chunk (or one decode token) and commits it."""
        seq = self.live[i % len(self.live)]
        num_new = min(num_new, seq.num_uncomputed_tokens)
        kv = self.kv
        need = kv.num_pages_to_append(seq, num_new)
        if need > kv.num_free_pages:
            assert not kv.can_append(seq, num_new)
            return
        used = kv.num_used_pages
        self.compute(seq, num_new)
        assert kv.num_used_pages <= used + need

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6), preempt=st.booleans())
    def free(self, i, preempt):
        """Finish (or preempt) a sequence: its pages drop a reference, tail first."""
        kv = self.kv
        seq = self.live.pop(i % len(self.live))
        table = kv.page_table(seq)
        kv.free(seq)
        assert kv.page_table(seq) == ()
        released = [p for p in reversed(table) if kv.ref_count(p) == 0]
        keyed = [p for p in released if kv._page_hash[p] is not None]
        assert set(released) <= set(kv.free_page_ids())
        if keyed:
            assert list(kv._evictable)[-len(keyed) :] == keyed, "tail pages not first to go"
        if preempt:
            seq.num_computed_tokens = 0
            self.waiting.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6), then_step=st.sampled_from([True, True, False]))
    def fork(self, i, then_step):
        """A completion of the same prompt shares every page of a running sequence, then
        (usually) computes its next token at once, as a forked group member does."""
        parent = self.live[i % len(self.live)]
        child = make_seq(parent.token_ids, cache_salt=parent.sampling_params.cache_salt)
        counts = [self.kv.ref_count(p) for p in self.kv.page_table(parent)]
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        assert self.kv.page_table(child) == self.kv.page_table(parent)
        assert [self.kv.ref_count(p) for p in self.kv.page_table(child)] == [c + 1 for c in counts]
        self.live.append(child)
        if then_step and child.num_uncomputed_tokens and self.kv.can_append(child, 1):
            self.compute(child, 1)

    @rule()
    def reset_prefix_cache(self):
        self.kv.reset_prefix_cache()
        assert self.kv.num_cached_pages == 0 and not self.kv._evictable

    # ------------------------------------------------------------------ invariants

    @invariant()
    def pages_are_accounted_for(self):
        kv, ps = self.kv, self.ps
        kv.check()
        holders: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self.live:
            table = kv.page_table(seq)
            assert len(table) == cdiv(seq.num_computed_tokens, ps)
            for index, page in enumerate(table):
                holders.setdefault(page, []).append((seq, index))
        assert NULL_PAGE not in holders and kv.ref_count(NULL_PAGE) == 0
        for seq in self.waiting:
            assert kv.page_table(seq) == ()
        free = kv.free_page_ids()
        assert len(free) == len(set(free)) == kv.num_free_pages
        assert NULL_PAGE not in free
        assert not set(free) & set(holders)
        assert set(free) | set(holders) == all_pages(kv), "free + evictable + owned != all"
        assert kv.num_used_pages == len(holders)
        for page in all_pages(kv):
            assert kv.ref_count(page) == len(holders.get(page, ())) >= 0
        filled = sum(
            max(min(ps, s.num_computed_tokens - index * ps) for s, index in hs)
            for hs in holders.values()
        )
        assert kv.num_filled_tokens == filled
        assert kv.num_hits <= kv.num_queries

    @invariant()
    def every_holder_reads_its_own_kv(self):
        for seq in self.live:
            table = self.kv.page_table(seq)
            for pos in range(seq.num_computed_tokens):
                assert self.slot(table[pos // self.ps], pos % self.ps) == self.identity(seq, pos)

    @invariant()
    def keyed_pages_hold_their_chain(self):
        kv, ps = self.kv, self.ps
        if not kv.enable_prefix_caching:
            assert kv.num_cached_pages == 0
        for h, page in kv._index.items():
            assert h in self.meaning, "a key no computed chain has"
            salt, tokens = self.meaning[h]
            start = len(tokens) - ps
            for j in range(ps):
                assert self.slot(page, j) == (salt, tokens[: start + j + 1])


KVCacheMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_kv_cache_state_machine = KVCacheMachine.TestCase
