"""The host's source of truth for which KV page belongs to whom: a free list plus refcounts.

Page 0 is `NULL_PAGE`. It is never handed out: padding tokens write their K/V there and padding
rows (and unused tail entries) of page tables point there, so it always holds garbage that no
live sequence reads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

logger = logging.getLogger(__name__)

NULL_PAGE = 0


class PageAllocator:
    """Hands out pages 1..num_pages-1. A page returns to the free list when its last
    reference is freed; `incref` adds references so that pages can be shared later
    (prefix caching, n > 1, beam search)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be >= 2 (page 0 is NULL_PAGE)")
        if page_size < 1:
            raise ValueError(f"{page_size=} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free_page_ids: deque[int] = deque(range(NULL_PAGE + 1, num_pages))
        self._ref_counts = [0] * num_pages

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free_page_ids)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free_page_ids)

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free_page_ids)

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` pages off the free list (refcount 1). Check `can_allocate` first."""
        if num_pages < 0:
            raise ValueError(f"{num_pages=} must be >= 0")
        if not self.can_allocate(num_pages):
            raise RuntimeError(
                f"cannot allocate {num_pages} pages: {self.num_free_pages} free "
                "(callers must check can_allocate first)"
            )
        page_ids = [self._free_page_ids.popleft() for _ in range(num_pages)]
        for page_id in page_ids:
            assert page_id != NULL_PAGE, "NULL_PAGE must never be handed out"
            assert self._ref_counts[page_id] == 0, f"page {page_id} on free list is in use"
            self._ref_counts[page_id] = 1
        return page_ids

    def incref(self, page_ids: Iterable[int]) -> None:
        """Add one reference to each page (it must be in use)."""
        for page_id in page_ids:
            self._check_in_use(page_id)
            self._ref_counts[page_id] += 1

    def free(self, page_ids: Iterable[int]) -> None:
        """Drop one reference to each page; pages left with none go back to the free list."""
        for page_id in page_ids:
            self._check_in_use(page_id)
            self._ref_counts[page_id] -= 1
            if self._ref_counts[page_id] == 0:
                self._free_page_ids.append(page_id)

    def _check_in_use(self, page_id: int) -> None:
        if page_id == NULL_PAGE:
            raise ValueError("NULL_PAGE is never allocated, so it cannot be shared or freed")
        if not 0 < page_id < self.num_pages:
            raise ValueError(f"{page_id=} out of range [1, {self.num_pages})")
        if self._ref_counts[page_id] == 0:
            raise ValueError(f"page {page_id} is not allocated (double free?)")
