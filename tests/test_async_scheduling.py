"""Async scheduling (vLLM's name) changes no output.

With `async_scheduling=True` (the default) each step is scheduled and dispatched while the
step before it still runs: its decodes feed the tokens that step draws on the device
(`ScheduledSeq.feed_row`, `StepBatch.feed_index`), the host applies the earlier step's
results meanwhile, and rows of sequences that stopped in between are dropped. Checked
here against the same engine scheduling after each step's results
(`async_scheduling=False`): the same tokens, text, logprobs and finish reasons for a mix
of sampling settings and stop rules (stops found while a step ran ahead), beams and
n > 1 (which fall back to a step after results), under both preemption modes and a
small token budget, on fresh random mixes with requests arriving while steps are in
flight, on the Pallas path (interpreted); aborts and failures of either step in flight
leave the others' outputs unchanged and no block or cache entry behind.
"""

import os

import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from test_multi_step import MAX_MODEL_LEN
from test_multi_step import REQUESTS as MULTI_STEP_REQUESTS

# Every way a request can end, most of them while a step runs ahead (multi-step's mix:
# stops inside a window of steps are stops while a step runs ahead here), and beams.
REQUESTS = [*MULTI_STEP_REQUESTS,
            ("while ", SamplingParams(max_tokens=12, use_beam_search=True, beam_width=2,
                                      temperature=0.0))]


def _outputs(outs):
  return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.cumulative_logprob,
            [{t: (lp.rank, lp.decoded_token, lp.logprob) for t, lp in d.items()}
             for d in c.logprobs or ()]) for c in o.outputs] for o in outs]


def _same(a, b) -> bool:
  """Equal, floats within 1e-4: logprobs of one token move by float rounding when its
  batch (or a recompute after preemption) changes; tokens and text may not move."""
  if isinstance(a, float) or isinstance(b, float):
    return abs(a - b) <= 1e-4
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return (isinstance(b, (list, tuple)) and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b)))
  return a == b


def _serve(llm, requests=REQUESTS):
  return _outputs(llm.generate([p for p, _ in requests], [s for _, s in requests]))


def _engine(async_scheduling, **kw):
  kw.setdefault("num_blocks", 64)
  return LLM(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, async_scheduling=async_scheduling,
             **kw)


def _idle(llm):
  st = llm.memory_stats()
  assert not llm.has_unfinished_requests()
  assert st["num_free_blocks"] == st["num_blocks"]


@pytest.fixture(scope="module")
def reference():
  return _serve(_engine(False))


@pytest.fixture(scope="module")
def engine():
  return _engine(True)


def test_same_outputs_as_scheduling_after_results(engine, reference):
  assert _same(_serve(engine), reference)
  st = engine.memory_stats()
  # Most steps ran ahead (the others: beams, the step after a fresh n > 1 prompt, the first).
  assert st["num_ahead_steps"] >= st["num_steps"] // 2
  _idle(engine)


def test_rejects_a_non_bool():
  with pytest.raises(TypeError, match="async_scheduling"):
    LLM(async_scheduling=1)


@pytest.mark.parametrize("kw", [dict(num_blocks=14, preemption_mode="recompute"),
                                dict(num_blocks=14, preemption_mode="swap"),
                                dict(max_num_batched_tokens=16)])
def test_same_outputs_under_preemption_and_a_small_budget(kw, reference):
  llm = _engine(True, **kw)
  assert _same(_serve(llm), reference)
  st = llm.memory_stats()
  if "num_blocks" in kw:
    assert st["num_preemptions_recompute"] + st["num_preemptions_swap"] >= 1
  _idle(llm)


def _random_mix(seed: int):
  rng = np.random.default_rng(seed)
  reqs = []
  for i in range(10):
    prompt = "".join(map(chr, rng.integers(32, 127, size=int(rng.integers(1, 60)))))
    kw = dict(max_tokens=int(rng.integers(1, 30)), seed=int(rng.integers(1 << 30)),
              temperature=float(rng.choice([0.0, 0.8, 1.2])))
    if rng.random() < 0.4:
      kw["stop_token_ids"] = [int(t) for t in rng.integers(32, 127, size=3)]
    if rng.random() < 0.3:
      kw["stop"] = [chr(int(rng.integers(97, 123)))]
    if rng.random() < 0.2:
      kw["n"] = 2
    if rng.random() < 0.2:
      kw["logprobs"] = 2
    reqs.append((f"r{i}", prompt, SamplingParams(**kw), int(rng.integers(0, 12))))
  return reqs


def _stream(llm, reqs):
  """Adds each request after its step count; returns {request id: outputs}."""
  done, steps = {}, 0
  pending = sorted(reqs, key=lambda r: r[3])
  while pending or llm.has_unfinished_requests():
    while pending and pending[0][3] <= steps:
      rid, prompt, params, _ = pending.pop(0)
      llm.add_request(rid, prompt, params)
    for o in llm.step():
      if o.finished:
        done[o.request_id] = _outputs([o])[0]
    steps += 1
  return done


@pytest.mark.parametrize("seed", [0, 1, 2, 3] if os.environ.get("PAGEDJAX_LONG_TESTS") == "1"
                         else [0])
def test_random_mixes_arriving_while_steps_are_in_flight(seed):
  reqs = _random_mix(seed)
  want = _stream(_engine(False, max_num_batched_tokens=32), reqs)
  llm = _engine(True, max_num_batched_tokens=32)
  assert _same(_stream(llm, reqs), want)
  assert llm.memory_stats()["num_ahead_steps"] > 0
  _idle(llm)


def test_an_abort_while_a_step_runs_ahead_changes_no_other_request(engine):
  greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
  want = _outputs(_engine(False).generate(["def f(x):"], greedy))
  engine.add_request("a", "The Python ", greedy)
  engine.add_request("b", "def f(x):", greedy)
  for _ in range(4):
    engine.step()
  assert engine._inflight is not None  # a step is in flight, ahead of these results
  assert engine.abort_request("a")
  outs = {}
  while engine.has_unfinished_requests():
    outs.update({o.request_id: o for o in engine.step()})
  assert _same(_outputs([outs["b"]]), want)
  _idle(engine)


def test_a_failed_step_in_flight_fails_its_requests_only(monkeypatch):
  """The step in flight fails when its results are fetched, after the next step was
  dispatched behind it: its requests fail; a request only in the next step is computed
  again, unchanged; no block or cache entry is left behind."""
  greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  want = _outputs(_engine(False).generate(["class B:"], greedy))
  llm = _engine(True)
  llm.add_request("a", "The Python ", greedy)
  for _ in range(3):
    llm.step()
  llm.add_request("b", "class B:", greedy)
  real = llm.runner.fetch
  calls = {"n": 0}

  def flaky(so, handle):
    calls["n"] += 1
    if calls["n"] == 1:
      llm.runner.kv.k_pages.delete()  # a failed program leaves no pages
      raise RuntimeError("injected device failure")
    return real(so, handle)

  monkeypatch.setattr(llm.runner, "fetch", flaky)
  outs = {o.request_id: o for o in llm.step()}
  assert outs["a"].outputs[0].finish_reason == "error" and "injected" in outs["a"].error
  while llm.has_unfinished_requests():
    outs.update({o.request_id: o for o in llm.step()})
  assert _same(_outputs([outs["b"]]), want)
  _idle(llm)
  llm.reset_prefix_cache()
  assert _same(_outputs(llm.generate(["class B:"], greedy)), want)


def test_a_failed_dispatch_ahead_fails_that_step_and_the_engine_serves_on(monkeypatch, reference):
  llm = _engine(True)
  real = llm.runner.submit
  state = {"failed": False}

  def flaky(so, prev=None):
    if prev is not None and not state["failed"]:
      state["failed"] = True
      llm.runner.kv.k_pages.delete()
      raise RuntimeError("injected dispatch failure")
    return real(so, prev)

  monkeypatch.setattr(llm.runner, "submit", flaky)
  outs = llm.generate(["def ", "The "], SamplingParams(max_tokens=12, temperature=0.0))
  assert state["failed"]
  assert all(o.outputs[0].finish_reason == "error" and "injected" in o.error for o in outs)
  monkeypatch.setattr(llm.runner, "submit", real)
  _idle(llm)
  assert _same(_serve(llm), reference)


def test_on_the_pallas_path():
  reqs = [("The Python ", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)),
          ("import ", SamplingParams(max_tokens=5, temperature=0.8, seed=3))]
  outs = [_serve(_engine(a, attention_impl="pallas_interpret", num_blocks=16), reqs)
          for a in (False, True)]
  assert _same(outs[0], outs[1])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_token_chunks_beside_decodes(async_scheduling):
  """A budget that leaves one token for a prompt beside two decodes: that chunk (no
  sample) is a prefill tile, not a decode row (decode rows are padded to the sample
  rows: a third one did not fit, and the step failed)."""
  greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
  prompts = ["ab", "cd", "The Python language "]
  want = _outputs(LLM(num_blocks=64).generate(prompts, greedy))
  llm = LLM(num_blocks=64, block_size=2, max_num_batched_tokens=3, max_num_seqs=3,
            async_scheduling=async_scheduling)
  assert _same(_outputs(llm.generate(prompts, greedy)), want)
  _idle(llm)
