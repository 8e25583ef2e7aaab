"""The engine end to end on the bundled model: exactness, batching, stops, errors, compiles."""

import numpy as np
import pytest

from pagedjax import LLM, RequestOutputKind, SamplingParams
from pagedjax.weights.checkpoint import load_bundled_model
from pagedjax.runner.model import greedy_generate_dense
from pagedjax.weights.tokenizer import ByteTokenizer

PROMPTS = [
    "The Python ",
    "def f(x):\n    return ",
    "The try statement specifies exception handlers and/or cleanup code for a group of statements",
    "A",
    "Assignment statements are used to (re)bind names to values and to modify attributes or "
    "items of mutable objects. The syntax is as follows:",
]
TOK = ByteTokenizer()


@pytest.fixture(scope="session")
def llm():
  return LLM(num_blocks=256, block_size=16, max_num_seqs=8, attention_impl="xla")


@pytest.fixture(scope="session")
def dense_model():
  return load_bundled_model()[1]


def _dense_greedy(model, prompt: str, max_tokens: int) -> list[int]:
  return greedy_generate_dense(model, TOK.encode(prompt), max_tokens,
                               num_valid_tokens=TOK.vocab_size, stop_token_ids=(TOK.eos_id,))


def _tokens(outputs):
  return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_dense_no_cache_forward(llm, dense_model):
  outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
  for prompt, out in zip(PROMPTS, outs):
    assert out.prompt_token_ids == TOK.encode(prompt)
    assert out.outputs[0].token_ids == _dense_greedy(dense_model, prompt, 12), prompt
    assert out.outputs[0].text == TOK.decode(out.outputs[0].token_ids)
  assert llm.memory_stats()["num_free_blocks"] == llm.memory_stats()["num_blocks"]


def test_greedy_matches_dense_with_pallas_interpret(dense_model):
  llm = LLM(num_blocks=64, block_size=16, max_num_seqs=2, attention_impl="pallas_interpret")
  prompts = PROMPTS[:2]
  outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
  for prompt, out in zip(prompts, outs):
    assert out.outputs[0].token_ids == _dense_greedy(dense_model, prompt, 4)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_output_does_not_depend_on_batch(llm, temperature):
  params = [SamplingParams(max_tokens=10, temperature=temperature, top_p=0.95, seed=100 + i)
            for i in range(len(PROMPTS))]
  batched = _tokens(llm.generate(PROMPTS, params))
  alone = [_tokens(llm.generate([p], [sp]))[0] for p, sp in zip(PROMPTS, params)]
  assert batched == alone


def test_stop_conditions(llm):
  base = llm.generate("The Python ", SamplingParams(max_tokens=20, temperature=0.0))[0].outputs[0]
  text = base.text
  assert base.finish_reason == "length" and len(base.token_ids) == 20
  # A stop string taken from the greedy text cuts it there.
  stop = text[5:8]
  out = llm.generate("The Python ", SamplingParams(max_tokens=20, temperature=0.0, stop=stop))
  c = out[0].outputs[0]
  assert c.finish_reason == "stop" and c.stop_reason == stop
  assert c.text == text[:text.find(stop)]
  # A stop token id ends generation and is kept in token_ids.
  tok = base.token_ids[3]
  c = llm.generate("The Python ", SamplingParams(max_tokens=20, temperature=0.0,
                                                 stop_token_ids=[tok]))[0].outputs[0]
  assert c.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]
  assert c.finish_reason == "stop" and c.stop_reason == tok
  # min_tokens bans the stop token before it is reached.
  c = llm.generate("The Python ", SamplingParams(max_tokens=20, temperature=0.0, min_tokens=10,
                                                 stop_token_ids=[tok]))[0].outputs[0]
  assert tok not in c.token_ids[:10]


def test_stop_string_completed_by_the_last_allowed_token_still_stops(llm):
  sp = dict(max_tokens=12, temperature=0.0)
  text = llm.generate("The Python ", SamplingParams(**sp))[0].outputs[0].text
  stop = text[-2:]  # the 12th token completes it (byte tokens: one character each)
  c = llm.generate("The Python ", SamplingParams(**sp, stop=[stop]))[0].outputs[0]
  assert c.finish_reason == "stop" and c.stop_reason == stop
  assert c.text == text[:text.find(stop)]


def test_a_stop_string_before_min_tokens_does_not_count_later(llm):
  base = llm.generate("The Python ", SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0]
  stop = base.text[1:3]  # inside the first 3 tokens, i.e. before min_tokens
  c = llm.generate("The Python ", SamplingParams(max_tokens=16, temperature=0.0, min_tokens=8,
                                                 stop=[stop]))[0].outputs[0]
  assert len(c.token_ids) >= 8 and base.text.startswith(c.text)
  # searched from min_tokens' new text on (minus the stop's length), never before
  seven = llm.tokenizer.decode(base.token_ids[:7])
  assert len(c.text) >= len(seven) - len(stop)
  if c.finish_reason == "stop":
    assert c.text == base.text[:base.text.find(stop, len(seven) - len(stop))]


def test_streaming_step_api(llm):
  rid = llm.add_request("stream-1", "The Python ", SamplingParams(max_tokens=6, temperature=0.0))
  seen = []
  while llm.has_unfinished_requests():
    for out in llm.step():
      assert out.request_id == rid
      seen.append(list(out.outputs[0].token_ids))
  assert [len(s) for s in seen] == list(range(1, 7))
  assert seen[-1] == llm.generate("The Python ", SamplingParams(max_tokens=6, temperature=0.0))[
      0].outputs[0].token_ids


def test_final_only_requests_are_returned_by_step_once_finished(llm):
  """RequestOutputKind.FINAL_ONLY (vLLM's): step() returns the request's output only at
  the step that finishes it, the same output a CUMULATIVE request ends with; a
  CUMULATIVE request beside it is still returned every step."""
  final = SamplingParams(max_tokens=6, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
  llm.add_request("final-1", "The Python ", final)
  llm.add_request("cumulative-1", "The Python ", SamplingParams(max_tokens=4, temperature=0.0))
  seen = {"final-1": [], "cumulative-1": []}
  while llm.has_unfinished_requests():
    for out in llm.step():
      seen[out.request_id].append(out)
  assert len(seen["final-1"]) == 1 and seen["final-1"][0].finished
  assert [len(o.outputs[0].token_ids) for o in seen["cumulative-1"]] == [1, 2, 3, 4]
  got = seen["final-1"][0].outputs[0]
  want = llm.generate("The Python ", SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0]
  # (the logprob of a batch of 2 rounds a little differently from a batch of 1)
  assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "length")
  assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)
  with pytest.raises(TypeError, match="output_kind"):
    SamplingParams(output_kind="final_only")


@pytest.mark.parametrize("prompt, params, match", [
    ("", None, "empty"),
    ([], None, "empty"),
    ("x" * 600, None, "context"),
    ([1, 2, 999], None, "vocabulary"),
    ([1, -1], None, "vocabulary"),
    ("ok", dict(max_tokens=0), "max_tokens"),
    ("ok", dict(temperature=-1.0), "temperature"),
    ("ok", dict(top_p=0.0), "top_p"),
    ("ok", dict(top_k=-3), "top_k"),
])
def test_bad_input_raises_and_engine_keeps_serving(llm, prompt, params, match):
  with pytest.raises(ValueError, match=match):
    llm.generate(["fine prompt", prompt], SamplingParams(**params) if params else None)
  assert not llm.has_unfinished_requests()
  out = llm.generate("fine", SamplingParams(max_tokens=3, temperature=0.0))
  assert len(out[0].outputs[0].token_ids) == 3


def test_prompt_that_can_never_fit_is_rejected():
  small = LLM(num_blocks=4, block_size=16)
  with pytest.raises(ValueError, match="never fit"):
    small.add_request(None, "y" * 100, SamplingParams(max_tokens=1))
  assert not small.has_unfinished_requests()


def test_compilations_are_bounded(llm):
  rng = np.random.default_rng(0)
  prompts = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=n))
             for n in rng.integers(1, 120, size=20)]
  params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
  llm.generate(prompts, params)
  after_first = llm.memory_stats()["num_compilations"]
  # decode buckets 1..8 (4) + prefill (rows x tokens) buckets (<= 4 x 4 here).
  assert after_first <= 4 + 16
  llm.reset_prefix_cache()  # the same work again (cache hits would shrink the prefills)
  llm.generate(prompts, params)
  assert llm.memory_stats()["num_compilations"] == after_first  # steady state: no new programs


def test_max_model_len_limits_the_context():
  llm = LLM(max_model_len=64, num_blocks=64)
  with pytest.raises(ValueError, match="context of 64"):
    llm.add_request(None, "z" * 70, SamplingParams(max_tokens=1))
  out = llm.generate("The Python ", SamplingParams(max_tokens=200, temperature=0.0,
                                                   ignore_eos=True))[0].outputs[0]
  assert out.finish_reason == "length" and len(out.token_ids) == 64 - 12
  with pytest.raises(ValueError, match="max_seq_len"):
    LLM(max_model_len=4096)
