"""Per-sequence block tables over a device pool and a host (swap) pool.

`BlockManager` decides where every token's K/V lives: sequence -> block table
(logical block i -> physical block id) on top of two `BlockAllocator`s, one for
device blocks and one for host blocks. It implements vLLM's check/act pairs:
`can_allocate`/`allocate` (prompt), `can_append`/`append_slot` (one decode
token, with copy-on-write when the block being written is shared), `fork`
(child shares all of the parent's blocks), `free`, and
`can_swap_out`/`swap_out`, `can_swap_in`/`swap_in` (whole fork groups at once,
shared blocks move once).

It does not touch device memory: acts that need data moved return copy ops
`(src_block, dst_block)` for the device layer (`pagedjax.runner.kv_cache`) to run
before the step that reads them. It does not schedule; that is
`pagedjax.core.scheduler`.

Prefix caching (`enable_caching=True`, vLLM's automatic prefix caching): every full
device block gets a hash chained from its parent block's hash and its tokens, rooted in
the sequence's cache salt (`block_hash`). `lookup_prefix` finds the longest run of a
token list's full blocks already cached; `allocate(..., prefix=hit)` shares those
blocks by reference count exactly like forked blocks, and `cache_full_blocks`
registers a sequence's newly filled blocks (at scheduling time: the step writes a
block's K/V before any attention of the same layer reads it, so requests scheduled in
the same step share too). A hit is verified against the stored tokens and parent hash,
never trusted on the hash alone. Cached blocks nobody holds stay reusable until
their memory is needed (see `BlockAllocator`: LRU; a sequence releases its blocks tail
first, so a chain's tail is evicted before its head). A swapped-out sequence's device
blocks stay cached while it is on the host (evictable once nobody else holds them); on
swap-in its blocks land in fresh device blocks and are registered again where their
hash is no longer cached. With a lossy swap (`lossy_swap=True`: the host pool stores an
unquantized device pool's blocks quantized) a swapped-in sequence's K/V are rounded, and so
is everything it computes after: its blocks are never registered again (`_Seq.cacheable`),
so no other request can hit values another request's preemption rounded.

Errors: a bad sequence id or an act on a sequence in the wrong place raises
`SequenceStateError` (a `ValueError` naming the id); a pool too small raises
`NoFreeBlocksError`. Every act checks before it mutates, so a failed act leaves
every table, count and free list exactly as it was. `can_*` answer only the
capacity question: they return False for too few blocks and raise for bad ids.
"""

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from pagedjax.core.block_allocator import BlockAllocator, NoFreeBlocksError
from pagedjax.intmath import ceil_div

__all__ = [
    "BlockManager", "MemoryStats", "NoFreeBlocksError", "SequenceStateError", "SlotRef",
]


class SequenceStateError(ValueError):
  """Unknown id, double free, fork onto an existing id, or a sequence in the wrong pool."""


_tuple_new = tuple.__new__


class SlotRef(NamedTuple):
  """Where the token reserved by `BlockManager.append_slot` goes.

  A NamedTuple (immutable) rather than a frozen dataclass: it is built once per
  sequence per decode step, and a frozen dataclass costs ~1 us to construct.

  Attributes:
    block_id: Physical device block of the slot.
    offset: Slot within the block; the flat slot is `block_id * block_size + offset`.
    cow: `(src_block, dst_block)` copy to run before writing, or None.
  """
  block_id: int
  offset: int
  cow: tuple[int, int] | None


_HASH_ROOT = b"pagedjax/prefix-cache/v1\0"


def block_hash(parent: bytes | None, tokens: Sequence[int], cache_salt: str | None = None) -> bytes:
  """The prefix-cache key of a full block: sha256 over a canonical byte encoding.

  The chain starts from a root that encodes the cache salt (None and "" differ), so two
  salts never share a block and a salted block never matches an unsalted request;
  each block then hashes its parent's 32-byte hash and its token ids as signed 64-bit
  little-endian integers. Python's `hash()` is never used (salted per process).

  Args:
    parent: the previous block's hash, None for the first block.
    tokens: the block's token ids.
    cache_salt: the request's salt (used for the first block only; it flows down the chain).
  """
  if parent is None:
    salt = b"\0" if cache_salt is None else b"\1" + cache_salt.encode("utf-8")
    parent = hashlib.sha256(_HASH_ROOT + salt).digest()
  return hashlib.sha256(parent + np.asarray(tokens, "<i8").tobytes()).digest()


class CachedPrefix(NamedTuple):
  """A prefix-cache hit: the cached device blocks holding a token list's first full
  blocks, their hashes, and the salt they were looked up under."""
  blocks: tuple[int, ...]
  hashes: tuple[bytes, ...]
  cache_salt: str | None


class _CacheEntry(NamedTuple):
  hash: bytes
  parent: bytes | None
  tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MemoryStats:
  """A snapshot of pool usage. Token counts cover device-resident sequences only.

  Attributes:
    block_size: Token slots per block.
    total_device_blocks / free_device_blocks / used_device_blocks: Device pool.
    total_host_blocks / free_host_blocks / used_host_blocks: Host (swap) pool.
    num_seqs: Sequences known to the manager (resident + swapped).
    num_swapped_seqs: Sequences whose blocks are in the host pool.
    logical_tokens: Sum of `num_tokens` over resident sequences: the slots a
      cache without sharing would fill.
    tokens_stored: Filled (reserved) slots in used device blocks, each physical
      slot counted once however many sequences share it. `logical_tokens -
      tokens_stored` is what block sharing saves.
    empty_slots: Reserved but unfilled slots in used device blocks
      (`used_device_blocks * block_size - tokens_stored`): internal fragmentation.
    fragmentation: `empty_slots / (used_device_blocks * block_size)`, 0 when empty.
    shared_blocks: Device blocks held by more than one sequence (ref count > 1).
    peak_used_blocks: High-water mark of `used_device_blocks` since construction.
  """
  block_size: int
  total_device_blocks: int
  free_device_blocks: int
  used_device_blocks: int
  total_host_blocks: int
  free_host_blocks: int
  used_host_blocks: int
  num_seqs: int
  num_swapped_seqs: int
  logical_tokens: int
  tokens_stored: int
  empty_slots: int
  fragmentation: float
  shared_blocks: int
  peak_used_blocks: int

  def as_dict(self) -> dict[str, int | float]:
    return dataclasses.asdict(self)


class _Seq:
  """One sequence's block table; `swapped` says which pool the ids refer to; with prefix
  caching, what its first full blocks hold (hash, parent hash, tokens; registered or
  hit) and its salt."""
  __slots__ = ("table", "num_tokens", "swapped", "entries", "cache_salt", "cacheable")

  def __init__(self, table: list[int], num_tokens: int, entries: list | None = None,
               cache_salt: str | None = None, cacheable: bool = True):
    self.table = table
    self.num_tokens = num_tokens
    self.swapped = False
    self.entries: list[_CacheEntry] = entries if entries is not None else []
    self.cache_salt = cache_salt
    self.cacheable = cacheable  # False once its K/V went through a lossy swap


class BlockManager:
  """Block tables for sequences over a device pool and a host swap pool.

  Attributes:
    block_size: Token slots per block.
    num_blocks: Device pool size.
    num_host_blocks: Host pool size (0: swapping is impossible).
    watermark_blocks: Device blocks `can_allocate` / `can_swap_in` keep free so
      running sequences can still grow (vLLM's watermark); acts ignore it.
    device_allocator / host_allocator: The two pools (read them, do not mutate).
    enable_caching: prefix caching on (see the module docstring).
    prefix_cache_queries / prefix_cache_hits: tokens looked up and tokens found, as
      counted by the caller (`record_prefix_lookup`), vLLM's counters.
    newly_cached: device blocks registered since the caller last cleared it (the
      scheduler hands them to the step, which unregisters them if it fails).
  """

  def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0, *,
               watermark: float = 0.0, enable_caching: bool = False, lossy_swap: bool = False):
    """Creates a manager with both pools empty.

    Args:
      num_blocks: Device blocks, >= 1.
      block_size: Token slots per block, >= 1.
      num_host_blocks: Host (swap) blocks, >= 0.
      watermark: Fraction of device blocks, in [0, 1), that admission checks
        (`can_allocate`, `can_swap_in`) leave free.
      enable_caching: prefix caching on.
      lossy_swap: swapped blocks come back rounded (a quantized host pool): swapped-in
        sequences stop feeding the prefix cache.

    Raises:
      ValueError: on a value out of range.
    """
    if num_blocks < 1:
      raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_host_blocks < 0:
      raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
    if not 0.0 <= watermark < 1.0:
      raise ValueError(f"watermark must be in [0, 1), got {watermark}")
    self.device_allocator = BlockAllocator(num_blocks, block_size)  # checks block_size
    self.host_allocator = BlockAllocator(num_host_blocks, block_size)
    self.block_size = block_size
    self.num_blocks = num_blocks
    self.num_host_blocks = num_host_blocks
    self.watermark_blocks = int(watermark * num_blocks)
    self._seqs: dict[Hashable, _Seq] = {}
    self._peak_used = 0
    self.enable_caching = enable_caching
    self.lossy_swap = lossy_swap
    self._cache: dict[bytes, int] = {}  # block hash -> device block
    self._entries: dict[int, _CacheEntry] = {}  # cached device block -> what it holds
    self.device_allocator.on_evict = self._evicted
    self.prefix_cache_queries = 0
    self.prefix_cache_hits = 0
    self.newly_cached: list[int] = []

  # ---------------------------------------------------------------- queries
  @property
  def num_free_blocks(self) -> int:
    """Free device blocks."""
    return self.device_allocator.num_free_blocks

  def num_required_blocks(self, num_tokens: int) -> int:
    """Blocks needed to hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
    return ceil_div(num_tokens, self.block_size)

  def has_seq(self, seq_id: Hashable) -> bool:
    return seq_id in self._seqs

  def is_swapped(self, seq_id: Hashable) -> bool:
    """True when the sequence's blocks are in the host pool."""
    return self._get(seq_id).swapped

  def num_tokens(self, seq_id: Hashable) -> int:
    """Tokens with a reserved slot (prompt + appended), resident or swapped."""
    return self._get(seq_id).num_tokens

  def block_table(self, seq_id: Hashable) -> list[int]:
    """A copy of the block table: device ids, or host ids while swapped out."""
    return list(self._get(seq_id).table)

  def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> np.ndarray:
    """Flat device slots of token positions `[start, end)` of a resident sequence.

    Args:
      seq_id: A device-resident sequence.
      start, end: Token positions, `0 <= start <= end <= num_tokens(seq_id)`.

    Returns:
      int32 array `[end - start]` of `block_id * block_size + offset`.

    Raises:
      SequenceStateError: unknown or swapped-out sequence.
      ValueError: positions out of range.
    """
    seq = self._get_resident(seq_id)
    if not 0 <= start <= end <= seq.num_tokens:
      raise ValueError(f"positions [{start}, {end}) out of range for sequence {seq_id!r} "
                       f"with {seq.num_tokens} tokens")
    pos = np.arange(start, end)  # [end - start]
    table = np.asarray(seq.table, dtype=np.int64)  # [num_logical_blocks]
    return (table[pos // self.block_size] * self.block_size
            + pos % self.block_size).astype(np.int32)

  # ------------------------------------------------------- allocate / append
  def can_allocate(self, seq_id: Hashable, num_tokens: int, *, watermark: bool = True) -> bool:
    """Whether `allocate(seq_id, num_tokens)` fits, keeping the watermark free (if asked).

    Raises:
      SequenceStateError: `seq_id` already exists.
      ValueError: `num_tokens` < 1.
    """
    self._check_new(seq_id, num_tokens)
    reserve = self.watermark_blocks if watermark else 0
    return self.num_required_blocks(num_tokens) <= self.device_allocator.num_free_blocks - reserve

  def allocate(self, seq_id: Hashable, num_tokens: int, *, prefix: CachedPrefix | None = None,
               cache_salt: str | None = None) -> list[int]:
    """Reserves slots for tokens `0 .. num_tokens - 1` of a new sequence.

    Args:
      seq_id: A new sequence id (any hashable).
      num_tokens: Prompt length (or first chunk), >= 1.
      prefix: a `lookup_prefix` hit: its blocks become the table's first blocks (shared,
        not computed again); num_tokens counts them.
      cache_salt: the sequence's cache salt (the prefix's, if given): the root of the
        hashes its blocks are registered under.

    Returns:
      The new block table (a copy).

    Raises:
      SequenceStateError: `seq_id` already exists.
      ValueError: `num_tokens` < 1 or not beyond the prefix, or a stale prefix.
      NoFreeBlocksError: too few free device blocks (the watermark is not applied).
    """
    self._check_new(seq_id, num_tokens)
    hit = prefix.blocks if prefix is not None else ()
    if hit:
      if num_tokens <= len(hit) * self.block_size:
        raise ValueError(f"num_tokens={num_tokens} must exceed the cached prefix's "
                         f"{len(hit) * self.block_size} tokens (the last token is computed)")
      for block, h in zip(hit, prefix.hashes):
        if self._cache.get(h) != block:
          raise ValueError(f"stale prefix: block {block} no longer caches its hash")
      cache_salt = prefix.cache_salt
    needed = self.blocks_to_allocate(num_tokens, prefix)
    free = self.device_allocator.num_free_blocks
    if needed > free:
      raise NoFreeBlocksError(f"sequence {seq_id!r} needs {needed} blocks for {num_tokens} "
                              f"tokens, {free} free")
    for block in hit:  # before allocating: a hit block must not be evicted for this seq
      self.device_allocator.reuse(block)
    table = list(hit) + [self.device_allocator.allocate()
                         for _ in range(self.num_required_blocks(num_tokens) - len(hit))]
    entries = [self._entries[b] for b in hit]
    self._seqs[seq_id] = _Seq(table, num_tokens, entries, cache_salt)
    self._note_usage()
    return list(table)

  def blocks_to_allocate(self, num_tokens: int, prefix: CachedPrefix | None = None) -> int:
    """Free device blocks `allocate(.., num_tokens, prefix=prefix)` uses up: the new
    blocks plus the hit blocks nobody holds (they count as free until reused)."""
    hit = prefix.blocks if prefix is not None else ()
    dev = self.device_allocator
    return (self.num_required_blocks(num_tokens) - len(hit)
            + sum(dev.ref_counts[b] == 0 for b in hit))

  # ------------------------------------------------------------ prefix cache
  def lookup_prefix(self, token_ids: Sequence[int], *, cache_salt: str | None = None,
                    max_blocks: int | None = None) -> CachedPrefix:
    """The longest run of `token_ids`' first full blocks that is cached (at most
    `max_blocks`); changes nothing. Each hit is checked against the stored tokens and
    parent hash: a hash collision is a miss."""
    if not self.enable_caching:
      return CachedPrefix((), (), cache_salt)
    bs = self.block_size
    n = len(token_ids) // bs if max_blocks is None else min(max_blocks, len(token_ids) // bs)
    blocks, hashes = [], []
    parent = None
    for i in range(n):
      tokens = tuple(token_ids[i * bs:(i + 1) * bs])
      h = block_hash(parent, tokens, cache_salt)
      block = self._cache.get(h)
      if block is None:
        break
      if not self._verified(self._entries[block], parent, tokens):
        break  # a collision: never trust the hash alone
      blocks.append(block)
      hashes.append(h)
      parent = h
    return CachedPrefix(tuple(blocks), tuple(hashes), cache_salt)

  @staticmethod
  def _verified(entry: _CacheEntry, parent: bytes | None, tokens: tuple[int, ...]) -> bool:
    """A hit is real only if the block holds these tokens after this parent."""
    return entry.tokens == tokens and entry.parent == parent

  def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
    """Counts one admitted lookup (vLLM's prefix_cache_queries / _hits, in tokens)."""
    self.prefix_cache_queries += num_query_tokens
    self.prefix_cache_hits += num_hit_tokens

  def cache_full_blocks(self, seq_id: Hashable, token_slice: Callable[[int, int], Sequence[int]],
                        *, upto: int | None = None) -> None:
    """Registers the resident sequence's blocks that are full (every slot reserved)
    and not yet hashed; `token_slice(start, end)` gives its tokens at [start, end).
    `upto`: only blocks within the first `upto` tokens (slots reserved for tokens not
    drawn yet, by a multi-step decode, have no tokens to hash). A block whose hash is
    already cached elsewhere stays an uncached duplicate."""
    if not self.enable_caching:
      return
    seq = self._seqs.get(seq_id)
    if seq is None or seq.swapped:
      seq = self._get_resident(seq_id)  # (raises)
    bs = self.block_size
    end = seq.num_tokens if upto is None or upto > seq.num_tokens else upto
    if end // bs <= len(seq.entries) or not seq.cacheable:
      return  # (most calls: every decode step asks)
    for i in range(len(seq.entries), end // bs):
      parent = seq.entries[-1].hash if seq.entries else None
      tokens = tuple(token_slice(i * bs, (i + 1) * bs))
      entry = _CacheEntry(block_hash(parent, tokens, seq.cache_salt), parent, tokens)
      seq.entries.append(entry)
      self._register(seq.table[i], entry)

  def _register(self, block: int, entry: _CacheEntry) -> None:
    if entry.hash in self._cache or self.device_allocator.cached[block]:
      return
    self._cache[entry.hash] = block
    self._entries[block] = entry
    self.device_allocator.mark_cached(block)
    self.newly_cached.append(block)

  def _evicted(self, block: int) -> None:
    entry = self._entries.pop(block)
    del self._cache[entry.hash]

  def uncache(self, blocks: Iterable[int]) -> None:
    """Unregisters device blocks (e.g. those a failed step was to fill): no later
    lookup hits them; the sequences holding them keep them."""
    for block in blocks:
      entry = self._entries.pop(block, None)
      if entry is not None:
        del self._cache[entry.hash]
        self.device_allocator.uncache(block)

  def reset_prefix_cache(self) -> int:
    """Unregisters every cached block: unreferenced ones become free, referenced ones
    stay with their sequences (uncached). Returns how many blocks were freed."""
    dev = self.device_allocator
    freed = dev.num_evictable_blocks
    self.uncache(list(self._entries))
    return freed

  @property
  def num_cached_blocks(self) -> int:
    """Device blocks registered in the prefix cache (held or evictable)."""
    return len(self._entries)

  @property
  def num_evicted_blocks(self) -> int:
    return self.device_allocator.num_evicted

  def cache_entry(self, block: int) -> tuple[bytes, tuple[int, ...]] | None:
    """(hash, tokens) a cached device block holds, or None (tests, tools)."""
    entry = self._entries.get(block)
    return None if entry is None else (entry.hash, entry.tokens)

  def blocks_to_append(self, seq_id: Hashable, num_tokens: int = 1) -> int:
    """Device blocks `append_slots(seq_id, num_tokens)` takes (new blocks + a COW copy)."""
    # Per scheduled sequence per step: inline lookup.
    seq = self._seqs.get(seq_id)
    if seq is None or seq.swapped:
      self._get_resident(seq_id)  # raises the right error
    bs = self.block_size
    new_blocks = ceil_div(seq.num_tokens + num_tokens, bs) - len(seq.table)
    offset = seq.num_tokens % bs
    cow = offset != 0 and num_tokens > 0 and self.device_allocator.ref_counts[seq.table[-1]] > 1
    return new_blocks + cow

  def blocks_to_append_all(self, appends: Iterable[tuple[Hashable, int]]) -> int:
    """Device blocks that `append_slots(seq_id, n)` for every pair, in order, take together.

    A partly filled block shared by several of the sequences is copied for all but its
    last holder (the last one finds the block no longer shared), so this is less than the
    sum of `blocks_to_append` when forks write their first tokens together. Ids that do
    not exist yet count as `allocate(seq_id, n)`.
    """
    total = 0
    resident = []
    for seq_id, n in appends:
      seq = self._seqs.get(seq_id)
      if seq is None:
        total += self.num_required_blocks(n)
        continue
      if seq.swapped:
        self._get_resident(seq_id)  # raises the right error
      resident.append((seq, n))
    return total + self._append_need(resident, self.device_allocator.ref_counts.__getitem__)

  def _append_need(self, appends: Iterable[tuple[_Seq, int]],
                   holders: Callable[[int], int]) -> int:
    """New blocks + copy-on-write copies that appending n tokens to each sequence, in
    order, takes; `holders(block)`: how many tables hold the block. A partly filled
    block shared by several writers is copied for all but the last one."""
    bs = self.block_size
    total = 0
    writers: collections.Counter[int] = collections.Counter()
    for seq, n in appends:
      total += ceil_div(seq.num_tokens + n, bs) - len(seq.table)
      if n and seq.num_tokens % bs:
        writers[seq.table[-1]] += 1
    return total + sum(min(count, holders(block) - 1) for block, count in writers.items())

  def decode_block_need(self, seq_ids: Iterable[Hashable]) -> int | None:
    """Device blocks that one-slot appends to each of these distinct sequences take (as
    `blocks_to_append_all`), or None when one is unknown, swapped out, or would copy a
    shared partly filled block on write (the scheduler's steady-decode check)."""
    bs = self.block_size
    ref_counts = self.device_allocator.ref_counts
    need = 0
    for seq_id in seq_ids:
      seq = self._seqs.get(seq_id)
      if seq is None or seq.swapped:
        return None
      n, table = seq.num_tokens, seq.table
      if n >= len(table) * bs:
        need += ceil_div(n + 1, bs) - len(table)
      elif n % bs and ref_counts[table[-1]] > 1:
        return None
    return need

  def append_decode_slot(self, seq_id: Hashable) -> list[int]:
    """`append_slots(seq_id, 1)` of a sequence that `decode_block_need` accepted (no
    copy-on-write; its new block, if any, free), returning a copy of its block table:
    the scheduler's steady decode step, one call per sequence."""
    seq = self._seqs[seq_id]
    table, n = seq.table, seq.num_tokens
    if n >= len(table) * self.block_size:
      table.append(self.device_allocator.allocate())
      self._note_usage()
    seq.num_tokens = n + 1
    return list(table)

  def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
    """Whether `append_slots(seq_id, num_tokens)` has the blocks it may need."""
    return self.blocks_to_append(seq_id, num_tokens) <= self.device_allocator.num_free_blocks

  def append_slots(self, seq_id: Hashable, num_tokens: int) -> tuple[int, int] | None:
    """Reserves the slots of tokens `num_tokens(seq_id) ..` + num_tokens - 1 (a chunk).

    Full blocks get fresh blocks after them. A partly filled last block that is shared
    (ref count > 1, after `fork`) is copied on write: a fresh block replaces it in this
    table, the shared one loses a reference, and the returned copy op must run on the
    device before the write.

    Args:
      seq_id: A device-resident sequence.
      num_tokens: Slots to reserve, >= 0.

    Returns:
      The `(src_block, dst_block)` COW copy, or None.

    Raises:
      SequenceStateError: unknown or swapped-out sequence.
      ValueError: num_tokens < 0.
      NoFreeBlocksError: too few free blocks (nothing changed).
    """
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens} for sequence {seq_id!r}")
    need = self.blocks_to_append(seq_id, num_tokens)  # checks the id
    free = self.device_allocator.num_free_blocks
    if need > free:
      raise NoFreeBlocksError(f"sequence {seq_id!r} needs {need} blocks to append "
                              f"{num_tokens} tokens, {free} free")
    seq = self._seqs[seq_id]
    table = seq.table
    cow = None
    if num_tokens and seq.num_tokens % self.block_size:
      block = table[-1]
      if self.device_allocator.ref_counts[block] > 1:  # unchecked read: block is ours
        new_block = self.device_allocator.allocate()
        self.device_allocator.decref(block)  # > 1, so the block stays allocated
        table[-1] = new_block
        cow = (block, new_block)
    for _ in range(ceil_div(seq.num_tokens + num_tokens, self.block_size) - len(table)):
      table.append(self.device_allocator.allocate())
    seq.num_tokens += num_tokens
    self._note_usage()
    return cow

  def append_slot_in_place(self, seq_id: Hashable) -> bool:
    """Reserves one slot (a decode token) where it takes no block: the sequence's last
    block has room and is its own (no copy-on-write). Returns False, and changes
    nothing, otherwise (unknown or swapped-out ids included): then `append_slots`.
    (The scheduler's per-decode fast path: most decode steps take no block.)"""
    seq = self._seqs.get(seq_id)
    if seq is None or seq.swapped:
      return False
    n = seq.num_tokens
    table = seq.table
    if n >= len(table) * self.block_size:
      return False  # the last block is full (or there is none): a new block
    if n % self.block_size and self.device_allocator.ref_counts[table[-1]] > 1:
      return False  # shared partly filled block: copy-on-write
    seq.num_tokens = n + 1
    return True

  def append_slot(self, seq_id: Hashable) -> SlotRef:
    """Reserves the slot of token `num_tokens(seq_id)` (one decode token).

    Returns:
      The slot's `SlotRef(block_id, offset, cow)`; see `append_slots`.

    Raises:
      SequenceStateError: unknown or swapped-out sequence.
      NoFreeBlocksError: a block is needed and none is free.
    """
    offset = self.num_tokens(seq_id) % self.block_size if self.has_seq(seq_id) else 0
    cow = self.append_slots(seq_id, 1)
    block = self._seqs[seq_id].table[-1]
    return _tuple_new(SlotRef, (block, offset, cow))  # SlotRef(...) minus its ~0.2 us wrapper

  def fork_prefix(self, parent_id: Hashable, child_id: Hashable, num_blocks: int) -> None:
    """Makes new sequence `child_id` share the first `num_blocks` full blocks of the parent.

    Used to share a common prompt again after a recompute preemption: the child then
    holds `num_blocks * block_size` tokens and appends its own after them.

    Raises:
      SequenceStateError: unknown or swapped-out parent, or existing child id.
      ValueError: num_blocks < 1, or more than the parent's full blocks.
    """
    parent = self._get_resident(parent_id)
    if child_id in self._seqs:
      raise SequenceStateError(f"cannot fork onto sequence {child_id!r}: it already exists")
    full = parent.num_tokens // self.block_size
    if not 1 <= num_blocks <= full:
      raise ValueError(f"num_blocks must be in [1, {full}] (full blocks of sequence "
                       f"{parent_id!r}), got {num_blocks}")
    table = parent.table[:num_blocks]
    for block in table:
      self.device_allocator.incref(block)
    self._seqs[child_id] = _Seq(table, num_blocks * self.block_size,
                                parent.entries[:num_blocks], parent.cache_salt, parent.cacheable)

  # ----------------------------------------------------------- fork / free
  def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
    """Makes `child_id` share every block of `parent_id` (ref counts +1, no copy).

    Raises:
      SequenceStateError: unknown or swapped-out parent, or existing child id.
    """
    parent = self._get_resident(parent_id)
    if child_id in self._seqs:
      raise SequenceStateError(f"cannot fork onto sequence {child_id!r}: it already exists")
    for block in parent.table:
      self.device_allocator.incref(block)
    self._seqs[child_id] = _Seq(list(parent.table), parent.num_tokens, list(parent.entries),
                                parent.cache_salt, parent.cacheable)

  def free(self, seq_id: Hashable) -> None:
    """Drops the sequence (resident or swapped); unshared blocks return to their pool.

    Raises:
      SequenceStateError: unknown id (including a double free).
    """
    seq = self._get(seq_id)
    del self._seqs[seq_id]
    allocator = self.host_allocator if seq.swapped else self.device_allocator
    for block in reversed(seq.table):  # tail first: a cached chain's tail is evicted first
      allocator.decref(block)

  # ------------------------------------------------------------------- swap
  def can_swap_out(self, seq_ids: Hashable | Iterable[Hashable]) -> bool:
    """Whether the host pool can take the group's distinct blocks.

    Args:
      seq_ids: One id, or an iterable of ids moved together (see `swap_out`).

    Raises:
      SequenceStateError / ValueError: as `swap_out`, for a bad group.
    """
    _, counts = self._swap_group(seq_ids, swapped=False)
    return len(counts) <= self.host_allocator.num_free_blocks

  def swap_out(self, seq_ids: Hashable | Iterable[Hashable]) -> list[tuple[int, int]]:
    """Moves a group of resident sequences' blocks to the host pool.

    Blocks shared inside the group move once and keep their sharing. The group
    must be closed: no block of it may be held by a sequence outside it (swap
    a fork group as a whole); with prefix caching, a device block also held
    outside (a shared prefix) is copied and stays with its other holders. The freed device blocks can be handed out again
    at once, so the device layer must run these copies before any write of the
    step.

    Args:
      seq_ids: One id, or an iterable of ids (a tuple that is itself a known id
        counts as one id).

    Returns:
      Copy ops `(device_block, host_block)`, one per distinct block.

    Raises:
      SequenceStateError: unknown or already swapped id, or a group that is not
        closed.
      ValueError: an id listed twice.
      NoFreeBlocksError: too few free host blocks.
    """
    return self._move(seq_ids, to_host=True)

  def can_swap_in(self, seq_ids: Hashable | Iterable[Hashable], *, append: int = 0,
                  extra_blocks: int = 0, watermark: bool = True) -> bool:
    """Whether the device pool can take the group back (and then append to it).

    Args:
      seq_ids: One id, or an iterable of ids (see `swap_in`).
      append: Tokens each sequence appends right after (this step's decode): counts the
        new blocks and copy-on-write copies `append_slots` then takes, as
        `blocks_to_append_all` does for resident sequences.
      extra_blocks: Further device blocks to keep free.
      watermark: Keep the watermark free too (the scheduler drops it when nothing else
        runs: there is nothing left to grow, and a group that fits the cache alone must
        be able to come back).

    Raises:
      SequenceStateError / ValueError: as `swap_in`, for a bad group.
    """
    group, counts = self._swap_group(seq_ids, swapped=True)
    # A closed group holds each of its blocks `counts[block]` times, on the device too.
    need = (len(counts) + extra_blocks
            + self._append_need(((seq, append) for seq in group), counts.__getitem__))
    reserve = self.watermark_blocks if watermark else 0
    return need <= self.device_allocator.num_free_blocks - reserve

  def swap_in(self, seq_ids: Hashable | Iterable[Hashable]) -> list[tuple[int, int]]:
    """Moves a group of swapped-out sequences back to the device pool.

    The mirror of `swap_out`: shared blocks move once, the group must be closed.

    Returns:
      Copy ops `(host_block, device_block)`, one per distinct block.

    Raises:
      SequenceStateError: unknown or resident id, or a group that is not closed.
      ValueError: an id listed twice.
      NoFreeBlocksError: too few free device blocks (the watermark is not applied).
    """
    return self._move(seq_ids, to_host=False)

  # ------------------------------------------------------------------ stats
  def num_empty_slots(self) -> int:
    """`stats().empty_slots` (unfilled slots of used device blocks) in O(sequences): a
    block's holders share it at one logical index with one content (a partly filled
    block is copied before anyone writes to it), so only blocks at or past a holder's
    fill point can have empty slots; the engine reads it at every new peak."""
    bs = self.block_size
    ref_counts = self.device_allocator.ref_counts
    empty = 0
    fill: dict[int, int] = {}  # shared blocks: the fullest holder's fill
    for seq in self._seqs.values():
      if seq.swapped:
        continue
      table, n = seq.table, seq.num_tokens
      first = n // bs
      if first == len(table) - 1 and ref_counts[table[first]] == 1:
        empty += (first + 1) * bs - n  # (most sequences: one partly filled block, its own)
        continue
      for i in range(first, len(table)):
        block = table[i]
        fill[block] = max(fill.get(block, 0), min(bs, n - i * bs))
    return empty + sum(bs - f for f in fill.values())

  def stats(self) -> MemoryStats:
    """Current pool usage; O(total blocks held), not meant for the hot path."""
    bs = self.block_size
    filled: dict[int, int] = {}  # device block -> filled slots
    logical = 0
    num_swapped = 0
    for seq in self._seqs.values():
      if seq.swapped:
        num_swapped += 1
        continue
      logical += seq.num_tokens
      for i, block in enumerate(seq.table):
        # Sharers of a block hold it at the same logical index with the same content.
        filled[block] = max(filled.get(block, 0), min(bs, seq.num_tokens - i * bs))
    dev, host = self.device_allocator, self.host_allocator
    used = dev.num_used_blocks
    stored = sum(filled.values())
    empty = used * bs - stored
    return MemoryStats(
        block_size=bs,
        total_device_blocks=dev.num_blocks,
        free_device_blocks=dev.num_free_blocks,
        used_device_blocks=used,
        total_host_blocks=host.num_blocks,
        free_host_blocks=host.num_free_blocks,
        used_host_blocks=host.num_used_blocks,
        num_seqs=len(self._seqs),
        num_swapped_seqs=num_swapped,
        logical_tokens=logical,
        tokens_stored=stored,
        empty_slots=empty,
        fragmentation=empty / (used * bs) if used else 0.0,
        shared_blocks=sum(dev.ref_count(b) > 1 for b in filled),
        peak_used_blocks=self._peak_used,
    )

  # -------------------------------------------------------------- internals
  def _get(self, seq_id: Hashable) -> _Seq:
    seq = self._seqs.get(seq_id)
    if seq is None:
      raise SequenceStateError(f"unknown sequence id {seq_id!r}")
    return seq

  def _get_resident(self, seq_id: Hashable) -> _Seq:
    seq = self._get(seq_id)
    if seq.swapped:
      raise SequenceStateError(f"sequence {seq_id!r} is swapped out to host, not on device")
    return seq

  def _check_new(self, seq_id: Hashable, num_tokens: int) -> None:
    if num_tokens < 1:
      raise ValueError(f"num_tokens must be >= 1, got {num_tokens} for sequence {seq_id!r}")
    if seq_id in self._seqs:
      raise SequenceStateError(f"sequence id {seq_id!r} already exists")

  def _note_usage(self) -> None:
    used = self.device_allocator.num_used_blocks
    if used > self._peak_used:
      self._peak_used = used

  def _as_ids(self, seq_ids: Hashable | Iterable[Hashable]) -> list[Hashable]:
    try:
      if seq_ids in self._seqs:
        return [seq_ids]
    except TypeError:  # unhashable: a list or set of ids
      pass
    if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Iterable):
      return [seq_ids]
    return list(seq_ids)

  def _swap_group(self, seq_ids, *, swapped: bool) -> tuple[list[_Seq], dict[int, int]]:
    """Validates a swap group; returns its sequences and block -> holders in group."""
    ids = self._as_ids(seq_ids)
    dup = [i for i, n in collections.Counter(ids).items() if n > 1]
    if dup:
      raise ValueError(f"sequence ids listed more than once in swap group: {dup!r}")
    group = []
    for seq_id in ids:
      seq = self._get(seq_id)
      if seq.swapped != swapped:
        where = "already swapped out to host" if seq.swapped else "resident on device"
        raise SequenceStateError(f"cannot swap sequence {seq_id!r}: it is {where}")
      group.append(seq)
    counts: dict[int, int] = {}  # insertion order = order of the copy ops
    for seq in group:
      for block in seq.table:
        counts[block] = counts.get(block, 0) + 1
    src = self.host_allocator if swapped else self.device_allocator
    for block, holders in counts.items():
      # With prefix caching, a device block may also be held by other requests (a
      # prefix hit, cached then or since): the group takes a copy along and leaves the
      # block with them.
      if src.ref_count(block) != holders and (swapped or not self.enable_caching):
        outside = [i for i, s in self._seqs.items()
                   if s.swapped == swapped and i not in ids and block in s.table]
        raise SequenceStateError(
            f"block {block} of swap group {ids!r} is also held by sequences {outside!r}; "
            "swapping must move a whole fork group together")
    return group, counts

  def _move(self, seq_ids, *, to_host: bool) -> list[tuple[int, int]]:
    group, counts = self._swap_group(seq_ids, swapped=not to_host)
    src, dst = ((self.device_allocator, self.host_allocator) if to_host
                else (self.host_allocator, self.device_allocator))
    if len(counts) > dst.num_free_blocks:
      raise NoFreeBlocksError(f"swap group {self._as_ids(seq_ids)!r} needs {len(counts)} "
                              f"{'host' if to_host else 'device'} blocks, "
                              f"{dst.num_free_blocks} free")
    mapping = {}
    for block, holders in counts.items():
      new_block = dst.allocate()
      for _ in range(holders - 1):
        dst.incref(new_block)
      for _ in range(holders):
        src.decref(block)
      mapping[block] = new_block
    for seq in group:
      seq.table = [mapping[b] for b in seq.table]
      seq.swapped = to_host
    if not to_host:
      self._note_usage()
      for seq in group:
        if self.lossy_swap:  # rounded K/V: never shared through the cache
          seq.cacheable = False
        elif self.enable_caching:  # back on the device: register the blocks again
          for block, entry in zip(seq.table, seq.entries):
            self._register(block, entry)
    return list(mapping.items())
