"""Unit tests for BlockManager: each op, copy-on-write, swapping, stats, errors.

Every failing act is checked to leave a full snapshot of the manager unchanged.
"""

import re

import numpy as np
import pytest

from block_manager_snapshot import snapshot
from pagedjax.core.block_manager import (BlockManager, NoFreeBlocksError, SequenceStateError,
                                    SlotRef)


def _expected_slots(table, block_size, start, end):
  return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@pytest.mark.parametrize("kwargs", [
    dict(num_blocks=0, block_size=4), dict(num_blocks=4, block_size=0),
    dict(num_blocks=4, block_size=4, num_host_blocks=-1),
    dict(num_blocks=4, block_size=4, watermark=1.0),
    dict(num_blocks=4, block_size=4, watermark=-0.1),
])
def test_constructor_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    BlockManager(**kwargs)


# ------------------------------------------------------------------ allocate
@pytest.mark.parametrize("num_tokens, num_blocks", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_allocate_takes_ceil_blocks_and_maps_slots(num_tokens, num_blocks):
  bm = BlockManager(8, 4)
  table = bm.allocate("a", num_tokens)
  assert len(table) == num_blocks == len(set(table)) == bm.num_required_blocks(num_tokens)
  assert bm.block_table("a") == table
  assert bm.num_tokens("a") == num_tokens
  assert bm.num_free_blocks == 8 - num_blocks
  slots = bm.slot_mapping("a", 0, num_tokens)
  assert slots.dtype == np.int32
  assert slots.tolist() == _expected_slots(table, 4, 0, num_tokens)
  assert bm.slot_mapping("a", 2 % num_tokens, num_tokens).tolist() == (
      _expected_slots(table, 4, 2 % num_tokens, num_tokens))


def test_block_table_is_a_copy():
  bm = BlockManager(4, 4)
  bm.allocate(0, 5)
  bm.block_table(0).append(3)
  assert len(bm.block_table(0)) == 2


def test_sequences_get_disjoint_blocks():
  bm = BlockManager(10, 2)
  tables = [bm.allocate(i, 3 + i) for i in range(3)]
  flat = [b for t in tables for b in t]
  assert len(flat) == len(set(flat)) == 2 + 2 + 3


def test_watermark_applies_to_can_allocate_but_not_allocate():
  bm = BlockManager(10, 4, watermark=0.2)  # keep 2 blocks free
  assert bm.watermark_blocks == 2
  assert bm.can_allocate("a", 32)  # 8 blocks, leaves 2
  assert not bm.can_allocate("a", 33)  # 9 blocks, leaves 1
  bm.allocate("a", 33)
  assert bm.num_free_blocks == 1


# -------------------------------------------------------------------- append
def test_append_fills_block_then_allocates_next():
  bm = BlockManager(8, 4)
  (first,) = bm.allocate("a", 2)
  refs = [bm.append_slot("a") for _ in range(3)]
  assert refs[0] == SlotRef(first, 2, None)
  assert refs[1] == SlotRef(first, 3, None)
  assert refs[2].offset == 0 and refs[2].cow is None and refs[2].block_id != first
  assert bm.block_table("a") == [first, refs[2].block_id]
  assert bm.num_tokens("a") == 5
  assert bm.slot_mapping("a", 2, 5).tolist() == [r.block_id * 4 + r.offset for r in refs]


def test_append_at_block_boundary_with_no_free_block_fails_cleanly():
  bm = BlockManager(2, 4)
  bm.allocate("a", 8)
  assert bm.blocks_to_append("a") == 1
  assert not bm.can_append("a")
  before = snapshot(bm)
  with pytest.raises(NoFreeBlocksError):
    bm.append_slot("a")
  assert snapshot(bm) == before


def test_append_slot_in_place_only_where_no_block_is_taken():
  """The scheduler's decode fast path: one slot in the sequence's own last block, else
  False with nothing changed (then append_slots: a new block, or copy-on-write)."""
  bm = BlockManager(8, 4, num_host_blocks=8)
  bm.allocate("a", 3)
  before = snapshot(bm)
  assert bm.append_slot_in_place("a")  # slot 3 of block 0
  assert bm.num_tokens("a") == 4 and bm.block_table("a") == before["seqs"]["a"][0]
  assert bm.num_free_blocks == 7
  before = snapshot(bm)
  assert not bm.append_slot_in_place("a")  # block 0 is full: a new block
  assert snapshot(bm) == before
  bm.append_slots("a", 1)
  bm.fork("a", "b")  # "a"'s last block (1 of 4 slots) is now shared
  before = snapshot(bm)
  assert not bm.append_slot_in_place("a") and not bm.append_slot_in_place("b")  # COW
  assert not bm.append_slot_in_place("nobody")
  assert snapshot(bm) == before
  bm.free("b")
  assert bm.append_slot_in_place("a")  # the block is its own again
  bm.swap_out("a")
  before = snapshot(bm)
  assert not bm.append_slot_in_place("a")  # swapped out
  assert snapshot(bm) == before


def test_decode_block_need_counts_as_blocks_to_append_all_or_declines():
  """The scheduler's steady-decode check on fresh random pools: one-slot appends to
  distinct sequences take what blocks_to_append_all says; None (nothing changed) for
  unknown or swapped-out ids and a shared partly filled last block (copy-on-write).
  append_decode_slot then does what append_slots(seq_id, 1) does."""
  for case in range(30):
    def build():
      r = np.random.default_rng(case)
      bm = BlockManager(64, 4, num_host_blocks=16)
      ids = [f"s{i}" for i in range(int(r.integers(1, 8)))]
      for sid in ids:
        bm.allocate(sid, int(r.integers(1, 13)))
      if r.random() < 0.5:
        bm.append_slots(ids[0], int(r.integers(0, 5)))
      return bm, ids
    bm, ids = build()
    before = snapshot(bm)
    assert bm.decode_block_need(ids) == bm.blocks_to_append_all((s, 1) for s in ids)
    assert snapshot(bm) == before
    twin, _ = build()
    tables = [twin.append_decode_slot(s) for s in ids]
    for sid in ids:
      bm.append_slots(sid, 1)
    assert snapshot(twin) == snapshot(bm) and tables == [bm.block_table(s) for s in ids]
    tables[0].append(-1)  # (a copy)
    assert twin.block_table(ids[0]) == bm.block_table(ids[0])
    bm.fork(ids[0], "child")
    shared_partial = bm.num_tokens(ids[0]) % 4 != 0
    need = bm.decode_block_need(ids)
    assert need is None if shared_partial else need == bm.blocks_to_append_all(
      (s, 1) for s in ids)
    assert bm.decode_block_need(ids + ["nobody"]) is None
    bm.free("child")
    bm.swap_out([ids[-1]])
    assert bm.decode_block_need(ids) is None
    assert bm.decode_block_need(ids[:-1]) == bm.blocks_to_append_all((s, 1) for s in ids[:-1])


def test_append_inside_a_block_needs_no_free_block():
  bm = BlockManager(2, 4)
  bm.allocate("a", 7)
  assert bm.num_free_blocks == 0
  assert bm.blocks_to_append("a") == 0 and bm.can_append("a")
  assert bm.append_slot("a").offset == 3


# ---------------------------------------------------------- fork / COW / free
def test_fork_shares_blocks_and_cow_on_partial_last_block():
  bm = BlockManager(8, 4)
  parent = bm.allocate("p", 6)  # 2 blocks, last one half full
  bm.fork("p", "c")
  assert bm.block_table("c") == parent and bm.num_tokens("c") == 6
  assert [bm.device_allocator.ref_count(b) for b in parent] == [2, 2]
  assert bm.stats().shared_blocks == 2
  assert bm.blocks_to_append("c") == 1

  ref = bm.append_slot("c")  # writes slot 2 of the shared block: copy first
  assert ref.cow == (parent[1], ref.block_id)
  assert ref.block_id not in parent and ref.offset == 2
  assert bm.block_table("c") == [parent[0], ref.block_id]
  assert bm.block_table("p") == parent
  assert [bm.device_allocator.ref_count(b) for b in parent] == [2, 1]
  assert bm.device_allocator.ref_count(ref.block_id) == 1

  # The parent now owns its last block alone: no copy.
  assert bm.append_slot("p") == SlotRef(parent[1], 2, None)


def test_fork_with_full_last_block_appends_without_cow():
  bm = BlockManager(8, 4)
  parent = bm.allocate("p", 8)
  bm.fork("p", "c")
  ref = bm.append_slot("c")
  assert ref.cow is None and ref.offset == 0 and ref.block_id not in parent
  assert bm.block_table("c") == parent + [ref.block_id]
  assert all(bm.device_allocator.ref_count(b) == 2 for b in parent)


def test_cow_without_a_free_block_fails_cleanly():
  bm = BlockManager(2, 4)
  bm.allocate("p", 5)
  bm.fork("p", "c")
  assert bm.num_free_blocks == 0 and not bm.can_append("c")
  before = snapshot(bm)
  with pytest.raises(NoFreeBlocksError):
    bm.append_slot("c")
  assert snapshot(bm) == before


def test_free_releases_blocks_only_when_last_holder_goes():
  bm = BlockManager(4, 4)
  table = bm.allocate("p", 5)
  bm.fork("p", "c")
  bm.free("p")
  assert not bm.has_seq("p") and bm.num_free_blocks == 2
  assert [bm.device_allocator.ref_count(b) for b in table] == [1, 1]
  bm.free("c")
  assert bm.num_free_blocks == 4
  with pytest.raises(SequenceStateError, match="'c'"):
    bm.free("c")  # double free


# ---------------------------------------------------------------------- swap
def test_swap_single_sequence_round_trip():
  bm = BlockManager(4, 4, num_host_blocks=4)
  table = bm.allocate("a", 6)
  assert bm.can_swap_out("a")
  ops = bm.swap_out("a")
  host_table = bm.block_table("a")
  assert ops == list(zip(table, host_table))
  assert bm.is_swapped("a") and bm.num_tokens("a") == 6
  assert bm.num_free_blocks == 4 and bm.host_allocator.num_free_blocks == 2
  for act in (lambda: bm.append_slot("a"), lambda: bm.slot_mapping("a", 0, 1),
              lambda: bm.fork("a", "b"), lambda: bm.blocks_to_append("a")):
    with pytest.raises(SequenceStateError, match="'a' is swapped out"):
      act()
  assert bm.can_swap_in("a") and not bm.can_swap_in("a", extra_blocks=3)
  back = bm.swap_in("a")
  assert [h for h, _ in back] == host_table
  assert bm.block_table("a") == [d for _, d in back]
  assert not bm.is_swapped("a") and bm.num_tokens("a") == 6
  assert bm.host_allocator.num_free_blocks == 4 and bm.num_free_blocks == 2
  assert bm.append_slot("a").offset == 2


def test_fork_group_swaps_shared_blocks_once_and_keeps_sharing():
  bm = BlockManager(16, 4, num_host_blocks=8)
  bm.allocate("p", 10)  # blocks: full, full, half
  bm.fork("p", "c1")
  bm.fork("p", "c2")
  bm.append_slot("c1")  # COW of the half block
  bm.append_slot("c2")
  group = ["p", "c1", "c2"]
  logical = sum(len(bm.block_table(s)) for s in group)
  assert logical == 9
  ops = bm.swap_out(group)
  assert len(ops) == 5  # 2 shared + 3 private blocks, not 9
  assert len({d for d, _ in ops}) == len({h for _, h in ops}) == 5
  assert bm.num_free_blocks == 16 and bm.host_allocator.num_free_blocks == 3
  host = {s: bm.block_table(s) for s in group}
  assert host["p"][:2] == host["c1"][:2] == host["c2"][:2]
  assert [bm.host_allocator.ref_count(b) for b in host["p"]] == [3, 3, 1]

  back = bm.swap_in(("c2", "c1", "p"))
  assert len(back) == 5
  dev = {s: bm.block_table(s) for s in group}
  assert dev["p"][:2] == dev["c1"][:2] == dev["c2"][:2]
  assert len({dev["p"][2], dev["c1"][2], dev["c2"][2]}) == 3
  assert [bm.device_allocator.ref_count(b) for b in dev["c1"]] == [3, 3, 1]
  assert bm.host_allocator.num_free_blocks == 8 and bm.num_free_blocks == 11
  assert bm.stats().shared_blocks == 2


@pytest.mark.parametrize("seed", range(6))
def test_can_swap_in_with_append_counts_exactly_what_swap_in_and_the_appends_take(seed):
  """A swapped fork group (random prompt, forks, private tokens) comes back and each
  sequence appends one token: can_swap_in(append=1) holds with exactly that many free
  blocks and not one fewer (it once asked one extra block per sequence, so a group that
  fits the cache alone could never come back: an empty step with work left)."""
  bs = 4

  def swapped_group():
    rng = np.random.default_rng(seed)
    bm = BlockManager(64, bs, num_host_blocks=64)
    bm.allocate("s0", int(rng.integers(1, 14)))
    group = ["s0"]
    for i in range(1, int(rng.integers(1, 5))):
      bm.fork(group[int(rng.integers(len(group)))], f"s{i}")
      group.append(f"s{i}")
    for s in group:
      bm.append_slots(s, int(rng.integers(0, 6)))
    bm.swap_out(group)
    return bm, group

  trial, group = swapped_group()  # the truth: swap in, append, count
  free = trial.num_free_blocks
  trial.swap_in(group)
  for s in group:
    trial.append_slots(s, 1)
  bm, group = swapped_group()
  need = free - trial.num_free_blocks
  filler = bm.allocate("other", bs * (free - need))  # leaves exactly `need` free
  assert len(filler) == free - need and bm.num_free_blocks == need
  assert bm.can_swap_in(group, append=1, watermark=False)
  assert not bm.can_swap_in(group, append=1, watermark=False, extra_blocks=1)
  bm.free("other")
  bm.allocate("other", bs * (free - need + 1))
  assert not bm.can_swap_in(group, append=1, watermark=False)


def test_tuple_seq_id_is_one_id_not_a_group():
  bm = BlockManager(4, 4, num_host_blocks=4)
  bm.allocate((1, 2), 3)
  assert len(bm.swap_out((1, 2))) == 1
  assert bm.is_swapped((1, 2))


def test_empty_swap_group_is_a_no_op():
  bm = BlockManager(4, 4, num_host_blocks=4)
  bm.allocate("a", 3)
  before = snapshot(bm)
  assert bm.can_swap_out([]) and bm.swap_out([]) == []
  assert snapshot(bm) == before


# --------------------------------------------------------------------- stats
def test_stats_count_sharing_fragmentation_and_peak():
  bm = BlockManager(10, 4, num_host_blocks=3)
  s = bm.stats()
  assert (s.used_device_blocks, s.tokens_stored, s.empty_slots, s.fragmentation) == (0, 0, 0, 0.0)
  bm.allocate("p", 5)  # 2 blocks, 3 empty slots
  bm.fork("p", "c")
  bm.allocate("q", 4)  # 1 full block
  bm.allocate("r", 2)  # swapped below
  bm.swap_out("r")
  s = bm.stats()
  assert s.as_dict() == dict(
      block_size=4, total_device_blocks=10, free_device_blocks=7, used_device_blocks=3,
      total_host_blocks=3, free_host_blocks=2, used_host_blocks=1, num_seqs=4,
      num_swapped_seqs=1, logical_tokens=14, tokens_stored=9, empty_slots=3,
      fragmentation=3 / 12, shared_blocks=2, peak_used_blocks=4)
  bm.append_slot("c")  # COW: 2 -> ..., one more block
  s = bm.stats()
  assert (s.used_device_blocks, s.tokens_stored, s.shared_blocks) == (4, 11, 1)
  for seq in ("p", "c", "q", "r"):
    bm.free(seq)
  s = bm.stats()
  assert (s.used_device_blocks, s.used_host_blocks, s.num_seqs) == (0, 0, 0)
  assert s.peak_used_blocks == 4


# -------------------------------------------------------- failures are clean
@pytest.fixture
def full_manager():
  """Device pool full: 'p' and fork 'c' share 2 blocks (last half full), 'big'
  holds 6 full blocks; 's' is swapped out (1 host block of 4)."""
  bm = BlockManager(8, 4, num_host_blocks=4)
  bm.allocate("s", 3)
  bm.swap_out("s")
  bm.allocate("p", 6)
  bm.fork("p", "c")
  bm.allocate("big", 24)
  assert bm.num_free_blocks == 0
  return bm


FAILING_ACTS = [
    ("allocate no blocks", lambda bm: bm.allocate("x", 1), NoFreeBlocksError, "'x' needs 1"),
    ("allocate existing", lambda bm: bm.allocate("p", 1), SequenceStateError, "'p' already"),
    ("allocate swapped id", lambda bm: bm.allocate("s", 1), SequenceStateError, "'s'"),
    ("allocate zero tokens", lambda bm: bm.allocate("x", 0), ValueError, "got 0"),
    ("append cow no block", lambda bm: bm.append_slot("c"), NoFreeBlocksError, "'c'"),
    ("append new block none", lambda bm: bm.append_slot("big"), NoFreeBlocksError,
     "'big'"),
    ("append swapped", lambda bm: bm.append_slot("s"), SequenceStateError, "'s'"),
    ("append unknown", lambda bm: bm.append_slot("zz"), SequenceStateError, "'zz'"),
    ("fork onto existing", lambda bm: bm.fork("p", "big"), SequenceStateError, "'big'"),
    ("fork swapped parent", lambda bm: bm.fork("s", "y"), SequenceStateError, "'s'"),
    ("fork unknown parent", lambda bm: bm.fork("zz", "y"), SequenceStateError, "'zz'"),
    ("free unknown", lambda bm: bm.free("zz"), SequenceStateError, "'zz'"),
    ("swap out half a fork group", lambda bm: bm.swap_out("p"), SequenceStateError,
     "whole fork group"),
    ("swap out group with unknown id", lambda bm: bm.swap_out(["p", "c", "zz"]),
     SequenceStateError, "'zz'"),
    ("swap out no host blocks", lambda bm: bm.swap_out(["p", "c", "big"]), NoFreeBlocksError,
     "needs 8 host blocks, 3 free"),
    ("swap out swapped", lambda bm: bm.swap_out("s"), SequenceStateError, "'s'"),
    ("swap out duplicate id", lambda bm: bm.swap_out(["p", "c", "p"]), ValueError, "'p'"),
    ("swap in no device blocks", lambda bm: bm.swap_in("s"), NoFreeBlocksError,
     "needs 1 device"),
    ("swap in resident", lambda bm: bm.swap_in("big"), SequenceStateError, "'big'"),
    ("slot_mapping past end", lambda bm: bm.slot_mapping("p", 0, 7), ValueError, "'p'"),
    ("slot_mapping swapped", lambda bm: bm.slot_mapping("s", 0, 1), SequenceStateError, "'s'"),
]


@pytest.mark.parametrize("name, act, exc, match", FAILING_ACTS, ids=[a[0] for a in FAILING_ACTS])
def test_failed_act_raises_and_changes_nothing(full_manager, name, act, exc, match):
  before = snapshot(full_manager)
  with pytest.raises(exc, match=re.escape(match)):
    act(full_manager)
  assert snapshot(full_manager) == before


def test_can_checks_agree_with_failing_acts(full_manager):
  bm = full_manager
  assert not bm.can_allocate("x", 1)
  assert not bm.can_append("c") and not bm.can_append("big")
  assert bm.can_swap_out(["p", "c"]) and not bm.can_swap_out(["p", "c", "big"])
  assert not bm.can_swap_in("s")
  with pytest.raises(SequenceStateError, match="whole fork group"):
    bm.can_swap_out("c")
  with pytest.raises(SequenceStateError, match="'p' already exists"):
    bm.can_allocate("p", 1)


def test_swap_out_without_host_pool():
  bm = BlockManager(4, 4)
  bm.allocate("a", 1)
  assert not bm.can_swap_out("a")
  with pytest.raises(NoFreeBlocksError):
    bm.swap_out("a")
