"""Scheduler policy on the host only (no model): admission, decode, preemption, swap-in."""

import pytest

from pagedjax.core.block_manager import BlockManager
from pagedjax.sampling_params import SamplingParams
from pagedjax.core.scheduler import Scheduler
from pagedjax.core.sequence import SequenceGroup, SequenceStatus


def _group(i, prompt_len):
  return SequenceGroup(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(), arrival=i, seed=i)


def _run_step(sched):
  """One scheduled step, with a dummy token appended to every row (what the engine does)."""
  out = sched.schedule()
  for seq in out.seqs:
    seq.append_token(7, 0.0)
  return out


def _make(num_blocks=8, block_size=4, host=8, mode="recompute", max_num_seqs=4, budget=64):
  bm = BlockManager(num_blocks, block_size, host)
  return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       preemption_mode=mode)


def test_admission_is_fcfs_within_limits():
  _, s = _make(num_blocks=8, block_size=4, max_num_seqs=2)
  groups = [_group(i, 5) for i in range(3)]
  for g in groups:
    s.add(g)
  out = _run_step(s)
  assert out.is_prefill and [q.request_id for q in out.seqs] == ["r0", "r1"]  # max_num_seqs
  assert out.context_lens == [0, 0] and out.query_token_ids[0] == list(range(1, 6))
  assert [g.request_id for g in s.waiting] == ["r2"]
  # Next step decodes the running pair (r2 cannot join: max_num_seqs).
  out = _run_step(s)
  assert not out.is_prefill and out.context_lens == [5, 5]
  assert out.query_token_ids == [[7], [7]] and len(out.decode_slots) == 2


def test_token_budget_limits_a_prefill_step():
  _, s = _make(num_blocks=32, budget=12)
  for i in range(3):
    s.add(_group(i, 5))
  assert len(_run_step(s).seqs) == 2  # 5 + 5 <= 12 < 15


def test_recompute_preempts_latest_arrival_and_requeues_it():
  bm, s = _make(num_blocks=4, block_size=4, mode="recompute")
  s.add(_group(0, 4))
  s.add(_group(1, 4))
  _run_step(s)  # both prompts fill one block each
  out = _run_step(s)  # each needs a 2nd block: 4 blocks, fine
  assert out.num_preempted == 0
  for _ in range(3):
    _run_step(s)
  # Both now hold 8 tokens in 2 blocks each; the next token needs a 3rd block each.
  out = _run_step(s)
  assert out.num_preempted == 1 and [q.request_id for q in out.seqs] == ["r0"]
  assert [g.request_id for g in s.waiting] == ["r1"]
  assert s.waiting[0].seqs[0].status is SequenceStatus.WAITING
  assert not bm.has_seq(s.waiting[0].seqs[0].seq_id)
  assert s.num_preemptions == {"recompute": 1, "swap": 0}


def test_swap_preemption_and_swap_in_before_new_admissions():
  bm, s = _make(num_blocks=4, block_size=4, host=8, mode="swap")
  s.add(_group(0, 4))
  s.add(_group(1, 4))
  for _ in range(5):
    _run_step(s)
  out = _run_step(s)
  assert out.num_preempted == 1 and len(out.swap_out) == 2
  victim = s.swapped[0]
  assert victim.request_id == "r1" and bm.is_swapped(victim.seqs[0].seq_id)
  s.add(_group(2, 1))  # must wait: swapped groups come back first
  s.finish_seq(s.running[0].seqs[0])
  s.free_finished_groups()
  out = _run_step(s)
  assert not out.is_prefill and len(out.swap_in) == 2 and out.seqs[0].request_id == "r1"
  assert [g.request_id for g in s.waiting] == ["r2"]
  assert s.num_blocks_swapped == {"out": 2, "in": 2}


def test_swap_falls_back_to_recompute_when_host_pool_is_full():
  _, s = _make(num_blocks=4, block_size=4, host=1, mode="swap")
  s.add(_group(0, 4))
  s.add(_group(1, 4))
  for _ in range(6):
    _run_step(s)
  assert s.num_preemptions == {"recompute": 1, "swap": 0}


def test_bad_settings_raise():
  bm = BlockManager(4, 4)
  with pytest.raises(ValueError, match="preemption_mode"):
    Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=8, preemption_mode="drop")
  with pytest.raises(ValueError, match="max_num_seqs"):
    Scheduler(bm, max_num_seqs=0, max_num_batched_tokens=8)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_many_sequences_crossing_a_block_boundary_together(mode):
  # 6 sequences of 4 tokens hold 6 of 8 blocks; the next token needs a new block for
  # each of them at once. Blocks promised to earlier groups must count: preempting
  # r5 and r4 frees 2 blocks, so exactly r0..r3 continue and no append fails.
  bm, s = _make(num_blocks=8, block_size=4, host=32, mode=mode, max_num_seqs=8)
  for i in range(6):
    s.add(_group(i, 4))
  _run_step(s)
  out = _run_step(s)
  assert [q.request_id for q in out.seqs] == ["r0", "r1", "r2", "r3"]
  assert out.num_preempted == 2 and bm.num_free_blocks == 0
  for _ in range(30):  # keeps going under pressure without a failed append
    _run_step(s)
