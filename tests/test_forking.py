"""Parallel sampling and beam search with shared blocks, and preemption transparency."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedjax import LLM, SamplingParams
from pagedjax.core import beam_search
from pagedjax.weights.checkpoint import load
from pagedjax.runner.model import dense_forward

PROMPT = ("The try statement specifies exception handlers and/or cleanup code for a group of "
          "statements")


@pytest.fixture(scope="session")
def llm():
  return LLM(num_blocks=256, block_size=16, max_num_seqs=8)


@pytest.fixture(scope="session")
def dense():
  _, module, tok = load(None)
  graphdef, state = nnx.split(module)
  return graphdef, state, tok


def _texts(outs):
  return [[c.token_ids for c in o.outputs] for o in outs]


def test_parallel_sampling_prefills_once_and_forks(llm):
  before = llm.memory_stats()
  params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
  out = llm.generate(PROMPT, params)[0]
  stats = llm.memory_stats()
  prompt_len = len(out.prompt_token_ids)
  assert stats["num_prefill_tokens"] - before["num_prefill_tokens"] == prompt_len
  assert [c.index for c in out.outputs] == [0, 1, 2, 3]
  assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # separate PRNG streams
  # Sample 0 is the n=1 request with the same seed; the request repeats exactly.
  single = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                               ignore_eos=True))[0]
  assert single.outputs[0].token_ids == out.outputs[0].token_ids
  assert _texts(llm.generate(PROMPT, params)) == _texts([out])
  assert stats["num_free_blocks"] == stats["num_blocks"]


def _peak_blocks(params):
  llm = LLM(num_blocks=256, block_size=16, max_num_seqs=8)
  out = llm.generate(PROMPT * 3, params)[0]
  return llm.memory_stats()["peak_used_blocks"], len(out.prompt_token_ids)


@pytest.mark.parametrize("params", [
    SamplingParams(n=4, max_tokens=24, temperature=1.0, seed=1, ignore_eos=True),
    SamplingParams(n=4, use_beam_search=True, beam_width=4, max_tokens=24, temperature=0.0,
                   ignore_eos=True),
])
def test_branches_share_prompt_blocks(params):
  peak, prompt_len = _peak_blocks(params)
  prompt_blocks = -(-prompt_len // 16)
  per_branch = -(-24 // 16) + 1  # generated tokens + the copied partial prompt block
  assert peak <= prompt_blocks + 4 * per_branch, (peak, prompt_blocks)
  full_copies = 4 * -(-(prompt_len + 24) // 16)
  assert peak < 0.5 * full_copies


def _dense_beam_search(dense, prompt_ids, *, width, n, max_tokens, length_penalty):
  """Brute-force beam search on the dense no-cache forward, same rules as the engine."""
  graphdef, state, tok = dense
  beams = [([], 0.0)]
  hyps = []
  for _ in range(max_tokens):
    total = len(prompt_ids) + len(beams[0][0])
    buf = np.array([prompt_ids + ids for ids, _ in beams], np.int32)
    logits = dense_forward(graphdef, state, jnp.asarray(buf))[:, total - 1]
    logits = jnp.where(jnp.arange(logits.shape[-1]) < tok.vocab_size, logits, -jnp.inf)
    lps = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    order = np.argsort(-lps, axis=-1, kind="stable")[:, :2 * width]
    nxt, fin = beam_search.select(beams, order, np.take_along_axis(lps, order, -1),
                                  beam_width=width, eos_ids=tok.eos_token_ids,
                                  length_penalty=length_penalty)
    hyps += fin
    beams = [(beams[b][0] + [t], beams[b][1] + lp) for b, t, lp in nxt]
    if len(beams[0][0]) >= max_tokens:
      hyps += [beam_search.Hypothesis(ids, c, "length",
                                      beam_search.beam_score(c, len(ids), length_penalty))
               for ids, c in beams]
      break
    if beam_search.is_done(hyps, beams, beam_width=width, length_penalty=length_penalty):
      break
  return beam_search.best(hyps, n)


@pytest.mark.parametrize("prompt", ["The Python ", "def f(x):\n    return "])
def test_beam_search_matches_dense_reference(llm, dense, prompt):
  params = SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=10,
                          temperature=0.0, length_penalty=1.0)
  out = llm.generate(prompt, params)[0]
  ref = _dense_beam_search(dense, out.prompt_token_ids, width=3, n=2, max_tokens=10,
                           length_penalty=1.0)
  assert [c.token_ids for c in out.outputs] == [h.token_ids for h in ref]
  np.testing.assert_allclose([c.cumulative_logprob for c in out.outputs],
                             [h.cumulative_logprob for h in ref], atol=1e-4)
  assert llm.memory_stats()["num_free_blocks"] == llm.memory_stats()["num_blocks"]


def _mixed_requests():
  prompts = ["The Python ", "def ", "A class ", "import ", "In the following, "]
  params = [
      SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
      SamplingParams(n=4, max_tokens=56, temperature=0.9, seed=11, ignore_eos=True),
      SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=24, temperature=0.0),
      SamplingParams(max_tokens=60, temperature=0.7, top_k=20, seed=3, ignore_eos=True),
      SamplingParams(n=2, max_tokens=48, temperature=1.0, top_p=0.9, seed=8),
  ]
  return prompts, params


@pytest.fixture(scope="session")
def mixed_reference():
  prompts, params = _mixed_requests()
  return _texts(LLM(num_blocks=256, block_size=16, max_num_seqs=16).generate(prompts, params))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_is_transparent_for_groups(mixed_reference, mode):
  prompts, params = _mixed_requests()
  tight = LLM(num_blocks=22, block_size=16, max_num_seqs=16, preemption_mode=mode)
  assert _texts(tight.generate(prompts, params)) == mixed_reference
  s = tight.memory_stats()
  assert s["num_preemptions"] > 0
  if mode == "swap":
    assert s["num_preemptions_swap"] > 0 and s["num_blocks_swapped_out"] > 0
  assert s["num_free_blocks"] == s["num_blocks"] and s["free_host_blocks"] == s["total_host_blocks"]


_request = st.tuples(
    st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=12),
    st.sampled_from(["greedy", "sample", "n", "beam"]),
    st.integers(1, 14),
    st.integers(0, 1000),
)


@settings(max_examples=int(os.environ.get("PAGEDJAX_HYPOTHESIS_EXAMPLES", "3")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_request, min_size=1, max_size=4), num_blocks=st.integers(8, 20),
       mode=st.sampled_from(["recompute", "swap"]), host=st.integers(0, 16))
def test_random_mixes_are_preemption_transparent(requests, num_blocks, mode, host):
  prompts, params = [], []
  for text, kind, max_tokens, seed in requests:
    prompts.append(text)
    if kind == "beam":
      params.append(SamplingParams(use_beam_search=True, beam_width=2, max_tokens=max_tokens,
                                   temperature=0.0))
    else:
      params.append(SamplingParams(n=3 if kind == "n" else 1, max_tokens=max_tokens, seed=seed,
                                   temperature=0.0 if kind == "greedy" else 0.8))
  ref = _texts(LLM(num_blocks=256, block_size=16, max_num_seqs=16).generate(prompts, params))
  tight = LLM(num_blocks=num_blocks, block_size=16, max_num_seqs=16, preemption_mode=mode,
              num_host_blocks=host)
  assert _texts(tight.generate(prompts, params)) == ref
  s = tight.memory_stats()
  assert s["num_free_blocks"] == s["num_blocks"] and s["free_host_blocks"] == s["total_host_blocks"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must"),
    (dict(n=4, beam_width=2, use_beam_search=True, temperature=0.0), "beam_width"),
    (dict(use_beam_search=True, beam_width=2, temperature=0.7), "temperature"),
])
def test_bad_group_params_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_group_that_can_never_fit_is_rejected_and_others_served():
  small = LLM(num_blocks=8, block_size=16, max_num_seqs=8)
  with pytest.raises(ValueError, match="never fit"):
    small.generate(["ok", "x" * 40], [SamplingParams(max_tokens=4),
                                      SamplingParams(n=8, max_tokens=40, temperature=1.0)])
  assert not small.has_unfinished_requests()
  with pytest.raises(ValueError, match="max_num_seqs"):
    small.add_request(None, "hi", SamplingParams(n=16))
  out = small.generate("ok", SamplingParams(max_tokens=4, temperature=0.0))
  assert len(out[0].outputs[0].token_ids) == 4
