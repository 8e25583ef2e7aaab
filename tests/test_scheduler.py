"""Scheduler policy on the host only (no model): packed steps, chunks, preemption, liveness.

A fake device answers every sample row with a token derived from the row's sequence
(and, for beams, K candidates with made-up logprobs), so these tests run the real
scheduler + block manager for thousands of steps in seconds.
"""

import dataclasses
import os
import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pagedjax.core.block_manager import BlockManager
from pagedjax.core.scheduler import Scheduler, StepResult, max_blocks_needed
from pagedjax.core.sequence import SequenceGroup, SequenceStatus
from pagedjax.sampling_params import SamplingParams

EOS = 0
K = 16


def _group(i, prompt_len, **params):
  params.setdefault("max_tokens", 8)
  params.setdefault("ignore_eos", True)
  return SequenceGroup(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(**params),
                       arrival=i, seed=i)


def _make(num_blocks=8, block_size=4, host=8, mode="recompute", max_num_seqs=4, budget=64,
          max_model_len=512, chunked=True):
  bm = BlockManager(num_blocks, block_size, host, watermark=0.01)
  return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       max_model_len=max_model_len, eos_token_ids=(EOS,), preemption_mode=mode,
                       enable_chunked_prefill=chunked)


def _fake_result(out):
  rows = [(s, j) for s in out.seqs for j in s.sample_indices]
  r = max(len(rows), 1)
  tokens = np.array([3 + (s.seq.num_tokens + j) % 5 for s, j in rows] or [0])
  top_ids = np.tile(np.arange(1, K + 1), (r, 1))
  top_lps = -np.tile(np.arange(K, dtype=np.float64), (r, 1)) - 0.01 * np.arange(r)[:, None]
  return StepResult(tokens, -np.ones(r), np.ones(r, int), top_ids, top_lps)


def _step(sched):
  out = sched.schedule()
  sched.update_from_output(out, _fake_result(out), on_error=lambda g, e: pytest.fail(repr(e)))
  return out


def _blocks_held(bm):
  return bm.num_blocks - bm.num_free_blocks


def test_admission_is_fcfs_within_max_num_seqs():
  _, s = _make(num_blocks=16, max_num_seqs=2)
  for i in range(3):
    s.add(_group(i, 5))
  out = _step(s)
  assert [q.group.request_id for q in out.seqs] == ["r0", "r1"]
  assert [len(q.token_ids) for q in out.seqs] == [5, 5] and out.num_batched_tokens == 10
  assert [g.request_id for g in s.waiting] == ["r2"]
  out = _step(s)  # the running pair decodes; r2 waits for a seat
  assert [(q.start, len(q.token_ids)) for q in out.seqs] == [(5, 1), (5, 1)]


def test_long_prompt_is_chunked_while_decodes_continue():
  _, s = _make(num_blocks=64, block_size=4, budget=8, max_num_seqs=4)
  s.add(_group(0, 3, max_tokens=20))
  _step(s)  # r0 prefilled, now decoding
  s.add(_group(1, 30))
  chunks = []
  while s.waiting or any(not g.is_decode_ready() for g in s.running):
    out = _step(s)
    kinds = {q.group.request_id: len(q.token_ids) for q in out.seqs}
    assert kinds["r0"] == 1  # the decode is served every step
    assert out.num_batched_tokens <= 8
    chunks.append(kinds.get("r1", 0))
  assert chunks == [7, 7, 7, 7, 2]  # 30 tokens in chunks of what the budget leaves
  assert s.running[1].seqs[0].num_computed_tokens == 30


def test_chunked_prefill_off_waits_for_a_whole_prompt():
  _, s = _make(num_blocks=64, block_size=4, budget=8, chunked=False)
  s.add(_group(0, 3, max_tokens=20))
  _step(s)
  s.add(_group(1, 8))
  out = _step(s)  # 1 decode + 8 > 8: the prompt waits for a step with room
  assert [q.group.request_id for q in out.seqs] == ["r0"]


def test_recompute_preempts_latest_arrival_and_requeues_it():
  bm, s = _make(num_blocks=4, block_size=4, mode="recompute")
  s.add(_group(0, 4))
  s.add(_group(1, 4))
  _step(s)  # both prompts fill one block each
  for _ in range(4):
    out = _step(s)
    assert not out.preempted
  # Both now hold 8 tokens in 2 blocks each; the next token needs a 3rd block each.
  out = _step(s)
  assert [g.request_id for g in out.preempted] == ["r1"]
  assert [q.group.request_id for q in out.seqs] == ["r0"]
  assert [g.request_id for g in s.waiting] == ["r1"]
  seq = s.waiting[0].seqs[0]
  assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
  assert not bm.has_seq(seq.seq_id)
  assert s.num_preemptions == {"recompute": 1, "swap": 0}


def test_swap_preemption_and_swap_in_in_arrival_order():
  bm, s = _make(num_blocks=4, block_size=4, host=8, mode="swap")
  s.add(_group(0, 4))
  s.add(_group(1, 4))
  for _ in range(5):
    _step(s)
  out = _step(s)
  assert [g.request_id for g in out.preempted] == ["r1"] and len(out.swap_out) == 2
  victim = s.swapped[0]
  assert bm.is_swapped(victim.seqs[0].seq_id)
  s.add(_group(2, 1))  # arrived later than r1: must wait for it
  s.finish_seq(s.running[0].seqs[0], "abort")
  s.drop_finished()
  out = _step(s)
  assert len(out.swap_in) == 2 and not s.swapped
  ids = [q.group.request_id for q in out.seqs]
  assert ids[0] == "r1" and (out.seqs[0].start, len(out.seqs[0].token_ids)) == (8, 1)


def test_issue_livelock_n2_recompute_regrefill_is_chunked():
  """The issue's case: n=2 over 239-token prompts in 40 blocks of 16 with a 512 budget."""
  bm, s = _make(num_blocks=40, block_size=16, host=0, max_num_seqs=64, budget=512)
  for i in range(2):
    s.add(_group(i, 239, n=2, max_tokens=60, temperature=0.8))
  steps = 0
  while s.has_unfinished():
    out = _step(s)
    assert out.num_batched_tokens <= 512
    steps += 1
    assert steps < 2000, "no progress"
  assert s.num_preemptions["recompute"] > 0
  assert bm.num_free_blocks == bm.num_blocks


def test_forked_group_shares_its_prompt_again_after_recompute():
  """After a recompute, sample 1 forks sample 0's prompt blocks instead of recomputing them."""
  bm, s = _make(num_blocks=64, block_size=4, host=0, max_num_seqs=8, budget=64)
  g = _group(0, 10, n=3, max_tokens=6)
  s.add(g)
  for _ in range(3):
    _step(s)
  s.recompute(g)
  assert g.shared_prefix_tokens == 8
  computed = []
  while not g.is_decode_ready():
    out = _step(s)
    computed += [(q.seq.sample_index, q.start, len(q.token_ids)) for q in out.seqs]
  # Sample 0 recomputes up to its last token; the others start after the shared 8.
  assert computed[0] == (0, 0, 12)
  assert sorted(c for c in computed[1:]) == [(1, 8, 4), (2, 8, 4)]
  tables = [bm.block_table(q.seq_id) for q in g.seqs]
  assert tables[0][:2] == tables[1][:2] == tables[2][:2]
  while s.has_unfinished():
    _step(s)
  assert bm.num_free_blocks == bm.num_blocks


def test_max_blocks_needed_counts_the_prompt_once():
  # The issue's example: n=4 over a 69-token prompt + 32 tokens, blocks of 8.
  need = max_blocks_needed(69, 32, 4, block_size=8, max_model_len=512)
  assert need == 8 + 4 * -(-(69 + 32 - 1 - 64) // 8)  # 8 shared + 4 x 5 own = 28
  assert max_blocks_needed(69, 32, 1, block_size=8, max_model_len=512) == -(-100 // 8)
  assert max_blocks_needed(10, 1000, 1, block_size=8, max_model_len=64) == 8  # 63 cached


def test_a_swapped_fork_group_that_fits_the_cache_alone_comes_back():
  """Hypothesis found it: a 2-block cache, an n=2 group swapped out while another ran;
  once alone it needs the whole cache (its shared block swapped in, a copy-on-write
  block for one fork's next token). Swap-in asked one block per sequence on top, plus
  the watermark with nothing running: every later step was empty."""
  reqs = [dict(max_tokens=1, temperature=0.0, ignore_eos=False),
          dict(max_tokens=1, temperature=0.0, ignore_eos=False),
          dict(max_tokens=2, temperature=0.0, ignore_eos=False),
          dict(max_tokens=2, n=2, temperature=1.0)]
  bm, s = _make(num_blocks=2, block_size=4, host=1, mode="swap", max_num_seqs=3, budget=4,
                chunked=False)
  groups = [_group(i, 1, **kw) for i, kw in enumerate(reqs)]
  for g in groups:
    s.add(g)
  swapped = False
  for _ in range(20):
    if not s.has_unfinished():
      break
    out = _step(s)
    assert out.seqs or out.swap_in or out.swap_out, "an empty step with work left"
    swapped |= bool(out.swap_out)
  assert swapped and all(g.is_finished for g in groups)
  assert bm.num_free_blocks == 2 and bm.host_allocator.num_free_blocks == 1


# ---------------------------------------------------------------- liveness property
_EXAMPLES = int(os.environ.get("PAGEDJAX_HYPOTHESIS_EXAMPLES", "150"))

_request = st.fixed_dictionaries({
    "prompt": st.integers(1, 60),
    "max_tokens": st.integers(1, 30),
    "kind": st.sampled_from(["greedy", "n2", "n3", "beam2", "beam3"]),
    "arrive": st.integers(0, 20),
})


@given(requests=st.lists(_request, min_size=1, max_size=8),
       block_size=st.sampled_from([4, 8, 16]), budget_blocks=st.integers(1, 6),
       slack=st.integers(0, 12), mode=st.sampled_from(["recompute", "swap"]),
       host=st.integers(0, 40), max_num_seqs=st.integers(3, 8), chunked=st.booleans())
@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_request_finishes_within_a_bounded_number_of_steps(
    requests, block_size, budget_blocks, slack, mode, host, max_num_seqs, chunked):
  """Any budget the constructor accepts, any cache that fits the largest request alone."""
  budget = max(budget_blocks * block_size, max_num_seqs)
  groups = []
  for i, r in enumerate(requests):
    width = int(r["kind"][-1]) if r["kind"] != "greedy" else 1
    kw = dict(max_tokens=r["max_tokens"], ignore_eos=r["kind"] != "greedy")
    if r["kind"].startswith("beam"):
      kw.update(use_beam_search=True, beam_width=width, n=1, temperature=0.0)
    elif width > 1:
      kw.update(n=width, temperature=1.0)
    else:
      kw.update(temperature=0.0)
    prompt = r["prompt"] if chunked else min(r["prompt"], budget)
    groups.append((r["arrive"], _group(i, prompt, **kw)))
  need = max(max_blocks_needed(len(g.prompt_token_ids), g.params.max_tokens, g.width,
                               block_size=block_size, max_model_len=512) for _, g in groups)
  bm, s = _make(num_blocks=need + slack, block_size=block_size, host=host, mode=mode,
                max_num_seqs=max_num_seqs, budget=budget, chunked=chunked)
  pending = sorted(groups, key=lambda x: x[0])
  total_work = sum(len(g.prompt_token_ids) + g.params.max_tokens for _, g in groups)
  step = 0
  while pending or s.has_unfinished():
    while pending and pending[0][0] <= step:
      s.add(pending.pop(0)[1])
    if s.has_unfinished():
      out = s.schedule()
      assert out.num_batched_tokens <= budget
      assert sum(g.num_seats for g in s.running) <= max_num_seqs
      assert out.seqs or out.swap_in or out.swap_out, "an empty step with work left"
      s.update_from_output(out, _fake_result(out), on_error=lambda g, e: pytest.fail(repr(e)))
    step += 1
    # Generous but finite: preemption may redo work, never forever.
    assert step < 50 * total_work + 100, "no progress (livelock)"
  assert bm.num_free_blocks == bm.num_blocks
  assert bm.host_allocator.num_free_blocks == bm.num_host_blocks
  for _, g in groups:
    assert g.is_finished


@pytest.mark.parametrize("policy, per_seq", [("max", 512 // 16), ("pow2", 128 // 16),
                                             ("oracle", -(-100 // 16))])
def test_reservation_policies_admit_by_reserved_blocks_and_never_preempt(policy, per_seq):
  """The paper's Orca baselines: admission by reserved blocks; nothing is preempted."""
  from pagedjax.core.block_manager import BlockManager
  from pagedjax.core.scheduler import Scheduler
  from pagedjax.core.sequence import SequenceGroup
  from pagedjax.sampling_params import SamplingParams

  bm = BlockManager(64, 16, 0)
  sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=4096, max_model_len=512,
                    reservation=policy)
  assert sched.reserved_blocks(90, 10, 1) == per_seq
  assert sched.reserved_blocks(90, 10, 2) == 2 * per_seq
  params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
  for i in range(10):
    sched.add(SequenceGroup(str(i), list(range(90)), params, arrival=i, seed=0))
  out = sched.schedule()
  admitted = len({s.group.request_id for s in out.seqs})
  assert admitted == min(10, 64 // per_seq)
  with pytest.raises(ValueError, match="reservation"):
    Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512,
              reservation="half")


def test_recomputed_forked_group_that_becomes_decode_ready_stays_within_the_budget():
  """Found by the liveness property: a recomputed n=2 group whose second sequence re-shares
  the prompt became decode-ready inside schedule() after decodes were counted, and its two
  decodes went past max_num_batched_tokens."""
  reqs = [(0, _group(i, 1, max_tokens=1, temperature=0.0, ignore_eos=False)) for i in range(5)]
  reqs += [(1, _group(5, 1, max_tokens=13, use_beam_search=True, beam_width=2, n=1,
                      temperature=0.0)),
           (1, _group(6, 36, max_tokens=2, n=2, temperature=1.0)),
           (0, _group(7, 1, max_tokens=9, temperature=0.0, ignore_eos=False))]
  need = max(max_blocks_needed(len(g.prompt_token_ids), g.params.max_tokens, g.width,
                               block_size=4, max_model_len=512) for _, g in reqs)
  bm, s = _make(num_blocks=need + 2, block_size=4, host=0, max_num_seqs=7, budget=7)
  pending = sorted(reqs, key=lambda x: x[0])
  step = 0
  while pending or s.has_unfinished():
    while pending and pending[0][0] <= step:
      s.add(pending.pop(0)[1])
    if s.has_unfinished():
      out = s.schedule()
      assert out.num_batched_tokens <= 7, (step, out)
      s.update_from_output(out, _fake_result(out), on_error=lambda g, e: pytest.fail(repr(e)))
    step += 1
    assert step < 500
  assert bm.num_free_blocks == bm.num_blocks


# ------------------------------------------------------------- multi-step decoding
def _token(group, sample_index, pos):
  """The fake device's draw: a function of (request, sample, position) alone, as the
  engine's per-position PRNG keys make it; EOS now and then."""
  h = zlib.crc32(f"{group.request_id}/{sample_index}/{pos}".encode()) % 1009  # any process
  return EOS if h % 11 == 0 else 1 + h % 7


def _positional_result(out):
  """A fake StepResult drawn with `_token` (one leading axis per inner step if any)."""
  def one(rows):
    r = max(len(rows), 1)
    tokens = np.array([_token(s.group, j, pos) for s, j, pos in rows] or [0])
    top_ids = np.tile(np.arange(1, K + 1), (r, 1))
    top_lps = -np.tile(np.arange(K, dtype=np.float64), (r, 1)) - 0.01 * np.arange(r)[:, None]
    return StepResult(tokens, -np.ones(r), np.ones(r, int), top_ids, top_lps)

  if out.num_steps == 1:
    return one([(s, j, s.seq.num_tokens) for s in out.seqs for j in s.sample_indices])
  steps = [one([(s, s.seq.sample_index, s.start + 1 + i) for s in out.seqs])
           for i in range(out.num_steps)]
  return StepResult(*(np.stack(x) for x in zip(*(dataclasses.astuple(r) for r in steps))))


def _serve(groups, num_steps, **make):
  bm, s = _make(**make)
  s.num_scheduler_steps = num_steps
  for g in groups:
    s.add(g)
  multi = steps = 0
  work = sum(len(g.prompt_token_ids) + g.width * g.params.max_tokens for g in groups)
  while s.has_unfinished():
    steps += 1
    assert steps < 50 * work + 100, "no progress (livelock)"
    out = s.schedule()
    assert out.seqs or out.swap_in or out.swap_out, "an empty step with work left"
    if out.num_steps > 1:
      multi += 1
      assert all(len(q.token_ids) == 1 and 1 <= q.num_steps <= num_steps for q in out.seqs)
      for q in out.seqs:  # slots reserved for every inner step, no more
        assert bm.num_tokens(q.seq.seq_id) == q.start + q.num_steps
        num_out, p = len(q.seq.output_token_ids), q.group.params
        assert num_out + q.num_steps <= p.max_tokens  # nothing past max_tokens
        # min_tokens' bans hold for a whole window or not at all
        assert num_out >= p.min_tokens or num_out + q.num_steps <= p.min_tokens
    s.update_from_output(out, _positional_result(out), on_error=lambda g, e: pytest.fail(repr(e)))
  assert bm.num_free_blocks == bm.num_blocks
  return {g.request_id: [(q.output_token_ids, q.finish_reason, q.stop_reason) for q in g.seqs]
          for g in groups}, multi


def test_multi_step_reserves_each_sequences_steps_and_stops_where_single_steps_stop():
  def groups():
    return [_group(0, 5, max_tokens=3, ignore_eos=False),  # ends by length inside a window
            _group(1, 9, max_tokens=40, ignore_eos=False, min_tokens=6),
            _group(2, 4, max_tokens=30, n=2, temperature=1.0, stop_token_ids=[5]),
            _group(3, 3, max_tokens=25)]
  single, _ = _serve(groups(), 1, num_blocks=64)
  multi, num_multi = _serve(groups(), 8, num_blocks=64)
  assert num_multi > 0 and multi == single


def test_multi_step_needs_idle_queues_and_the_blocks_of_every_step():
  bm, s = _make(num_blocks=64, block_size=4)
  s.num_scheduler_steps = 4
  s.add(_group(0, 4, max_tokens=20))
  out = s.schedule()  # the prompt: a prefill step
  assert out.num_steps == 1
  s.update_from_output(out, _positional_result(out), on_error=pytest.fail)
  s.add(_group(1, 4, max_tokens=20))
  out = s.schedule()  # a request waits: single steps until it is admitted and decodes
  assert out.num_steps == 1 and {q.group.request_id for q in out.seqs} == {"r0", "r1"}
  s.update_from_output(out, _positional_result(out), on_error=pytest.fail)
  out = s.schedule()
  assert out.num_steps == 4
  s.update_from_output(out, _positional_result(out), on_error=pytest.fail)
  # Too few free blocks for 4 more tokens each: one step, with preemption as usual.
  while bm.num_free_blocks >= 2:
    bm.device_allocator.allocate()
  out = s.schedule()
  assert out.num_steps == 1


def test_an_n2_prompts_sampling_step_is_a_single_step():
  """Found by the property below: a multi-step took the decode-ready, not yet forked n = 2
  prompt as a plain decode, drew one sample instead of two and left its fork stuck."""
  _, s = _make(num_blocks=17, block_size=4, max_num_seqs=3)
  s.num_scheduler_steps = 2
  s.add(_group(0, 7, max_tokens=1))
  s.add(_group(1, 58, max_tokens=3, n=2, temperature=1.0))
  out = s.schedule()  # both prompts; the n = 2 one stops one token short
  s.update_from_output(out, _positional_result(out), on_error=pytest.fail)
  out = s.schedule()
  assert out.num_steps == 1 and [q.sample_indices for q in out.seqs] == [(0, 1)]
  s.update_from_output(out, _positional_result(out), on_error=pytest.fail)
  out = s.schedule()  # now forked: two sequences, two steps left each
  assert out.num_steps == 2 and len(out.seqs) == 2


def test_multi_step_keeps_single_steps_for_beam_search():
  _, s = _make(num_blocks=64)
  s.num_scheduler_steps = 4
  s.add(_group(0, 4, max_tokens=10, use_beam_search=True, beam_width=2, n=1, temperature=0.0))
  while s.has_unfinished():
    out = s.schedule()
    assert out.num_steps == 1
    s.update_from_output(out, _fake_result(out), on_error=pytest.fail)


@given(requests=st.lists(_request, min_size=1, max_size=6), num_steps=st.integers(2, 9),
       block_size=st.sampled_from([4, 8]), slack=st.integers(0, 12),
       mode=st.sampled_from(["recompute", "swap"]), max_num_seqs=st.integers(3, 8))
@settings(max_examples=_EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
def test_multi_step_outputs_equal_single_steps(requests, num_steps, block_size, slack, mode,
                                               max_num_seqs):
  """Any mix (beams fall back to single steps), any cache that fits each request alone,
  under preemption: the same tokens and finish reasons, every block freed."""
  def groups():
    out = []
    for i, r in enumerate(requests):
      width = int(r["kind"][-1]) if r["kind"] != "greedy" else 1
      kw = dict(max_tokens=r["max_tokens"], ignore_eos=r["arrive"] % 2 == 0,
                min_tokens=min(r["arrive"] % 4, r["max_tokens"]),
                stop_token_ids=[r["arrive"] % 8])
      if r["kind"].startswith("beam"):
        kw.update(use_beam_search=True, beam_width=width, n=1, temperature=0.0, min_tokens=0,
                  stop_token_ids=[])
      elif width > 1:
        kw.update(n=width, temperature=1.0)
      out.append(_group(i, r["prompt"], **kw))
    return out
  need = max(max_blocks_needed(len(g.prompt_token_ids), g.params.max_tokens, g.width,
                               block_size=block_size, max_model_len=512) for g in groups())
  make = dict(num_blocks=need + slack, block_size=block_size, host=40, mode=mode,
              max_num_seqs=max_num_seqs, budget=64)
  single, _ = _serve(groups(), 1, **make)
  multi, _ = _serve(groups(), num_steps, **make)
  assert multi == single
