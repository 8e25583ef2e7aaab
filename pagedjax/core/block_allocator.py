"""A fixed pool of physical KV-cache blocks with reference counts.

`BlockAllocator` hands out block ids from a pool of `num_blocks` blocks, each
holding `block_size` token slots. Allocation and release are O(1): free ids live
on a stack (the most recently freed block is reused first, which keeps the
working set of pages small), and each block has a reference count so several
sequences can share one block (fork, parallel sampling, beam search).

With prefix caching, a block may also be marked *cached* (its content is registered
under a hash by the block manager). A cached block whose count drops to 0 is not free
at once: it waits on an LRU list of *evictable* blocks, reusable by a cache hit
(`reuse`) until its memory is needed. It still counts as free (`num_free_blocks`):
`allocate` takes a never-cached free block first and otherwise evicts the least
recently released cached one, telling the owner through `on_evict(block)`.

It does not know about sequences, block tables, copy-on-write, hashes or device memory:
that is `pagedjax.core.block_manager.BlockManager`, which owns one allocator for the
device pool and one for the host (swap) pool.
"""

import collections
from collections.abc import Callable


class NoFreeBlocksError(RuntimeError):
  """A pool has too few free blocks for the requested act; nothing was changed."""


class BlockAllocator:
  """Fixed pool of `num_blocks` blocks with O(1) allocate / free and ref counts.

  Attributes:
    num_blocks: Size of the pool; block ids are `0 .. num_blocks - 1`.
    block_size: Token slots per block (bookkeeping only; the allocator never
      looks inside a block).
    ref_counts: Reference count per block id (0 = free). Read it, never write it:
      the free list is kept in step with it. `ref_count()` is the checked reader.
  """

  def __init__(self, num_blocks: int, block_size: int):
    """Creates a pool with every block free.

    Args:
      num_blocks: Number of physical blocks, >= 0 (an empty host pool is allowed).
      block_size: Token slots per block, >= 1.

    Raises:
      ValueError: on a negative `num_blocks` or a `block_size` < 1.
    """
    if num_blocks < 0:
      raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
    self.num_blocks = num_blocks
    self.block_size = block_size
    # Stack of free ids, reversed so that a fresh pool hands out 0, 1, 2, ...
    self._free = list(range(num_blocks - 1, -1, -1))
    self.ref_counts = [0] * num_blocks
    self.cached = [False] * num_blocks  # read only; see mark_cached / uncache
    # Cached blocks with count 0, least recently released first (an ordered set).
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.on_evict: Callable[[int], None] | None = None
    self.num_evicted = 0

  @property
  def num_free_blocks(self) -> int:
    """Number of blocks with reference count 0 (evictable cached blocks included)."""
    return len(self._free) + len(self._evictable)

  @property
  def num_used_blocks(self) -> int:
    """Number of blocks with reference count >= 1."""
    return self.num_blocks - self.num_free_blocks

  @property
  def num_evictable_blocks(self) -> int:
    """Cached blocks with reference count 0 (free, but hits can still reuse them)."""
    return len(self._evictable)

  def is_evictable(self, block_id: int) -> bool:
    return block_id in self._evictable

  def allocate(self) -> int:
    """Takes a free block (never-cached ones first, else the least recently released
    cached one, evicted); its reference count becomes 1.

    Returns:
      The block id.

    Raises:
      NoFreeBlocksError: when every block is in use (the pool is unchanged).
    """
    if self._free:
      block_id = self._free.pop()
    elif self._evictable:
      block_id, _ = self._evictable.popitem(last=False)
      self.cached[block_id] = False
      self.num_evicted += 1
      if self.on_evict is not None:
        self.on_evict(block_id)
    else:
      raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
    self.ref_counts[block_id] = 1
    return block_id

  def reuse(self, block_id: int) -> None:
    """Adds a reference to a cached block (a cache hit), taking it off the evictable
    list if its count was 0.

    Raises:
      ValueError: if the block is out of range or not cached.
    """
    self.ref_count(block_id)  # range check
    if not self.cached[block_id]:
      raise ValueError(f"block {block_id} is not cached")
    if self.ref_counts[block_id] == 0:
      del self._evictable[block_id]
    self.ref_counts[block_id] += 1

  def mark_cached(self, block_id: int) -> None:
    """Marks an allocated block as holding cached content.

    Raises:
      ValueError: if the block is out of range or free.
    """
    self._check_allocated(block_id)
    self.cached[block_id] = True

  def uncache(self, block_id: int) -> None:
    """Forgets that a block is cached; an evictable one becomes plainly free."""
    self.ref_count(block_id)  # range check
    if not self.cached[block_id]:
      return
    self.cached[block_id] = False
    if block_id in self._evictable:
      del self._evictable[block_id]
      self._free.append(block_id)

  def incref(self, block_id: int) -> None:
    """Adds one reference to an allocated block.

    Raises:
      ValueError: if `block_id` is out of range or free.
    """
    self._check_allocated(block_id)
    self.ref_counts[block_id] += 1

  def decref(self, block_id: int) -> int:
    """Drops one reference; the block returns to the pool when none are left.

    Returns:
      The new reference count (0 means the block is free again).

    Raises:
      ValueError: if `block_id` is out of range or already free (double free).
    """
    self._check_allocated(block_id)
    count = self.ref_counts[block_id] - 1
    self.ref_counts[block_id] = count
    if count == 0:
      if self.cached[block_id]:
        self._evictable[block_id] = None  # most recently released: evicted last
      else:
        self._free.append(block_id)
    return count

  def ref_count(self, block_id: int) -> int:
    """Reference count of `block_id` (0 when free).

    Raises:
      ValueError: if `block_id` is out of range.
    """
    if not 0 <= block_id < self.num_blocks:
      raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
    return self.ref_counts[block_id]

  def _check_allocated(self, block_id: int) -> None:
    if self.ref_count(block_id) == 0:
      raise ValueError(f"block {block_id} is free (double free or never allocated)")
