"""Tests for BlockAllocator: free list, reference counts, exhaustion, bad ids."""

import pytest

from pagedjax.core.block_allocator import BlockAllocator, NoFreeBlocksError


def _state(alloc: BlockAllocator):
  return list(alloc._free), list(alloc.ref_counts)


@pytest.mark.parametrize("num_blocks, block_size", [(-1, 16), (4, 0), (4, -2)])
def test_rejects_bad_sizes(num_blocks, block_size):
  with pytest.raises(ValueError, match=str(num_blocks if num_blocks < 0 else block_size)):
    BlockAllocator(num_blocks, block_size)


def test_allocate_hands_out_every_block_once_then_raises():
  alloc = BlockAllocator(5, 4)
  assert alloc.num_free_blocks == 5 and alloc.num_used_blocks == 0
  ids = [alloc.allocate() for _ in range(5)]
  assert sorted(ids) == list(range(5))
  assert all(alloc.ref_count(b) == 1 for b in ids)
  assert alloc.num_free_blocks == 0 and alloc.num_used_blocks == 5
  before = _state(alloc)
  with pytest.raises(NoFreeBlocksError, match="5 blocks"):
    alloc.allocate()
  assert _state(alloc) == before


def test_empty_pool_raises_on_allocate():
  alloc = BlockAllocator(0, 16)
  assert alloc.num_free_blocks == 0
  with pytest.raises(NoFreeBlocksError):
    alloc.allocate()


def test_refcounts_and_release_at_zero():
  alloc = BlockAllocator(3, 2)
  b = alloc.allocate()
  alloc.incref(b)
  alloc.incref(b)
  assert alloc.ref_count(b) == 3
  assert alloc.decref(b) == 2
  assert alloc.decref(b) == 1
  assert alloc.num_free_blocks == 2
  assert alloc.decref(b) == 0
  assert alloc.num_free_blocks == 3
  assert alloc.ref_count(b) == 0


def test_most_recently_freed_block_is_reused_first():
  alloc = BlockAllocator(4, 2)
  a, b, c = alloc.allocate(), alloc.allocate(), alloc.allocate()
  alloc.decref(b)
  alloc.decref(a)
  assert alloc.allocate() == a
  assert alloc.allocate() == b
  assert c not in (a, b)


@pytest.mark.parametrize("op", ["incref", "decref"])
def test_free_block_cannot_be_referenced_or_double_freed(op):
  alloc = BlockAllocator(2, 2)
  b = alloc.allocate()
  alloc.decref(b)
  before = _state(alloc)
  with pytest.raises(ValueError, match=f"block {b} is free"):
    getattr(alloc, op)(b)
  assert _state(alloc) == before


@pytest.mark.parametrize("op", ["incref", "decref", "ref_count"])
@pytest.mark.parametrize("block_id", [-1, 2, 100])
def test_out_of_range_ids_raise(op, block_id):
  alloc = BlockAllocator(2, 2)
  alloc.allocate()
  before = _state(alloc)
  with pytest.raises(ValueError, match=f"block id {block_id} out of range"):
    getattr(alloc, op)(block_id)
  assert _state(alloc) == before
