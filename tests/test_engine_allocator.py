from __future__ import annotations

import pytest

from paged_jax.engine.page_allocator import NULL_PAGE, PageAllocator


def test_null_page_is_never_handed_out():
    allocator = PageAllocator(num_pages=5, page_size=4)
    assert allocator.num_free_pages == 4
    page_ids = allocator.allocate(4)
    assert NULL_PAGE not in page_ids
    assert sorted(page_ids) == [1, 2, 3, 4]
    assert allocator.num_free_pages == 0 and allocator.num_used_pages == 4
    assert not allocator.can_allocate(1)
    assert allocator.can_allocate(0)


def test_exhaustion_raises():
    allocator = PageAllocator(num_pages=3, page_size=2)
    allocator.allocate(2)
    with pytest.raises(RuntimeError, match="can_allocate"):
        allocator.allocate(1)
    assert allocator.num_free_pages == 0


def test_refcounts_and_free_list_reuse():
    allocator = PageAllocator(num_pages=4, page_size=2)
    first = allocator.allocate(2)
    assert [allocator.ref_count(p) for p in first] == [1, 1]
    allocator.incref(first[:1])
    assert allocator.ref_count(first[0]) == 2
    allocator.free(first)
    # first[0] still shared; first[1] back on the free list
    assert allocator.ref_count(first[0]) == 1 and allocator.ref_count(first[1]) == 0
    assert allocator.num_free_pages == 2
    reused = allocator.allocate(2)
    assert first[1] in reused and first[0] not in reused
    allocator.free(first[:1])
    allocator.free(reused)
    assert allocator.num_free_pages == 3 and allocator.num_used_pages == 0


def test_bad_frees_raise():
    allocator = PageAllocator(num_pages=4, page_size=2)
    (page_id,) = allocator.allocate(1)
    allocator.free([page_id])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([page_id])
    with pytest.raises(ValueError, match="NULL_PAGE"):
        allocator.free([NULL_PAGE])
    with pytest.raises(ValueError, match="out of range"):
        allocator.incref([4])


@pytest.mark.parametrize(
    ("num_pages", "page_size", "field"), [(1, 4, "num_pages"), (4, 0, "page_size")]
)
def test_bad_construction(num_pages, page_size, field):
    with pytest.raises(ValueError, match=field):
        PageAllocator(num_pages, page_size)
