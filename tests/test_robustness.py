"""A bad request is the requester's problem only (issue 10, items 2 to 5).

Boundary validation of every SamplingParams field and prompt form, isolation of a
request that fails inside a step (injected faults: the device step, detokenization,
beam selection, block copies), a hypothesis property over wide inputs with a control
prompt, the recompute livelock, admission that counts a shared prompt once (tested at
the exact bound), generate() with streamed requests in flight, abort ids, top-k logprobs.
"""

import math
import os

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pagedjax import LLM, SamplingParams
from pagedjax.core import beam_search
from pagedjax.core.scheduler import max_blocks_needed
from pagedjax.runner.model import dense_forward
from pagedjax.sampling_params import seed_words
from pagedjax.weights.checkpoint import load_bundled_model
from pagedjax.weights.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
CONTROL = "The Python "
_EXAMPLES = int(os.environ.get("PAGEDJAX_PROPERTY_EXAMPLES",
                               "300" if os.environ.get("PAGEDJAX_LONG_TESTS") == "1" else "25"))


@pytest.fixture(scope="module")
def llm():
  return LLM(num_blocks=96, block_size=16, max_num_seqs=8, num_host_blocks=32,
             max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def control(llm):
  return llm.generate(CONTROL, GREEDY)[0].outputs[0].token_ids


def _idle(llm):
  """Nothing queued and no device or host block held."""
  st_ = llm.memory_stats()
  assert not llm.has_unfinished_requests()
  assert st_["num_free_blocks"] == st_["num_blocks"], st_
  assert st_["used_host_blocks"] == 0, st_


def _still_serves(llm, control):
  assert llm.generate(CONTROL, GREEDY)[0].outputs[0].token_ids == control
  _idle(llm)


# ------------------------------------------------------------------ boundary validation
BAD_PARAMS = [  # (kwargs, exception, text the message must hold)
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=2.0), TypeError, "max_tokens"),
    (dict(max_tokens=True), TypeError, "max_tokens"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=1e300), ValueError, "temperature"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_p=1e-300), ValueError, "top_p"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(stop=["a", 1]), TypeError, "stop"),
    (dict(stop=b"x"), TypeError, "stop"),
    (dict(stop=[""]), ValueError, "stop"),
    (dict(stop_token_ids=[1, "2"]), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids"),
    (dict(ignore_eos=1), TypeError, "ignore_eos"),
    (dict(min_tokens=-1), ValueError, "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), ValueError, "min_tokens"),
    (dict(n=0), ValueError, "n "),
    (dict(n=np.float64(2)), TypeError, "n "),
    (dict(use_beam_search="yes"), TypeError, "use_beam_search"),
    (dict(use_beam_search=True, temperature=0.0, n=3, beam_width=2), ValueError, "beam_width"),
    (dict(length_penalty="x"), TypeError, "length_penalty"),
    (dict(length_penalty=float("inf")), ValueError, "length_penalty"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(logprobs=2.0), TypeError, "logprobs"),
]


@pytest.mark.parametrize("kwargs, exc, text", BAD_PARAMS, ids=[repr(b[0]) for b in BAD_PARAMS])
def test_bad_sampling_params_are_refused_naming_the_field(kwargs, exc, text):
  with pytest.raises(exc, match=text.strip()) as info:
    SamplingParams(**kwargs)
  assert text.strip() in str(info.value)


ENGINE_REFUSED = [  # valid SamplingParams the engine cannot serve: refused at add_request
    (dict(logprobs=17), "logprobs"),
    (dict(stop_token_ids=[10_000]), "stop_token_ids"),
    (dict(n=9), "max_num_seqs"),
    (dict(use_beam_search=True, temperature=0.0, beam_width=9), "beam_width"),
]


@pytest.mark.parametrize("kwargs, text", ENGINE_REFUSED, ids=[repr(b[0]) for b in ENGINE_REFUSED])
def test_params_the_engine_cannot_serve_are_refused_at_add(llm, control, kwargs, text):
  with pytest.raises(ValueError, match=text):
    llm.add_request(None, "hi", SamplingParams(**kwargs))
  _still_serves(llm, control)


def test_numpy_numbers_are_accepted_as_python_numbers():
  p = SamplingParams(max_tokens=np.int32(5), temperature=np.float32(0.5), top_k=np.int64(3),
                     top_p=np.float64(0.9), seed=np.uint64(2**63 + 1), n=np.int8(2))
  assert (p.max_tokens, p.top_k, p.n, p.seed) == (5, 3, 2, 2**63 + 1)
  assert type(p.max_tokens) is int and type(p.temperature) is float


def test_seeds_map_into_64_bits_without_trivial_collisions():
  assert seed_words(0) == (0, 0) and seed_words(2**31) == (0, 2**31)
  assert seed_words(2**64 - 1) == (2**32 - 1, 2**32 - 1)
  words = {seed_words(s) for s in [-1, -2, 2**64, 2**64 + 1, 2**100, -(2**100), 5, 2**32 + 5]}
  assert len(words) == 8
  assert seed_words(-12345) == seed_words(-12345)
  for s in (-1, 2**64, 2**200):
    hi, lo = seed_words(s)
    assert 0 <= hi < 2**32 and 0 <= lo < 2**32


EXTREME_BUT_VALID = [
    dict(top_k=10**12, temperature=0.8, seed=1),
    dict(seed=2**31, temperature=1.0),
    dict(seed=2**64 + 5, temperature=1.0),
    dict(seed=-7, temperature=1.0),
    dict(temperature=1e30, seed=3),
    dict(temperature=3e38, seed=4),
    dict(top_p=1e-30, temperature=1.0, seed=5),
    dict(max_tokens=10**12, temperature=0.0),
    dict(min_tokens=5, stop_token_ids=[101, 32], temperature=1.0, seed=6),
]


@pytest.mark.parametrize("kwargs", EXTREME_BUT_VALID, ids=[repr(k) for k in EXTREME_BUT_VALID])
def test_extreme_but_valid_params_are_served_in_vocabulary(llm, control, kwargs):
  kwargs = {"max_tokens": 8, **kwargs}
  out = llm.generate("def ", SamplingParams(**kwargs))[0].outputs[0]
  assert out.token_ids and all(0 <= t < TOK.vocab_size for t in out.token_ids)
  assert out.finish_reason in ("length", "stop")
  assert out.text == TOK.decode(out.token_ids)
  _still_serves(llm, control)


def test_huge_seed_is_deterministic_and_distinct(llm):
  draw = lambda seed: llm.generate("A ", SamplingParams(max_tokens=12, temperature=1.0,  # noqa: E731
                                                        seed=seed))[0].outputs[0].token_ids
  assert draw(2**64 + 5) == draw(2**64 + 5)
  assert len({tuple(draw(s)) for s in (2**64 + 5, 2**64 + 6, 5)}) == 3


# ------------------------------------------------------------------------ prompt forms
def test_prompt_forms_give_the_same_tokens(llm, control):
  ids = TOK.encode(CONTROL)
  forms = [CONTROL, ids, tuple(ids), np.asarray(ids, np.int64), np.asarray(ids, np.int32),
           {"prompt": CONTROL}, {"prompt_token_ids": ids}]
  outs = llm.generate(forms, GREEDY)
  assert [o.outputs[0].token_ids for o in outs] == [control] * len(forms)
  assert all(o.prompt_token_ids == ids for o in outs)
  _idle(llm)


BAD_PROMPTS = [  # (prompt, exception, text)
    (b"bytes", TypeError, "bytes"),
    (None, TypeError, "NoneType"),
    (1.7, TypeError, "float"),
    (True, TypeError, "bool"),
    ([1.7, 2.0], TypeError, "float"),
    ([True, 1], TypeError, "bool"),
    (np.asarray([1.0, 2.0]), TypeError, "float64"),
    (np.zeros((2, 2), np.int32), TypeError, "1-D"),
    ({"prompt": b"x"}, TypeError, "bytes"),
    ({"prompt": "x", "prompt_token_ids": [1]}, ValueError, "exactly one"),
    ({"text": "x"}, ValueError, "unknown keys"),
    ("", ValueError, "empty"),
    ([], ValueError, "empty"),
    ([1, 10**6], ValueError, "vocabulary"),
]


@pytest.mark.parametrize("prompt, exc, text", BAD_PROMPTS, ids=[repr(b[0])[:30] for b in BAD_PROMPTS])
def test_bad_prompt_forms_are_refused_naming_the_type(llm, control, prompt, exc, text):
  with pytest.raises(exc, match=text):
    llm.generate(["fine", prompt], GREEDY)
  _still_serves(llm, control)


# ------------------------------------------------------------------- fault injection
def test_a_failed_device_step_fails_its_requests_and_the_engine_recovers(llm, control,
                                                                        monkeypatch):
  runner = llm.runner
  real = runner.submit
  calls = {"n": 0}

  def flaky(so, prev=None):
    calls["n"] += 1
    if calls["n"] == 3:
      # What a failed donated call leaves behind: the pages are gone.
      runner.kv.k_pages.delete()
      raise RuntimeError("injected device failure")
    return real(so, prev)

  monkeypatch.setattr(runner, "submit", flaky)
  outs = llm.generate(["def ", "A class "], SamplingParams(max_tokens=8, temperature=0.0))
  assert all(o.finished for o in outs)
  assert [o.outputs[0].finish_reason for o in outs] == ["error", "error"]
  assert all("injected device failure" in o.error for o in outs)
  assert llm.memory_stats()["num_failed_steps"] >= 1
  monkeypatch.setattr(runner, "submit", real)
  _still_serves(llm, control)


def test_a_failed_block_copy_leaves_the_engine_consistent(control, monkeypatch):
  llm = LLM(num_blocks=8, block_size=16, max_num_seqs=4, num_host_blocks=32,
            preemption_mode="swap")
  reference = llm.generate(["def f(x):", "The try statement "], SamplingParams(
      max_tokens=60, temperature=0.0, ignore_eos=True))
  assert llm.memory_stats()["num_preemptions_swap"] >= 1
  real = llm.runner.copy_blocks
  state = {"failed": False}

  def flaky(so):
    if so.swap_out and not state["failed"]:
      state["failed"] = True
      raise RuntimeError("injected swap failure")
    return real(so)

  monkeypatch.setattr(llm.runner, "copy_blocks", flaky)
  outs = llm.generate(["def f(x):", "The try statement "], SamplingParams(
      max_tokens=60, temperature=0.0, ignore_eos=True))
  assert state["failed"]
  for o, ref in zip(outs, reference):
    c = o.outputs[0]
    assert c.finish_reason in ("error", "length")
    if c.finish_reason == "length":  # a request that survived is unchanged
      assert c.token_ids == ref.outputs[0].token_ids
  assert any(o.outputs[0].finish_reason == "error" for o in outs)
  monkeypatch.setattr(llm.runner, "copy_blocks", real)
  again = llm.generate(["def f(x):", "The try statement "], SamplingParams(
      max_tokens=60, temperature=0.0, ignore_eos=True))
  assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in reference]
  _idle(llm)


@pytest.mark.parametrize("with_stop", [False, True])
def test_detokenization_failure_ends_only_that_request(llm, control, monkeypatch, with_stop):
  victim = TOK.encode("zz")  # the poisoned request's prompt decides its continuation
  real = llm.tokenizer.decode
  prompts = ["def ", "zz", "A class "]
  params = SamplingParams(max_tokens=6, temperature=0.0, stop=["\x00never"] if with_stop else None)
  expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
  # A token only the victim generates poisons every decode (whole outputs, the stop
  # check's incremental windows) that contains it.
  poison = set(expected[1]) - set(expected[0]) - set(expected[2])
  assert poison, expected

  def decode(ids):
    if poison.intersection(ids):
      raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
    return real(ids)

  monkeypatch.setattr(llm.tokenizer, "decode", decode)
  outs = llm.generate(prompts, params)
  assert outs[1].outputs[0].finish_reason == "error" and "injected" in outs[1].error
  for i in (0, 2):
    assert outs[i].error is None
    assert outs[i].outputs[0].token_ids == expected[i]
  assert victim == outs[1].prompt_token_ids
  monkeypatch.setattr(llm.tokenizer, "decode", real)
  _still_serves(llm, control)


def test_beam_step_failure_ends_only_that_request(llm, control, monkeypatch):
  real = beam_search.select
  beam = SamplingParams(use_beam_search=True, beam_width=2, temperature=0.0, max_tokens=5)

  def select(*args, **kwargs):
    raise ValueError("injected beam failure")

  expected = llm.generate("def ", GREEDY)[0].outputs[0].token_ids
  monkeypatch.setattr(beam_search, "select", select)
  outs = llm.generate(["def ", "The "], [GREEDY, beam])
  assert outs[0].outputs[0].token_ids == expected and outs[0].error is None
  assert outs[1].outputs[0].finish_reason == "error" and "injected beam" in outs[1].error
  monkeypatch.setattr(beam_search, "select", real)
  _still_serves(llm, control)


# -------------------------------------------------------------------- property test
_ints = st.one_of(st.integers(-3, 40), st.integers(-(2**80), 2**80), st.just(2**31),
                  st.sampled_from([np.int32(3), np.int64(-1), np.uint64(2**64 - 1)]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2),
                    st.sampled_from([np.float32(0.7), np.float64(1e-7), 1e30, 1e-300]))
_wrong = st.sampled_from(["1", b"1", None, True, [1], 1.5, {"a": 1}, object()])
_field = lambda base: st.one_of(base, _wrong)  # noqa: E731
_WIDE_PARAMS = st.fixed_dictionaries({}, optional={
    "max_tokens": _field(st.one_of(st.integers(-1, 6), _ints)),
    "temperature": _field(_floats), "top_k": _field(_ints), "top_p": _field(_floats),
    "seed": _field(_ints), "stop": _field(st.one_of(st.text(max_size=3), st.lists(
        st.one_of(st.text(max_size=3), st.integers()), max_size=2))),
    "stop_token_ids": _field(st.lists(_ints, max_size=3)), "ignore_eos": _field(st.booleans()),
    "min_tokens": _field(st.integers(-1, 4)), "n": _field(st.integers(-1, 3)),
    "use_beam_search": _field(st.booleans()), "beam_width": _field(st.integers(-1, 3)),
    "length_penalty": _field(_floats), "logprobs": _field(st.one_of(st.integers(-1, 20), _ints)),
})
# In range but at the edges (huge seeds and top_k, numpy scalars, tiny top_p): mostly served.
_EDGE_PARAMS = st.fixed_dictionaries({"max_tokens": st.integers(1, 6)}, optional={
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0.0, 1e30, np.float32(0.7)])),
    "top_k": st.one_of(st.integers(-1, 400), st.just(10**12), st.just(np.int64(5))),
    "top_p": st.floats(1e-6, 1), "seed": st.integers(-(2**80), 2**80),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 258), max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1), "n": st.integers(1, 3), "logprobs": st.integers(0, 16),
})
_PARAMS = st.one_of(_WIDE_PARAMS, _EDGE_PARAMS)
_PROMPTS = st.one_of(
    st.text(min_size=1, max_size=40), st.lists(st.integers(0, 258), min_size=1, max_size=30),
    st.lists(_ints, max_size=20),
    st.lists(st.integers(0, 258), min_size=1, max_size=40).map(np.asarray),
    st.builds(lambda t: {"prompt": t}, st.text(max_size=20)),
    st.builds(lambda t: {"prompt_token_ids": t}, st.lists(st.integers(0, 300), max_size=20)),
    _wrong, st.floats(), st.binary(max_size=5))
_FIELDS = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
           "ignore_eos", "min_tokens", "n", "use_beam_search", "beam_width", "length_penalty",
           "logprobs"}


_SEEN = {"refused": 0, "served": 0}


@settings(max_examples=_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kwargs=_PARAMS, prompt=_PROMPTS)
def test_any_request_is_refused_cleanly_or_served(llm, control, kwargs, prompt):
  kwargs = dict(kwargs)
  if isinstance(kwargs.get("max_tokens"), int) and not isinstance(kwargs["max_tokens"], bool):
    kwargs["max_tokens"] = min(kwargs["max_tokens"], 6)  # keep each example short
  try:
    params = SamplingParams(**kwargs)
  except (TypeError, ValueError) as e:
    assert any(f in str(e) for f in _FIELDS), e
    _SEEN["refused"] += 1
    return
  try:
    outs = llm.generate(prompt, params)
  except (TypeError, ValueError) as e:
    assert str(e)
    _idle(llm)
  else:
    _SEEN["served"] += 1
    for c in outs[0].outputs:
      assert all(0 <= t < TOK.vocab_size for t in c.token_ids), c.token_ids
      assert c.finish_reason in ("length", "stop"), (c, outs[0].error)
      assert len(c.token_ids) <= params.max_tokens
  _still_serves(llm, control)


def test_the_property_test_served_some_requests():
  # Runs after the property test (file order): the strategies must reach the engine too.
  assert _SEEN["served"] >= max(2, _EXAMPLES // 10), _SEEN


# ------------------------------------------------------------- livelock, admission
def test_recompute_livelock_case_from_the_issue_finishes_exactly():
  args = (["x" * 239, "y" * 239], SamplingParams(n=2, max_tokens=60, temperature=0.8, seed=3,
                                                 ignore_eos=True))
  llm = LLM(num_blocks=40, max_num_batched_tokens=512)
  outs = llm.generate(*args)
  assert llm.memory_stats()["num_preemptions_recompute"] >= 1  # the case did arise
  for o in outs:  # (that preemption changes no token is tested in test_chunked_prefill)
    assert len(o.outputs) == 2 and all(len(c.token_ids) == 60 for c in o.outputs)
    assert o.error is None
  _idle(llm)


def test_admission_counts_the_shared_prompt_once_exactly_at_the_bound():
  prompt = list(range(1, 70))  # 69 tokens: 8 full blocks of 8, shared by the 4 samples
  params = SamplingParams(n=4, max_tokens=32, temperature=0.8, seed=11, ignore_eos=True)
  need = max_blocks_needed(69, 32, 4, block_size=8, max_model_len=512)
  assert need == 8 + 4 * 5  # 28, not 4 x 13 = 52
  reference = LLM(num_blocks=64, block_size=8).generate(prompt, params)[0]
  for mode in ("recompute", "swap"):
    at = LLM(num_blocks=need, block_size=8, preemption_mode=mode, num_host_blocks=need)
    out = at.generate(prompt, params)[0]
    assert out.error is None
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in reference.outputs]
    _idle(at)
  with pytest.raises(ValueError, match="never fit"):
    LLM(num_blocks=need - 1, block_size=8).add_request(None, prompt, params)


def test_a_request_at_the_bound_is_served_beside_others_under_preemption():
  prompt = list(range(1, 70))
  params = SamplingParams(n=4, max_tokens=32, temperature=0.8, seed=11, ignore_eos=True)
  other = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
  reference = LLM(num_blocks=64, block_size=8).generate([prompt, "def ", "A "],
                                                        [params, other, other])
  llm = LLM(num_blocks=28, block_size=8)
  outs = llm.generate([prompt, "def ", "A "], [params, other, other])
  assert llm.memory_stats()["num_preemptions"] >= 1
  for o, r in zip(outs, reference):
    assert [c.token_ids for c in o.outputs] == [c.token_ids for c in r.outputs]
  _idle(llm)


# -------------------------------------------------------------------- smaller items
def test_generate_keeps_outputs_of_streamed_requests_for_step(llm, control):
  llm.add_request("streamed", "def ", SamplingParams(max_tokens=3, temperature=0.0))
  outs = llm.generate("A class ", SamplingParams(max_tokens=12, temperature=0.0))
  assert outs[0].request_id != "streamed" and len(outs[0].outputs[0].token_ids) == 12
  assert llm.has_unfinished_requests()
  later = llm.step()
  assert [o.request_id for o in later] == ["streamed"] and later[0].finished
  assert later[0].outputs[0].token_ids == llm.generate("def ", SamplingParams(
      max_tokens=3, temperature=0.0))[0].outputs[0].token_ids
  _idle(llm)


def test_abort_normalises_the_request_id(llm, control):
  llm.add_request(5, "def ", SamplingParams(max_tokens=50))
  llm.step()
  assert llm.abort_request(5) is True
  assert llm.abort_request(5) is False
  _idle(llm)
  with pytest.raises(ValueError, match="already in use"):
    llm.add_request(7, "a", GREEDY)
    llm.add_request("7", "a", GREEDY)
  assert llm.abort_request(7)
  _still_serves(llm, control)


def test_logprobs_are_the_top_k_per_token_as_vllm_returns_them(llm):
  _, model = load_bundled_model()
  from flax import nnx
  graphdef, state = nnx.split(model)
  k = 5
  out = llm.generate("def ", SamplingParams(max_tokens=4, temperature=0.0, logprobs=k))[0]
  c = out.outputs[0]
  ids = out.prompt_token_ids + c.token_ids
  logits = dense_forward(graphdef, state, jax.numpy.asarray([ids]))[0, :, :TOK.vocab_size]
  ref = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
  assert len(c.logprobs) == len(c.token_ids)
  for i, (tok, d) in enumerate(zip(c.token_ids, c.logprobs)):
    row = ref[len(out.prompt_token_ids) - 1 + i]
    top = np.argsort(-row)[:k]
    assert tok in d and d[tok].rank == 1  # greedy: the sampled token is the best one
    assert sorted(d, key=lambda t: d[t].rank) == list(top)
    assert [d[t].rank for t in top] == list(range(1, k + 1))
    for t in top:
      assert math.isclose(d[t].logprob, float(row[t]), abs_tol=1e-4)
      assert d[t].decoded_token == TOK.decode([int(t)])
  # Sampled (non-greedy) tokens outside the top k are added with their own rank.
  s = llm.generate("def ", SamplingParams(max_tokens=8, temperature=5.0, seed=0, logprobs=1))
  for tok, d in zip(s[0].outputs[0].token_ids, s[0].outputs[0].logprobs):
    assert tok in d and len(d) in (1, 2) and d[tok].rank >= 1
    assert min(v.rank for v in d.values()) == 1
  # logprobs=0: the sampled token alone, its logprob and rank (the step fetched no top
  # tokens: no row of it asked for any).
  z = llm.generate("def ", SamplingParams(max_tokens=4, temperature=0.0, logprobs=0))[0]
  assert z.outputs[0].token_ids == c.token_ids and z.outputs[0].finish_reason == "length"
  for i, (tok, d) in enumerate(zip(z.outputs[0].token_ids, z.outputs[0].logprobs)):
    assert list(d) == [tok] and d[tok].rank == 1
    assert math.isclose(d[tok].logprob, float(ref[len(out.prompt_token_ids) - 1 + i][tok]),
                        abs_tol=1e-4)
