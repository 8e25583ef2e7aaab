"""The scheduler's steady-decode path (`Scheduler._schedule_steady_decode`, with
`update_from_output`'s one-pass update of its steps) schedules exactly what the general
path does.

Two engines serve the same fresh random mixes (requests arriving while others decode,
n > 1, stop rules, min_tokens, logprobs, beams), one with the path and one without
(`Scheduler.steady_decode_path = False`); every step they schedule must be the same
(sequences, starts, tokens, block tables, sample rows, feeds, block copies, preemptions,
newly cached blocks) and so must every output, scheduling after results and ahead of
them (async), with a pool small enough to preempt by swap and by recompute.
"""

import os

import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from test_async_scheduling import _outputs, _random_mix, _stream
from test_multi_step import MAX_MODEL_LEN


def _signature(so):
  if so is None:
    return None
  rows = tuple((s.group.request_id, s.seq.sample_index, s.start, tuple(s.token_ids),
                tuple(s.block_table), tuple(s.sample_indices), s.num_steps, s.feed_row)
               for s in so.seqs)
  return (rows, tuple(so.cow), tuple(so.swap_out), tuple(so.swap_in),
          tuple(g.request_id for g in so.preempted), so.num_batched_tokens, so.num_steps,
          tuple(so.cached_blocks))


def _recorded(llm):
  """Wraps the scheduler: returns the list of (signature of each step it schedules) and
  counts the steps the steady path built."""
  sched = llm.scheduler
  seen, hits = [], [0]
  schedule, steady = sched.schedule, sched._schedule_steady_decode

  def record(ahead_of=None):
    so = schedule(ahead_of)
    seen.append(_signature(so))
    return so

  def count(skip):
    out = steady(skip)
    hits[0] += out is not None
    return out

  sched.schedule = record
  sched._schedule_steady_decode = count
  return seen, hits


def _mix(seed):
  rng = np.random.default_rng(seed + 100)
  reqs = _random_mix(seed)
  # Long decodes beside them (steady steps, blocks filling), one with a min_tokens ban.
  for i in range(4):
    kw = dict(max_tokens=int(rng.integers(20, 40)), temperature=0.8, seed=i, ignore_eos=True)
    if i == 0:
      kw.update(min_tokens=10, stop_token_ids=[101])
    reqs.append((f"long{i}", "x" * int(rng.integers(1, 20)), SamplingParams(**kw),
                 int(rng.integers(0, 8))))
  reqs.append(("beam", "while ", SamplingParams(max_tokens=8, use_beam_search=True,
                                                beam_width=2, temperature=0.0), 3))
  return reqs


# (The first two, without preemption, run with PAGEDJAX_LONG_TESTS=1: the small pool's
# runs take the steady path on most of their steps too.)
LONG = os.environ.get("PAGEDJAX_LONG_TESTS") == "1"
CASES = ([dict(async_scheduling=True), dict(async_scheduling=False)] if LONG else []) + [
  dict(async_scheduling=True, num_blocks=14, preemption_mode="swap"),
  dict(async_scheduling=False, num_blocks=14, preemption_mode="recompute")]


@pytest.mark.parametrize("seed", [0, 1, 2] if LONG else [0])
@pytest.mark.parametrize("kw", CASES, ids=(["async", "sync"] if LONG else []) + [
  "async-swap", "sync-recompute"])
def test_steady_path_schedules_every_step_as_the_general_path(kw, seed):
  reqs = _mix(seed)
  kw = {"num_blocks": 64, **kw}
  runs = {}
  for steady in (True, False):
    # (test_async_scheduling's random-mix shape: its compiled programs are reused)
    llm = LLM(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, max_num_batched_tokens=32, **kw)
    llm.scheduler.steady_decode_path = steady
    seen, hits = _recorded(llm)
    runs[steady] = (_stream(llm, reqs), seen, hits[0], llm.memory_stats())
    st = runs[steady][3]
    assert not llm.has_unfinished_requests() and st["num_free_blocks"] == st["num_blocks"]
  (out_on, seen_on, hits_on, st_on), (out_off, seen_off, hits_off, _) = runs[True], runs[False]
  assert hits_off == 0 and hits_on >= 10  # (the path ran, on most decode steps)
  assert seen_on == seen_off
  assert out_on == out_off  # bitwise: the same steps, the same programs
  if "num_blocks" in kw and kw["num_blocks"] < 64:
    assert st_on["num_preemptions_recompute"] + st_on["num_preemptions_swap"] >= 1


def test_the_update_of_a_steady_step_isolates_a_failing_request(monkeypatch):
  """A request whose stop check raises ends alone ("error") on the one-pass update too;
  the others' outputs are those of a run without the failure."""
  prompts = ["a b", "c d e", "f"]
  params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  want = _outputs(LLM(max_model_len=MAX_MODEL_LEN).generate(prompts, params))
  llm = LLM(max_model_len=MAX_MODEL_LEN)
  seen, hits = _recorded(llm)
  check = llm._check_stop_strings

  def failing(group):
    if group.request_id == llm._failing and len(group.seqs[0].output_token_ids) == 5:
      raise RuntimeError("injected")
    check(group)

  monkeypatch.setattr(llm, "_check_stop_strings", failing)
  llm._failing = None
  for i, p in enumerate(prompts):
    llm.add_request(str(i), p, params)
  llm._failing = "1"
  done = {}
  while llm.has_unfinished_requests():
    done.update({o.request_id: o for o in llm.step() if o.finished})
  assert hits[0] > 0
  assert done["1"].outputs[0].finish_reason == "error"
  assert len(done["1"].outputs[0].token_ids) == 5
  assert _outputs([done["0"]])[0] == want[0] and _outputs([done["2"]])[0] == want[2]
  st = llm.memory_stats()
  assert st["num_free_blocks"] == st["num_blocks"]
