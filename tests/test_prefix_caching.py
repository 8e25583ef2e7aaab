"""Automatic prefix caching: hashes, hits, eviction, salts, and outputs unchanged.

Block-manager level: the canonical salted hash, hits capped so the last token is
computed, LRU eviction tail first, free counts that include evictable blocks without
double counting, reset, swap interplay (the state machine in
test_block_manager_stateful.py covers random mixes). Engine level: token-identical
outputs with caching on and off (greedy, seeded n > 1, beams, chunked prefill, eviction
pressure and preemption in both modes), a shared prompt computed once in an offline
batch, counters, tenant isolation by cache salt with the other tenant's pages
poisoned, a hit block's K/V equal to a fresh prefill's, and a failed step's blocks
never hit afterwards.
"""

import hashlib

import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.core.block_manager import BlockManager, block_hash

SYSTEM = "You are a terse assistant. Answer in one line. Be exact. " * 2  # ~120 tokens
QUESTIONS = ["What is a page?", "def fib(n):", "Name a prime.", "Why cache KV?",
             "The paged ", "A block is "]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _tokens(outs):
  return [[c.token_ids for c in o.outputs] for o in outs]


# ------------------------------------------------------------------ block manager
def _filled(bm, seq_id, tokens, salt=None):
  bm.allocate(seq_id, len(tokens), cache_salt=salt)
  bm.cache_full_blocks(seq_id, lambda a, b: tokens[a:b])


def test_block_hash_is_sha256_over_a_canonical_encoding_rooted_in_the_salt():
  root = hashlib.sha256(b"pagedjax/prefix-cache/v1\0\0").digest()
  expected = hashlib.sha256(root + np.asarray([1, 2], "<i8").tobytes()).digest()
  assert block_hash(None, [1, 2]) == expected  # stable across processes: no hash()
  assert block_hash(None, (1, 2)) == block_hash(None, np.array([1, 2], np.int32))
  heads = {block_hash(None, [1, 2], s) for s in (None, "", "a", "b")}
  assert len(heads) == 4  # no salt, the empty salt and two tenants all differ
  assert block_hash(block_hash(None, [1, 2]), [3, 4]) != block_hash(None, [3, 4])
  assert block_hash(None, [1, 2]) != block_hash(None, [2, 1])


def test_lookup_hits_full_blocks_leaves_the_last_token_and_respects_salts():
  bm = BlockManager(8, 2, enable_caching=True)
  _filled(bm, "a", [1, 2, 3, 4, 5])  # blocks [1,2] [3,4] full, [5] not
  assert bm.num_cached_blocks == 2
  table = bm.block_table("a")
  assert bm.lookup_prefix([1, 2, 3, 4, 9]).blocks == tuple(table[:2])
  assert bm.lookup_prefix([1, 2, 3, 4], max_blocks=(4 - 1) // 2).blocks == (table[0],)
  assert bm.lookup_prefix([1, 2, 7, 4, 9]).blocks == (table[0],)  # chain breaks at block 1
  assert bm.lookup_prefix([1, 2, 3, 4, 9], cache_salt="t").blocks == ()  # unsalted != salted
  _filled(bm, "b", [1, 2, 3, 4, 5], salt="t")
  assert bm.lookup_prefix([1, 2, 3, 4, 9], cache_salt="t").blocks == tuple(bm.block_table("b")[:2])
  assert bm.lookup_prefix([1, 2, 3, 4, 9], cache_salt="u").blocks == ()
  assert set(bm.block_table("b")[:2]).isdisjoint(table)  # the tenants share nothing
  assert bm.cache_entry(table[1])[1] == (3, 4)
  off = BlockManager(8, 2)
  _filled(off, "a", [1, 2, 3, 4, 5])
  assert off.lookup_prefix([1, 2, 3, 4, 9]).blocks == () and off.num_cached_blocks == 0


def test_hash_collision_is_a_miss(monkeypatch):
  import pagedjax.core.block_manager as bm_module
  monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens, salt=None: b"same")
  bm = BlockManager(8, 2, enable_caching=True)
  _filled(bm, "a", [1, 2, 3])
  assert bm.lookup_prefix([1, 2, 9]).blocks == tuple(bm.block_table("a")[:1])
  assert bm.lookup_prefix([7, 7, 9]).blocks == ()  # same hash, other tokens: no hit


def test_eviction_is_lru_tail_first_and_free_counts_include_evictable_blocks():
  bm = BlockManager(4, 2, enable_caching=True)
  _filled(bm, "a", [1, 2, 3, 4])
  head, tail = bm.block_table("a")
  bm.free("a")
  assert bm.num_free_blocks == 4 and bm.device_allocator.num_evictable_blocks == 2
  bm.allocate("b", 6)  # two never-cached blocks, then one eviction: the chain's tail
  assert bm.num_evicted_blocks == 1 and head not in bm.block_table("b")
  assert bm.lookup_prefix([1, 2, 3, 4, 5]).blocks == (head,)
  assert bm.cache_entry(tail) is None and bm.num_cached_blocks == 1


def test_admission_counts_evictable_hits_once():
  bm = BlockManager(3, 2, enable_caching=True)
  _filled(bm, "a", [1, 2, 3, 4])
  bm.free("a")  # 3 free, 2 of them evictable hits for the next request
  hit = bm.lookup_prefix([1, 2, 3, 4, 5])
  assert len(hit.blocks) == 2
  assert bm.blocks_to_allocate(5, hit) == 3  # 1 new + 2 taken off the evictable list
  bm.allocate("b", 5, prefix=hit)
  assert bm.num_free_blocks == 0 and bm.block_table("b")[:2] == list(hit.blocks)
  bm.free("b")
  bm.allocate("c", 2)  # the never-cached block first: the cache survives
  assert bm.lookup_prefix([1, 2, 3, 4, 5]).blocks == hit.blocks


def test_reset_frees_unreferenced_cached_blocks_and_keeps_held_ones():
  bm = BlockManager(8, 2, enable_caching=True)
  _filled(bm, "a", [1, 2, 3, 4])
  _filled(bm, "b", [5, 6, 7, 8])
  bm.free("a")
  assert bm.reset_prefix_cache() == 2
  assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 6
  assert bm.lookup_prefix([5, 6, 7, 8, 9]).blocks == ()
  assert len(bm.block_table("b")) == 2  # b keeps its (now uncached) blocks
  bm.free("b")
  assert bm.num_free_blocks == 8


def test_swap_keeps_the_device_copy_cached_and_registers_again_on_swap_in():
  bm = BlockManager(6, 2, num_host_blocks=6, enable_caching=True)
  toks = [1, 2, 3, 4, 5]
  _filled(bm, "a", toks)
  hit = bm.lookup_prefix(toks)
  bm.allocate("b", 5, prefix=hit)  # shares a's two cached blocks
  out = bm.swap_out("a")  # allowed: the shared blocks are copied, b keeps them
  assert len(out) == 3 and bm.block_table("b")[:2] == list(hit.blocks)
  bm.free("b")  # the device copies stay cached (evictable) while a is on the host
  assert bm.lookup_prefix(toks).blocks == hit.blocks
  bm.reset_prefix_cache()
  back = dict(bm.swap_in("a"))
  table = bm.block_table("a")
  assert bm.lookup_prefix(toks).blocks == tuple(table[:2])  # registered again
  assert set(back.values()) == set(table)


def test_a_lossy_swap_in_never_feeds_the_cache_again():
  """A quantized host pool (swap_dtype) returns rounded K/V: the swapped-in sequence, its
  forks and everything it computes after are never registered, so no other request can
  hit values another request's preemption rounded."""
  bm = BlockManager(8, 2, num_host_blocks=6, enable_caching=True, lossy_swap=True)
  toks = [1, 2, 3, 4, 5]
  _filled(bm, "a", toks)
  bm.swap_out("a")
  bm.reset_prefix_cache()  # the exact device copies are gone
  bm.swap_in("a")
  assert bm.lookup_prefix(toks).blocks == () and bm.num_cached_blocks == 0
  bm.append_slots("a", 3)  # now 8 tokens: two more full blocks
  bm.cache_full_blocks("a", lambda i, j: (toks + [6, 7, 8])[i:j])
  bm.fork("a", "a2")
  bm.cache_full_blocks("a2", lambda i, j: (toks + [6, 7, 8])[i:j])
  assert bm.num_cached_blocks == 0
  _filled(bm, "c", [9, 9, 9, 9])  # other sequences still cache
  assert bm.num_cached_blocks == 2


# ------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def reference():
  """Outputs of the workload with caching off, on a pool with room for everything."""
  llm = LLM(num_blocks=256, max_num_seqs=8, enable_prefix_caching=False)
  prompts = [SYSTEM + q for q in QUESTIONS]
  mixed = [GREEDY, SamplingParams(n=2, max_tokens=10, temperature=0.9, seed=7),
           SamplingParams(use_beam_search=True, beam_width=2, max_tokens=8, temperature=0.0),
           GREEDY, SamplingParams(max_tokens=10, temperature=0.7, top_k=20, seed=3), GREEDY]
  return prompts, mixed, _tokens(llm.generate(prompts, mixed))


def test_outputs_identical_with_caching_and_a_shared_prompt_is_computed_once(reference):
  prompts, mixed, want = reference
  llm = LLM(num_blocks=256, max_num_seqs=8)
  assert llm.enable_prefix_caching  # on by default
  assert _tokens(llm.generate(prompts, mixed)) == want
  st = llm.memory_stats()
  lens = [len(llm.tokenizer.encode(p)) for p in prompts]
  shared = len(llm.tokenizer.encode(SYSTEM)) // 16  # full blocks of the common prefix
  # One offline batch: the first request computes the system prompt, the others hit it.
  assert st["prefix_cache_queries"] == sum(lens)
  assert st["prefix_cache_hits"] == (len(prompts) - 1) * shared * 16
  assert st["num_prefill_tokens"] == sum(lens) - st["prefix_cache_hits"]
  # Again: every request now hits all of its full prompt blocks but the last token's.
  assert _tokens(llm.generate(prompts, mixed)) == want
  hits = llm.memory_stats()["prefix_cache_hits"] - st["prefix_cache_hits"]
  assert hits == sum((n - 1) // 16 * 16 for n in lens)
  cached = llm.memory_stats()["num_cached_blocks"]
  assert cached > 0 and llm.reset_prefix_cache() == cached  # nothing runs: all unreferenced
  assert llm.memory_stats()["num_cached_blocks"] == 0
  assert llm.memory_stats()["num_free_blocks"] == 256


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_outputs_identical_under_eviction_pressure_preemption_and_chunks(reference, mode):
  prompts, mixed, want = reference
  llm = LLM(num_blocks=16, max_num_seqs=8, max_num_batched_tokens=64, preemption_mode=mode)
  for _ in range(2):
    assert _tokens(llm.generate(prompts, mixed)) == want
  st = llm.memory_stats()
  assert st["num_preemptions"] > 0 and st["num_evicted_blocks"] > 0
  assert st["prefix_cache_hits"] > 0
  assert st["num_free_blocks"] == 16 and st["num_running_seqs"] == 0


def _poison(llm, blocks):
  kv = llm.runner.kv
  idx = jnp.asarray(list(blocks))
  llm.runner.kv = kv.replace(k_pages=kv.k_pages.at[:, :, idx].set(jnp.nan),
                             v_pages=kv.v_pages.at[:, :, idx].set(jnp.nan))


def test_requests_never_read_another_salts_blocks():
  prompt = SYSTEM + QUESTIONS[0]
  want = _tokens(LLM(num_blocks=64, enable_prefix_caching=False).generate(prompt, GREEDY))
  llm = LLM(num_blocks=64)
  ids = llm.tokenizer.encode(prompt)
  assert _tokens(llm.generate({"prompt": prompt, "cache_salt": "tenant-a"}, GREEDY)) == want
  a_blocks = llm.bm.lookup_prefix(ids, cache_salt="tenant-a").blocks
  assert a_blocks and llm.memory_stats()["prefix_cache_hits"] == 0
  _poison(llm, a_blocks)  # tenant a's cached K/V become NaN
  for other in ({"prompt": prompt, "cache_salt": "tenant-b"}, prompt,
                {"prompt_token_ids": ids, "cache_salt": "tenant-b"}):
    assert _tokens(llm.generate(other, GREEDY)) == want  # never read a's pages
  assert llm.memory_stats()["prefix_cache_hits"] == (len(ids) - 1) // 16 * 16  # b hits b
  # The poison is real: tenant a itself now reads it.
  assert _tokens(llm.generate({"prompt": prompt, "cache_salt": "tenant-a"}, GREEDY)) != want


def test_hit_blocks_hold_the_kv_a_fresh_prefill_writes():
  prompt = SYSTEM + QUESTIONS[1]
  chunked = LLM(num_blocks=64, max_num_batched_tokens=32)  # computed in 32-token chunks
  chunked.generate(prompt, SamplingParams(max_tokens=1))
  ids = chunked.tokenizer.encode(prompt)
  hit = chunked.bm.lookup_prefix(ids, max_blocks=(len(ids) - 1) // 16).blocks
  assert len(hit) == (len(ids) - 1) // 16
  fresh = LLM(num_blocks=64, enable_prefix_caching=False)  # one whole prefill
  rid = fresh.add_request(None, prompt, SamplingParams(max_tokens=2))
  fresh.step()
  seq = fresh._groups[rid].seqs[0]
  table = fresh.bm.block_table(seq.seq_id)[:len(hit)]
  for pages in ("k_pages", "v_pages"):
    got = np.asarray(getattr(chunked.runner.kv, pages))[:, :, list(hit)]
    ref = np.asarray(getattr(fresh.runner.kv, pages))[:, :, table]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  fresh.abort_request(rid)


def test_a_failed_step_leaves_no_cached_garbage(monkeypatch):
  prompt = SYSTEM + QUESTIONS[2]
  want = _tokens(LLM(num_blocks=64, enable_prefix_caching=False).generate(prompt, GREEDY))
  llm = LLM(num_blocks=64)
  real = llm.runner.submit

  def fail(so, prev=None):
    raise RuntimeError("injected device failure")

  monkeypatch.setattr(llm.runner, "submit", fail)
  out = llm.generate(prompt, GREEDY)[0]
  assert out.outputs[0].finish_reason == "error"
  assert llm.memory_stats()["num_cached_blocks"] == 0  # the blocks it was to fill
  monkeypatch.setattr(llm.runner, "submit", real)
  assert _tokens(llm.generate(prompt, GREEDY)) == want
  assert llm.memory_stats()["num_free_blocks"] == 64


def test_async_scheduling_registers_every_full_block_of_known_tokens():
  """Under async scheduling a fed decode's own token is hashed when it arrives; the
  blocks before it are registered already when its step is built (the scheduler relies
  on this and skips the check), and the cache ends as scheduling after results leaves it."""
  prompts = [SYSTEM + q for q in QUESTIONS[:3]] + ["short"]
  mixed = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
           SamplingParams(max_tokens=35, temperature=0.8, seed=1, ignore_eos=True),
           SamplingParams(n=2, max_tokens=30, temperature=0.9, seed=2, ignore_eos=True),
           SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True)]
  caches = {}
  for async_scheduling in (True, False):
    llm = LLM(num_blocks=256, max_num_seqs=8, async_scheduling=async_scheduling)
    bm, sched = llm.scheduler.bm, llm.scheduler
    schedule, fed = sched.schedule, []

    def checked(ahead_of=None, schedule=schedule, bm=bm, fed=fed):
      so = schedule(ahead_of)
      for s in (so.seqs if so is not None else ()):
        if s.feed_row >= 0:
          fed.append(s.start)
          entry = bm._seqs[s.seq.seq_id]
          assert not entry.cacheable or len(entry.entries) == s.start // bm.block_size
      return so

    sched.schedule = checked
    outs = _tokens(llm.generate(prompts, mixed))
    assert bool(fed) == async_scheduling
    assert {s % 16 for s in fed} == set(range(16)) or not async_scheduling
    caches[async_scheduling] = (outs, set(bm._cache))
  assert caches[True] == caches[False]
