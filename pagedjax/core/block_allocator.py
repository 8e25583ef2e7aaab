"""A fixed pool of physical KV-cache blocks with reference counts.

`BlockAllocator` hands out block ids from a pool of `num_blocks` blocks, each
holding `block_size` token slots. Allocation and release are O(1): free ids live
on a stack (the most recently freed block is reused first, which keeps the
working set of pages small), and each block has a reference count so several
sequences can share one block (fork, parallel sampling, beam search).

It does not know about sequences, block tables, copy-on-write or device memory:
that is `pagedjax.core.block_manager.BlockManager`, which owns one allocator for the
device pool and one for the host (swap) pool.
"""


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

  @property
  def num_free_blocks(self) -> int:
    """Number of blocks with reference count 0."""
    return len(self._free)

  @property
  def num_used_blocks(self) -> int:
    """Number of blocks with reference count >= 1."""
    return self.num_blocks - len(self._free)

  def allocate(self) -> int:
    """Takes a free block; its reference count becomes 1.

    Returns:
      The block id.

    Raises:
      NoFreeBlocksError: when every block is in use (the pool is unchanged).
    """
    if not self._free:
      raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
    block_id = self._free.pop()
    self.ref_counts[block_id] = 1
    return block_id

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
