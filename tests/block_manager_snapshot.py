"""Test helper: a deep, comparable copy of all of a BlockManager's state.

Reads private fields on purpose: "a failed act leaves every table and count
exactly as it was" must cover state the public API does not show (free-list
order, the peak counter).
"""

from pagedjax.core.block_manager import BlockManager


def snapshot(bm: BlockManager) -> dict:
  return {
      "seqs": {sid: (list(s.table), s.num_tokens, s.swapped, list(s.entries), s.cache_salt)
               for sid, s in bm._seqs.items()},
      "device": (list(bm.device_allocator._free), list(bm.device_allocator.ref_counts),
                 list(bm.device_allocator._evictable), list(bm.device_allocator.cached)),
      "cache": (dict(bm._cache), dict(bm._entries), list(bm.newly_cached)),
      "host": (list(bm.host_allocator._free), list(bm.host_allocator.ref_counts)),
      "peak": bm._peak_used,
  }
