"""Stateful property test: random allocate / append / fork / free / swap runs.

A hypothesis state machine drives a small BlockManager (allocate, append one token or a
chunk, fork, fork a prefix, free, swap) against a reference
model made of plain dicts: each sequence's token list, where it lives, its fork
family, and fake device / host page memory `(block, offset) -> token`. Every
act's copy ops (COW, swaps) are executed on that fake memory and every token is
written through the slots the manager hands out, so any slot given to two
sequences, any missed copy-on-write and any wrong swap mapping shows up as a
sequence reading back the wrong tokens. After every step it also checks:
ref count == number of tables holding the block (both pools); free + used ==
total; no block both free and referenced; a write never lands in a shared
block; `can_*` agree with the acts; failed acts change nothing. Teardown frees
everything and checks that every block is back.

Half the runs turn prefix caching on: every act that fills blocks registers them
(`cache_full_blocks`), a rule allocates new sequences from a cached prefix of an
earlier sequence's tokens under one of a few salts, and rules reset and unregister
the cache. A reference map (block -> salt and the whole token prefix it ends) checks
each hit (right salt, right tokens, the longest cached run) and, through the fake pages,
that a cached block still holds what its hash was computed over; the hash maps, the
evictable list and the counts must agree with the reference after every step.

Default: 200 runs x 50 steps; PAGEDJAX_LONG_TESTS=1: 2000 runs x 100 steps.
"""

import collections
import os

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule, run_state_machine_as_test)

from block_manager_snapshot import snapshot
import pagedjax.core.block_manager as bm_module
from pagedjax.core.block_manager import BlockManager, NoFreeBlocksError, SequenceStateError

_LONG = os.environ.get("PAGEDJAX_LONG_TESTS") == "1"


class BlockManagerMachine(RuleBasedStateMachine):

  @initialize(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(1, 16),
              num_host_blocks=st.integers(0, 8),
              prompts=st.lists(st.integers(1, 8), min_size=1, max_size=4),
              caching=st.booleans())
  def setup(self, block_size, num_blocks, num_host_blocks, prompts, caching):
    self.bm = BlockManager(num_blocks, block_size, num_host_blocks, enable_caching=caching)
    self.caching = caching
    self.salt: dict[int, str | None] = {}  # seq -> cache salt
    self.content: dict[int, tuple] = {}  # cached block -> (salt, token prefix it ends)
    self.history: list[tuple[str | None, list[int]]] = []  # (salt, tokens) seen
    self.bs = block_size
    self.tokens: dict[int, list[int]] = {}  # seq -> token values, the reference content
    self.swapped: dict[int, bool] = {}
    self.family: dict[int, int] = {}  # seq -> root of its fork lineage
    self.mem = {False: {}, True: {}}  # swapped? -> {(block, offset): token}: fake pages
    self.next_id = 0
    self.next_token = 0
    # Start with sequences: swarm testing disables some rules per run, allocate included.
    for num_tokens in prompts:
      self.allocate(num_tokens)

  # ------------------------------------------------------------ helpers
  def _new_id(self) -> int:
    self.next_id += 1
    return self.next_id

  def _fresh_tokens(self, n: int) -> list[int]:
    self.next_token += n
    return list(range(self.next_token - n, self.next_token))

  def _holders(self, on_host: bool) -> collections.Counter:
    """block -> number of tables holding it, from the tables alone."""
    return collections.Counter(b for sid, sw in self.swapped.items() if sw == on_host
                               for b in self.bm.block_table(sid))

  def _free(self, on_host: bool) -> int:
    total = self.bm.num_host_blocks if on_host else self.bm.num_blocks
    return total - len(self._holders(on_host))

  def _expect_failure(self, act, exc, match=None):
    before = snapshot(self.bm)
    try:
      act()
    except exc as e:
      assert match is None or match in str(e), (match, str(e))
    else:
      raise AssertionError(f"expected {exc.__name__}")
    assert snapshot(self.bm) == before, "failed act changed state"

  def _copy(self, src_pool: bool, src: int, dst_pool: bool, dst: int) -> None:
    for offset in range(self.bs):
      value = self.mem[src_pool].get((src, offset))
      if value is None:
        self.mem[dst_pool].pop((dst, offset), None)
      else:
        self.mem[dst_pool][(dst, offset)] = value

  def _register(self, sid: int) -> None:
    """What the scheduler does after each allocation: register the full blocks."""
    if not self.caching or self.swapped[sid]:
      return
    self.bm.newly_cached = []
    self.bm.cache_full_blocks(sid, lambda a, b: self.tokens[sid][a:b])
    self._note_cached(sid)

  def _note_cached(self, sid: int) -> None:
    table = self.bm.block_table(sid)
    for block in self.bm.newly_cached:
      i = table.index(block)
      self.content[block] = (self.salt[sid], tuple(self.tokens[sid][:(i + 1) * self.bs]))
    self.bm.newly_cached = []
    self.history.append((self.salt[sid], list(self.tokens[sid])))

  def _pick(self, data, *, swapped=None) -> int | None:
    """A known sequence (in the given pool), or None when there is none."""
    ids = sorted(s for s, sw in self.swapped.items() if swapped is None or sw == swapped)
    return data.draw(st.sampled_from(ids)) if ids else None

  # -------------------------------------------------------------- rules
  @rule(num_tokens=st.integers(1, 8))
  def allocate(self, num_tokens):
    sid = self._new_id()
    fits = -(-num_tokens // self.bs) <= self._free(False)
    assert self.bm.can_allocate(sid, num_tokens) == fits
    if not fits:
      event("allocate: pool full")
      self._expect_failure(lambda: self.bm.allocate(sid, num_tokens), NoFreeBlocksError)
      return
    self.bm.allocate(sid, num_tokens)
    toks = self._fresh_tokens(num_tokens)
    for slot, tok in zip(self.bm.slot_mapping(sid, 0, num_tokens).tolist(), toks):
      self.mem[False][divmod(slot, self.bs)] = tok
    self.tokens[sid], self.swapped[sid], self.family[sid] = toks, False, sid
    self.salt[sid] = None
    self._register(sid)

  @precondition(lambda self: self.caching and self.history)
  @rule(data=st.data(), num_new=st.integers(1, 4), salt=st.sampled_from([None, "a", "b"]))
  def allocate_from_cache(self, data, num_new, salt):
    """A new sequence starting with an earlier sequence's tokens, looked up in the cache."""
    old_salt, old = data.draw(st.sampled_from(self.history))
    keep = data.draw(st.one_of(st.just(len(old)), st.integers(0, len(old))))
    salt = data.draw(st.sampled_from([old_salt, old_salt, salt]))
    toks = old[:keep] + self._fresh_tokens(num_new)
    max_blocks = (len(toks) - 1) // self.bs
    hit = self.bm.lookup_prefix(toks, cache_salt=salt, max_blocks=max_blocks)
    cached = {b: c for b, c in self.content.items() if self.bm.device_allocator.cached[b]}
    for i, block in enumerate(hit.blocks):  # right salt and the whole prefix
      assert cached[block] == (salt, tuple(toks[:(i + 1) * self.bs]))
    k = len(hit.blocks)
    if k < max_blocks:  # the longest run: the next block is not cached
      assert (salt, tuple(toks[:(k + 1) * self.bs])) not in cached.values()
    if k:
      event("allocate_from_cache: hit")
    sid = self._new_id()
    need = self.bm.blocks_to_allocate(len(toks), hit)
    assert need == -(-len(toks) // self.bs) - k + sum(
        self.bm.device_allocator.ref_count(b) == 0 for b in hit.blocks)
    if need > self._free(False):
      event("allocate_from_cache: pool full")
      self._expect_failure(lambda: self.bm.allocate(sid, len(toks), prefix=hit),
                           NoFreeBlocksError)
      return
    evicted = self.bm.num_evicted_blocks
    self.bm.allocate(sid, len(toks), prefix=hit, cache_salt=salt)
    if self.bm.num_evicted_blocks > evicted:
      event("allocate_from_cache: evicted")
    assert self.bm.block_table(sid)[:k] == list(hit.blocks)
    for slot, tok in zip(self.bm.slot_mapping(sid, k * self.bs, len(toks)).tolist(),
                         toks[k * self.bs:]):
      assert self.bm.device_allocator.ref_count(slot // self.bs) == 1
      self.mem[False][divmod(slot, self.bs)] = tok
    self.tokens[sid], self.swapped[sid], self.family[sid] = toks, False, sid
    self.salt[sid] = salt
    self._register(sid)

  @precondition(lambda self: self.caching)
  @rule()
  def reset_prefix_cache(self):
    evictable = self.bm.device_allocator.num_evictable_blocks
    free = self.bm.num_free_blocks
    assert self.bm.reset_prefix_cache() == evictable
    assert self.bm.num_cached_blocks == 0 and self.bm.device_allocator.num_evictable_blocks == 0
    assert self.bm.num_free_blocks == free

  @precondition(lambda self: self.caching)
  @rule(data=st.data())
  def uncache_some(self, data):
    cached = [b for b in range(self.bm.num_blocks) if self.bm.device_allocator.cached[b]]
    if cached:
      drop = data.draw(st.lists(st.sampled_from(cached), max_size=3))
      free = self.bm.num_free_blocks
      self.bm.uncache(drop)
      assert not any(self.bm.device_allocator.cached[b] for b in drop)
      assert self.bm.num_free_blocks == free

  @rule(data=st.data())
  def append(self, data):
    sid = self._pick(data)
    if sid is None:
      return
    if self.swapped[sid]:
      self._expect_failure(lambda: self.bm.append_slot(sid), SequenceStateError, repr(sid))
      return
    n = len(self.tokens[sid])
    table = self.bm.block_table(sid)
    needs = n % self.bs == 0 or self._holders(False)[table[-1]] > 1
    assert self.bm.blocks_to_append(sid) == int(needs)
    fits = not needs or self._free(False) >= 1
    assert self.bm.can_append(sid) == fits
    if not fits:
      event("append: pool full")
      self._expect_failure(lambda: self.bm.append_slot(sid), NoFreeBlocksError, repr(sid))
      return
    ref = self.bm.append_slot(sid)
    if ref.cow is not None:
      event("append: copy-on-write")
      assert n % self.bs and ref.cow == (table[-1], ref.block_id)
      self._copy(False, ref.cow[0], False, ref.cow[1])
    # The write: never into a block another sequence can see.
    assert self.bm.device_allocator.ref_count(ref.block_id) == 1
    assert self._holders(False)[ref.block_id] == 1
    assert (ref.offset, self.bm.block_table(sid)[-1]) == (n % self.bs, ref.block_id)
    tok = self._fresh_tokens(1)[0]
    self.mem[False][(ref.block_id, ref.offset)] = tok
    self.tokens[sid].append(tok)
    self._register(sid)

  @rule(data=st.data(), num_new=st.integers(0, 9))
  def append_chunk(self, data, num_new):
    """append_slots: a prefill chunk of num_new tokens (COW first if the last block is shared)."""
    sid = self._pick(data)
    if sid is None:
      return
    if self.swapped[sid]:
      self._expect_failure(lambda: self.bm.append_slots(sid, num_new), SequenceStateError,
                           repr(sid))
      return
    n = len(self.tokens[sid])
    table = self.bm.block_table(sid)
    cow = num_new > 0 and n % self.bs != 0 and self._holders(False)[table[-1]] > 1
    needs = -(-(n + num_new) // self.bs) - len(table) + cow
    assert self.bm.blocks_to_append(sid, num_new) == needs
    fits = needs <= self._free(False)
    assert self.bm.can_append(sid, num_new) == fits
    if not fits:
      event("append_chunk: pool full")
      self._expect_failure(lambda: self.bm.append_slots(sid, num_new), NoFreeBlocksError,
                           repr(sid))
      return
    op = self.bm.append_slots(sid, num_new)
    assert (op is not None) == cow
    if op is not None:
      event("append_chunk: copy-on-write")
      assert op[0] == table[-1]
      self._copy(False, op[0], False, op[1])
    slots = self.bm.slot_mapping(sid, n, n + num_new).tolist()
    for slot, tok in zip(slots, self._fresh_tokens(num_new)):
      block, offset = divmod(slot, self.bs)
      assert self.bm.device_allocator.ref_count(block) == 1  # never a shared block
      self.mem[False][(block, offset)] = tok
      self.tokens[sid].append(tok)
    self._register(sid)

  @rule(data=st.data(), num_new=st.integers(0, 3))
  def append_family(self, data, num_new):
    """A fork family appends together (a decode step): blocks_to_append_all is exact."""
    sid = self._pick(data, swapped=False)
    if sid is None:
      return
    family = [s for s, sw in sorted(self.swapped.items())
              if not sw and self.family[s] == self.family[sid]]
    need = self.bm.blocks_to_append_all((s, num_new) for s in family)
    free = self._free(False)
    if need > free:
      event("append_family: pool full")
      return
    for s in family:
      n = len(self.tokens[s])
      op = self.bm.append_slots(s, num_new)
      if op is not None:
        self._copy(False, op[0], False, op[1])
      for slot, tok in zip(self.bm.slot_mapping(s, n, n + num_new).tolist(),
                           self._fresh_tokens(num_new)):
        assert self.bm.device_allocator.ref_count(slot // self.bs) == 1
        self.mem[False][divmod(slot, self.bs)] = tok
        self.tokens[s].append(tok)
      self._register(s)
    assert free - self._free(False) == need  # exactly what was predicted
    if len(family) > 1 and need < sum(1 for _ in family):
      event("append_family: last holder kept the shared block")

  @rule(data=st.data(), num_blocks=st.integers(0, 4))
  def fork_prefix(self, data, num_blocks):
    """fork_prefix: a new sequence shares the parent's first full blocks."""
    parent = self._pick(data)
    if parent is None:
      return
    child = self._new_id()
    if self.swapped[parent]:
      self._expect_failure(lambda: self.bm.fork_prefix(parent, child, max(num_blocks, 1)),
                           SequenceStateError, repr(parent))
      return
    full = len(self.tokens[parent]) // self.bs
    if not 1 <= num_blocks <= full:
      self._expect_failure(lambda: self.bm.fork_prefix(parent, child, num_blocks), ValueError,
                           "num_blocks")
      return
    self.bm.fork_prefix(parent, child, num_blocks)
    self.tokens[child] = self.tokens[parent][:num_blocks * self.bs]
    self.swapped[child], self.family[child] = False, self.family[parent]
    self.salt[child] = self.salt[parent]

  @rule(data=st.data())
  def fork(self, data):
    parent = self._pick(data)
    if parent is None:
      return
    child = self._new_id()
    if self.swapped[parent]:
      self._expect_failure(lambda: self.bm.fork(parent, child), SequenceStateError, repr(parent))
      return
    self.bm.fork(parent, child)
    self.tokens[child] = list(self.tokens[parent])
    self.swapped[child], self.family[child] = False, self.family[parent]
    self.salt[child] = self.salt[parent]

  @rule(data=st.data())
  def free(self, data):
    sid = self._pick(data)
    if sid is None:
      return
    self.bm.free(sid)
    del self.tokens[sid], self.swapped[sid], self.family[sid], self.salt[sid]

  @rule(data=st.data(), op=st.sampled_from(
      ["append_slot", "free", "fork", "swap_out", "swap_in", "num_tokens", "slot_mapping"]))
  def act_on_unknown_id(self, data, op):
    sid = data.draw(st.sampled_from([i for i in range(-2, self.next_id + 1) if i not in self.tokens]))
    act = {
        "fork": lambda: self.bm.fork(sid, self._new_id()),
        "slot_mapping": lambda: self.bm.slot_mapping(sid, 0, 1),
    }.get(op, lambda: getattr(self.bm, op)(sid))
    self._expect_failure(act, SequenceStateError, repr(sid))

  @rule(data=st.data(), whole_family=st.booleans(), to_host=st.booleans())
  def swap(self, data, whole_family, to_host):
    sid = self._pick(data, swapped=not to_host)
    if sid is None:
      return
    group = ([s for s, sw in self.swapped.items()
              if sw != to_host and self.family[s] == self.family[sid]]
             if whole_family else [sid])
    ids = group if whole_family else sid  # both call forms
    tables = {s: self.bm.block_table(s) for s in group}
    blocks = list(dict.fromkeys(b for s in group for b in tables[s]))
    holders = self._holders(not to_host)
    in_group = collections.Counter(b for s in group for b in tables[s])
    # With caching, device blocks shared with other requests leave with a copy.
    closed = all(holders[b] == in_group[b] for b in blocks) or (to_host and self.caching)
    can = self.bm.can_swap_out if to_host else self.bm.can_swap_in
    act = self.bm.swap_out if to_host else self.bm.swap_in
    if not closed:
      assert not whole_family  # a fork family never shares blocks across pools
      event("swap: group not closed")
      self._expect_failure(lambda: can(ids), SequenceStateError, "whole fork group")
      self._expect_failure(lambda: act(ids), SequenceStateError, "whole fork group")
      return
    fits = len(blocks) <= self._free(to_host)
    assert can(ids) == fits
    if not fits:
      event("swap: pool full")
      self._expect_failure(lambda: act(ids), NoFreeBlocksError)
      return
    self.bm.newly_cached = []
    ops = act(ids)
    if len(ops) < sum(len(t) for t in tables.values()):
      event("swap: shared blocks moved once")
    assert [src for src, _ in ops] == blocks  # each distinct block moves exactly once
    for src, dst in ops:
      self._copy(not to_host, src, to_host, dst)
    mapping = dict(ops)
    for s in group:
      self.swapped[s] = to_host
      assert self.bm.block_table(s) == [mapping[b] for b in tables[s]]  # sharing kept
    if self.caching and not to_host:  # swap-in registered the blocks again
      registered = list(self.bm.newly_cached)
      for s in group:
        self.bm.newly_cached = [b for b in registered if b in self.bm.block_table(s)]
        self._note_cached(s)
      if registered:
        event("swap: blocks registered again on swap-in")

  # --------------------------------------------------------- invariants
  @invariant()
  def pools_and_tables_agree(self):
    if not hasattr(self, "bm"):
      return
    for on_host, alloc in ((False, self.bm.device_allocator), (True, self.bm.host_allocator)):
      holders = self._holders(on_host)
      free = alloc._free + list(alloc._evictable)
      assert [alloc.ref_count(b) for b in range(alloc.num_blocks)] == [
          holders[b] for b in range(alloc.num_blocks)]
      assert len(free) == len(set(free)) == alloc.num_free_blocks
      assert set(free) == {b for b in range(alloc.num_blocks) if holders[b] == 0}
      assert alloc.num_free_blocks + alloc.num_used_blocks == alloc.num_blocks
      # Evictable = cached and unreferenced; never-cached free blocks are on the stack.
      assert set(alloc._evictable) == {b for b in range(alloc.num_blocks)
                                       if alloc.cached[b] and holders[b] == 0}
      assert not any(alloc.cached[b] for b in alloc._free)

  @invariant()
  def cache_maps_agree(self):
    if not hasattr(self, "bm"):
      return
    bm, dev = self.bm, self.bm.device_allocator
    assert not any(self.bm.host_allocator.cached)
    assert set(bm._entries) == {b for b in range(bm.num_blocks) if dev.cached[b]}
    assert {b: e.hash for b, e in bm._entries.items()} == {b: h for h, b in bm._cache.items()}
    assert len(bm._cache) == len(bm._entries) == bm.num_cached_blocks
    for block, entry in bm._entries.items():
      salt, prefix = self.content[block]
      tokens = prefix[-self.bs:]
      # What the hash was computed over is what the block holds (fake pages).
      assert entry.tokens == tokens
      assert [self.mem[False].get((block, o)) for o in range(self.bs)] == list(tokens)
      assert entry.hash == bm_module.block_hash(entry.parent, tokens, salt if entry.parent is None else None)
    if not self.caching:
      assert not bm._entries and not dev._evictable
    elif bm.num_evicted_blocks:
      event("cache: blocks evicted")

  @invariant()
  def every_sequence_reads_back_its_tokens(self):
    if not hasattr(self, "bm"):
      return
    assert self.bm.stats().num_seqs == len(self.tokens)
    for sid, toks in self.tokens.items():
      assert self.bm.num_tokens(sid) == len(toks)
      assert self.bm.is_swapped(sid) == self.swapped[sid]
      table = self.bm.block_table(sid)
      assert len(table) == -(-len(toks) // self.bs)
      mem = self.mem[self.swapped[sid]]
      assert [mem.get((table[p // self.bs], p % self.bs)) for p in range(len(toks))] == toks
      if not self.swapped[sid]:
        assert self.bm.slot_mapping(sid, 0, len(toks)).tolist() == [
            table[p // self.bs] * self.bs + p % self.bs for p in range(len(toks))]

  @invariant()
  def stats_add_up(self):
    if not hasattr(self, "bm"):
      return
    s = self.bm.stats()
    holders = self._holders(False)
    assert s.used_device_blocks == len(holders) <= s.peak_used_blocks
    assert s.used_host_blocks == len(self._holders(True))
    assert s.tokens_stored + s.empty_slots == s.used_device_blocks * self.bs
    assert self.bm.num_empty_slots() == s.empty_slots
    assert 0 <= s.empty_slots < max(1, s.used_device_blocks) * self.bs
    assert s.logical_tokens == sum(len(t) for sid, t in self.tokens.items()
                                   if not self.swapped[sid])
    assert s.shared_blocks == sum(1 for c in holders.values() if c > 1)

  def teardown(self):
    if not hasattr(self, "bm"):
      return
    for sid in list(self.tokens):
      self.bm.free(sid)
    for alloc in (self.bm.device_allocator, self.bm.host_allocator):
      assert alloc.num_free_blocks == alloc.num_blocks
      assert not any(alloc.ref_counts)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=2000 if _LONG else 200,
    stateful_step_count=100 if _LONG else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


@pytest.mark.parametrize("bug", ["skip_cow", "drop_refs_on_swap", "hash_ignores_salt",
                                 "trust_hash_alone"])
def test_machine_catches_injected_bugs(bug, monkeypatch):
  """The machine must fail on a manager that skips COW, loses ref counts on swap, lets
  salts share blocks, or trusts a colliding hash."""
  if bug == "hash_ignores_salt":
    original_hash = bm_module.block_hash
    monkeypatch.setattr(bm_module, "block_hash", lambda p, t, salt=None: original_hash(p, t))
  elif bug == "trust_hash_alone":
    # Every block collides with every other; only the token check keeps hits right.
    monkeypatch.setattr(bm_module, "block_hash",
                        lambda p, t, salt=None: bytes(32) if p is None else p)
    monkeypatch.setattr(bm_module.BlockManager, "_verified", staticmethod(lambda *a: True))
  elif bug == "skip_cow":
    def append_slot(self, seq_id):  # writes into a shared block without copying it
      seq = self._get_resident(seq_id)
      if seq.num_tokens % self.block_size == 0:
        seq.table.append(self.device_allocator.allocate())
      seq.num_tokens += 1
      return bm_module.SlotRef(seq.table[-1], (seq.num_tokens - 1) % self.block_size, None)
    monkeypatch.setattr(bm_module.BlockManager, "append_slot", append_slot)
  else:
    original = bm_module.BlockManager._swap_group
    def swap_group(self, seq_ids, *, swapped):  # moved blocks get ref count 1
      group, counts = original(self, seq_ids, swapped=swapped)
      return group, dict.fromkeys(counts, 1)
    monkeypatch.setattr(bm_module.BlockManager, "_swap_group", swap_group)
  # AssertionError from a check; ValueError when teardown's free() then trips on the bug.
  with pytest.raises((AssertionError, ValueError)):
    run_state_machine_as_test(
        BlockManagerMachine,
        # derandomize: the same search every run, so a pass is no coin flip (a random
        # search of this budget once missed the salt bug in CI). The search depends on
        # the machine's code: adding an invariant moved the salt bug from within 300
        # examples to past 400; the budget is 1000 (each case stops at its first failure)
        settings=settings(max_examples=1000, stateful_step_count=30, deadline=None,
                          database=None, phases=[Phase.generate], derandomize=True,
                          suppress_health_check=list(HealthCheck)))
