"""One packed step per iteration (issue 11): chunked prefill changes no output token.

A 300-token prompt prefilled in chunks of any budget gives the tokens of one whole
prefill and of the dense no-cache forward; chunks mix with decodes, with preemption in
both modes, with n > 1 and beams; a running decode gets a token every step while a long
prompt is prefilled beside it; compiled programs stay bounded.
"""

import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.runner import step as step_lib
from pagedjax.runner.model import greedy_generate_dense
from pagedjax.weights.checkpoint import load_bundled_model
from pagedjax.weights.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
LONG = ("Assignment statements are used to (re)bind names to values and to modify attributes "
        "or items of mutable objects. The syntax is as follows: an assignment statement "
        "evaluates the expression list and assigns the single resulting object to each of the "
        "target lists, from left to right. Assignment is defined recursively depending on ")
LONG_IDS = TOK.encode(LONG)[:300]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def dense_tokens():
  model = load_bundled_model()[1]
  return greedy_generate_dense(model, LONG_IDS, 8, num_valid_tokens=TOK.vocab_size,
                               stop_token_ids=(TOK.eos_id,))


def _tokens(outs):
  return [[c.token_ids for c in o.outputs] for o in outs]


def test_long_prompt_is_300_tokens():
  assert len(LONG_IDS) == 300


@pytest.mark.parametrize("budget", [16, 32, 64, 2048])
def test_chunked_prefill_equals_whole_prefill_and_dense(dense_tokens, budget):
  llm = LLM(num_blocks=64, max_num_batched_tokens=budget, max_num_seqs=8)
  out = llm.generate(LONG_IDS, GREEDY)[0].outputs[0]
  assert out.token_ids == dense_tokens
  st = llm.memory_stats()
  assert st["num_prefill_steps"] == -(-300 // budget)  # ceil: one chunk per step
  assert st["num_prefill_tokens"] == 300


def test_chunking_off_prefills_whole_prompts_and_refuses_longer(dense_tokens):
  llm = LLM(num_blocks=64, max_num_batched_tokens=512, enable_chunked_prefill=False)
  assert llm.generate(LONG_IDS, GREEDY)[0].outputs[0].token_ids == dense_tokens
  assert llm.memory_stats()["num_prefill_steps"] == 1
  small = LLM(num_blocks=64, max_num_batched_tokens=256, enable_chunked_prefill=False)
  with pytest.raises(ValueError, match="max_num_batched_tokens"):
    small.add_request(None, LONG_IDS, GREEDY)


def test_budget_must_hold_one_block():
  LLM(num_blocks=16, block_size=16, max_num_batched_tokens=16)
  with pytest.raises(ValueError, match="max_num_batched_tokens"):
    LLM(num_blocks=16, block_size=16, max_num_batched_tokens=15)


REQUESTS = [  # (prompt, params) mixing long prompts, short ones, n > 1 and beams
    (LONG_IDS, SamplingParams(max_tokens=10, temperature=0.0)),
    ("def ", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)),
    (LONG_IDS[:140], SamplingParams(n=3, max_tokens=10, temperature=0.9, seed=7)),
    ("The class ", SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0.0,
                                  max_tokens=8)),
    (LONG_IDS[50:200], SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=2)),
]


@pytest.fixture(scope="module")
def roomy_reference():
  llm = LLM(num_blocks=256, max_num_batched_tokens=2048, max_num_seqs=16)
  return _tokens(llm.generate([p for p, _ in REQUESTS], [s for _, s in REQUESTS]))


@pytest.mark.parametrize("budget, num_blocks, mode", [(32, 40, "recompute"), (48, 40, "swap")])
def test_mixed_batches_under_any_budget_and_preemption(roomy_reference, budget, num_blocks, mode):
  llm = LLM(num_blocks=num_blocks, max_num_batched_tokens=budget, max_num_seqs=16,
            preemption_mode=mode, num_host_blocks=256)
  outs = llm.generate([p for p, _ in REQUESTS], [s for _, s in REQUESTS])
  assert _tokens(outs) == roomy_reference
  st = llm.memory_stats()
  if num_blocks == 40:
    assert st["num_preemptions"] >= 1, st
  assert st["num_free_blocks"] == st["num_blocks"]


def test_a_decode_gets_a_token_every_step_while_a_long_prompt_is_chunked():
  llm = LLM(num_blocks=64, max_num_batched_tokens=32, max_num_seqs=4)
  llm.add_request("short", "def ", SamplingParams(max_tokens=40, temperature=0.0,
                                                  ignore_eos=True))
  lengths = []
  for out in llm.step():  # the short prompt's prefill
    lengths.append(len(out.outputs[0].token_ids))
  llm.add_request("long", LONG_IDS, SamplingParams(max_tokens=2, temperature=0.0))
  steps_while_chunking = 0
  while llm.has_unfinished_requests():
    outs = {o.request_id: o for o in llm.step()}
    if "short" in outs:
      lengths.append(len(outs["short"].outputs[0].token_ids))
    if "long" in outs and not outs["long"].outputs[0].token_ids:
      steps_while_chunking += 1
    if "long" not in outs or not outs["long"].outputs[0].token_ids:
      if lengths[-1] < 40:
        assert "short" in outs  # the decode was not starved by the chunks
  assert lengths == list(range(1, 41))
  # The 300-token prompt took ~300 / 31 steps of chunks, each beside a decode.
  assert steps_while_chunking >= 300 // 32


def test_serving_program_keys_cover_a_varied_run():
  """A long run compiles a bounded set of programs, known in advance, and nothing new
  when the same traffic comes again."""
  llm = LLM(num_blocks=128, max_num_batched_tokens=64, max_num_seqs=4)
  keys = set(llm.runner.serving_program_keys(64))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 256, size=n).tolist() for n in (3, 40, 90, 5, 33)]

  def serve():
    outs = {}
    for p in prompts:  # staggered arrivals: chunks of different prompts mix with decodes
      llm.add_request(None, p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
      outs.update({o.request_id: o.outputs[0].token_ids for o in llm.step()})
    while llm.has_unfinished_requests():
      outs.update({o.request_id: o.outputs[0].token_ids for o in llm.step()})
    return list(outs.values())

  first = serve()
  assert set(llm.runner.programs) <= keys, set(llm.runner.programs) - keys
  compiled = llm.num_compilations
  llm.reset_prefix_cache()  # the same traffic again, not a cache-hit variant of it
  assert serve() == first
  assert llm.num_compilations == compiled  # steady state: nothing new


def test_serving_program_keys_cover_a_step_of_many_short_prompts():
  """Eight 3-token prompts arriving together make one 24-token step of 8 tiles (one
  partial tile each), 4x the usual 2 of its 32-token bucket: alpaca-like traffic reached
  such steps and compiled them in the middle of timed serving runs."""
  llm = LLM(num_blocks=64, max_num_batched_tokens=64, max_num_seqs=8)
  keys = set(llm.runner.serving_program_keys(64))
  prompts = [[5 + i, 6, 7] for i in range(8)]
  llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
  assert (32, 8, 0, 8) in llm.runner.programs  # the 8-tile prefill step ran
  assert set(llm.runner.programs) <= keys, set(llm.runner.programs) - keys


def test_precompile_runs_the_programs_and_writes_nothing():
  llm = LLM(num_blocks=64, block_size=8, max_num_batched_tokens=8, max_num_seqs=1)
  before = np.asarray(llm.runner.kv.k_pages).copy()
  assert llm.precompile() == len(llm.runner.serving_program_keys(8)) == 5
  np.testing.assert_array_equal(np.asarray(llm.runner.kv.k_pages), before)  # padding only
  assert llm.precompile() == 0
  out = llm.generate([[5, 6, 7], list(range(1, 20))], SamplingParams(max_tokens=4,
                                                                     temperature=0.0))
  assert llm.num_compilations == 5 and all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_steps_fed_on_the_device_run_the_precompiled_executables():
  """A step scheduled ahead feeds the step before's tokens, a device array: with a host
  array in the same place when nothing is fed, jit compiled every program a second time
  the first time it fed (the same trace, another input placement: `num_compilations`
  and the trace counter saw nothing, serving stalled for seconds after precompile)."""
  llm = LLM(num_blocks=64, block_size=8, max_num_batched_tokens=8, max_num_seqs=2,
            attention_impl="xla")
  assert llm.async_scheduling
  llm.precompile()
  executables = step_lib.num_executables()  # this process's compiled step executables
  programs = set(llm.runner.programs)
  out = llm.generate([[5, 6, 7], list(range(1, 12))],
                     SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
  assert all(len(o.outputs[0].token_ids) == 8 for o in out)
  assert llm.memory_stats()["num_ahead_steps"] > 5
  # (a step shape precompile leaves out, e.g. more tiles, compiles when it comes, once)
  assert step_lib.num_executables() - executables <= len(set(llm.runner.programs) - programs)
