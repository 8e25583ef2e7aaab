"""Multi-step decoding (num_scheduler_steps, vLLM's name) changes no output.

One scheduled step runs up to N decode steps in one device program (`step.multi_step`)
when nothing waits and every request decodes; the host applies the tokens one inner step
at a time and drops what a sequence drew after it stopped. Checked here on the bundled
model: the same tokens, text, logprobs and finish reasons as single steps for a mix of
sampling settings and stop rules (every stop inside a window), under swap preemption
(both modes under random mixes in the scheduler's property), with prefix caching fed by
multi-step blocks, on the Pallas path (interpreted); streaming still admits a new request
at the next step; a failed multi-step program fails its requests only; the programs are
known in advance. The scheduler's side
(reservations, fallbacks, a property over random mixes) is in test_scheduler.py.
"""

import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.weights.tokenizer import ByteTokenizer

N = 4
TOK = ByteTokenizer()
LONG = TOK.encode("Assignment statements are used to (re)bind names to values and to modify "
                  "attributes or items of mutable objects. The syntax is as follows: ")
REQUESTS = [  # every way a sequence can end, most of them inside a window of N
    ("The Python ", SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True)),
    ("def ", SamplingParams(max_tokens=1, temperature=0.0)),
    ("import ", SamplingParams(max_tokens=2, temperature=0.8, seed=3)),
    ("class A:", SamplingParams(max_tokens=30, n=2, temperature=1.0, seed=5, logprobs=3)),
    ("for i in range(", SamplingParams(max_tokens=40, temperature=0.0, stop=["e"],
                                       min_tokens=5)),
    ("The try statement ", SamplingParams(max_tokens=45, temperature=0.7, seed=9,
                                          min_tokens=13, stop_token_ids=[10, 32, 101])),
    (LONG, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),  # to the context
    ("A ", SamplingParams(max_tokens=30, temperature=0.9, top_k=20, top_p=0.9, seed=11)),
]
MAX_MODEL_LEN = len(LONG) + 21  # LONG ends by length at the context limit, mid-window


def _outputs(outs):
  return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, round(c.cumulative_logprob, 4),
            c.logprobs) for c in o.outputs] for o in outs]


def _serve(llm, requests=REQUESTS):
  return _outputs(llm.generate([p for p, _ in requests], [s for _, s in requests]))


def _engine(n, **kw):
  kw.setdefault("num_blocks", 64)
  return LLM(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, num_scheduler_steps=n, **kw)


@pytest.fixture(scope="module")
def single():
  return _serve(_engine(1))


@pytest.fixture(scope="module")
def multi_engine():
  return _engine(N)


def test_multi_step_outputs_equal_single_steps(single, multi_engine):
  before = multi_engine.memory_stats()
  assert _serve(multi_engine) == single
  st = multi_engine.memory_stats()
  assert st["num_multi_steps"] > before["num_multi_steps"]
  assert st["num_free_blocks"] == st["num_blocks"]
  assert st["num_generated_tokens"] - before["num_generated_tokens"] == sum(
      len(c[0]) for o in single for c in o)  # the tokens kept, not those drawn
  finish = {c[2] for o in single for c in o}
  assert finish == {"length", "stop"}


def test_multi_step_under_preemption(single):
  """Swap preemption (its swaps run between multi-steps); both modes under random mixes
  host-side in test_scheduler.py."""
  llm = _engine(N, num_blocks=10, preemption_mode="swap", num_host_blocks=64)
  assert _serve(llm) == single
  st = llm.memory_stats()
  assert st["num_preemptions"] >= 1 and st["num_multi_steps"] >= 1, st
  assert st["num_free_blocks"] == st["num_blocks"]


def test_multi_step_blocks_feed_the_prefix_cache(multi_engine):
  """Blocks filled by multi-step tokens are registered under the tokens drawn there: a
  prompt that continues an earlier output hits them and changes no token."""
  greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
  multi_engine.reset_prefix_cache()
  first = multi_engine.generate(LONG[:20], greedy)[0].outputs[0].token_ids
  follow = LONG[:20] + first[:40]  # 60 tokens: 3 full blocks, 2 of them decoded
  hits = multi_engine.memory_stats()["prefix_cache_hits"]
  got = multi_engine.generate(follow, SamplingParams(max_tokens=8, temperature=0.0))
  assert multi_engine.memory_stats()["prefix_cache_hits"] - hits == 48
  fresh = LLM(max_model_len=MAX_MODEL_LEN, num_blocks=64, enable_prefix_caching=False)
  assert got[0].outputs[0].token_ids == fresh.generate(
      follow, SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0].token_ids


def test_multi_step_on_the_pallas_path():
  requests = [("def ", SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
              ("The ", SamplingParams(max_tokens=6, temperature=0.8, seed=1))]
  xla = _serve(_engine(1, num_blocks=16), requests)
  llm = _engine(3, num_blocks=16, attention_impl="pallas_interpret")
  assert _serve(llm, requests) == xla
  assert llm.memory_stats()["num_multi_steps"] >= 1


def test_streaming_gets_bursts_and_a_new_request_is_admitted_at_once(multi_engine):
  llm = multi_engine
  llm.add_request("a", "def ", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
  llm.step()  # prefill: one token
  lengths = []
  for _ in range(2):
    lengths.append(len(llm.step()[0].outputs[0].token_ids))
  assert lengths == [1 + N, 1 + 2 * N]  # N tokens a step
  llm.add_request("b", "The ", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
  outs = {o.request_id: o for o in llm.step()}
  assert len(outs["b"].outputs[0].token_ids) == 1  # prefilled at the very next step
  assert len(outs["a"].outputs[0].token_ids) == 2 + 2 * N  # beside one decode of "a"
  while llm.has_unfinished_requests():
    llm.step()
  assert llm.memory_stats()["num_free_blocks"] == llm.memory_stats()["num_blocks"]


def test_a_failed_multi_step_fails_its_requests_and_the_engine_serves_on(multi_engine,
                                                                         monkeypatch):
  llm = multi_engine
  real = llm.runner.submit

  def flaky(so, prev=None):
    if so.num_steps > 1:
      raise RuntimeError("injected multi-step failure")
    return real(so, prev)

  monkeypatch.setattr(llm.runner, "submit", flaky)
  outs = llm.generate(["def ", "The "], SamplingParams(max_tokens=12, temperature=0.0))
  assert all(o.outputs[0].finish_reason == "error" and "injected" in o.error for o in outs)
  monkeypatch.setattr(llm.runner, "submit", real)
  st = llm.memory_stats()
  assert st["num_free_blocks"] == st["num_blocks"]
  assert _serve(llm, REQUESTS[:2]) == _serve(_engine(1), REQUESTS[:2])


def test_multi_step_programs_are_known_in_advance(multi_engine):
  keys = set(multi_engine.runner.serving_program_keys(2048))
  assert {k for k in multi_engine.runner.programs if "steps" in k} <= keys
  assert any("steps" in k for k in multi_engine.runner.programs)


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-2, ValueError), ("4", TypeError),
                                        (2.0, TypeError), (True, TypeError)])
def test_bad_num_scheduler_steps_is_refused(value, exc):
  with pytest.raises(exc, match="num_scheduler_steps"):
    LLM(num_blocks=8, num_scheduler_steps=value)


def test_the_memory_report_counts_multi_steps(multi_engine):
  from pagedjax.entrypoints import cli

  multi_engine.generate("def ", SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
  st = multi_engine.memory_stats()
  assert f"{st['num_multi_steps']} of them multi-step" in cli.memory_report(st, 1.0)
