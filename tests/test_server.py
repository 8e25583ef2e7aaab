"""The OpenAI-compatible server, live on the loopback, talked to with real clients.

One module-scoped server (small engine); a second one with a tiny queue bound for the
overload test; a tiny Hugging Face checkpoint with a chat template for chat. Outputs are
compared token for token with `LLM.generate` on an engine of the same configuration.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from pagedjax import LLM, SamplingParams
from pagedjax.entrypoints.openai.api_server import build_app
from pagedjax.entrypoints.openai.engine import EngineLoop

KEY = "test-key"
CFG = dict(num_blocks=96, max_num_seqs=8, max_num_batched_tokens=64)


class LiveServer:
  def __init__(self, llm: LLM, *, api_key=KEY, model_name="tiny", **loop_kwargs):
    self.llm = llm
    self.engine = EngineLoop(llm, **loop_kwargs)
    self.app = build_app(self.engine, model_name=model_name, api_key=api_key,
                         max_body_bytes=64 * 1024)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    self.port = s.getsockname()[1]
    s.close()
    self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline, "server did not start"
      time.sleep(0.02)
    self.url = f"http://127.0.0.1:{self.port}"
    self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

  def client(self, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

  def metric(self, name: str) -> float:
    text = httpx.get(self.url + "/metrics", timeout=30).text
    m = re.search(rf"^pagedjax:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))

  def close(self):
    self.server.should_exit = True
    self.thread.join(10)
    self.engine.shutdown()


@pytest.fixture(scope="module")
def live():
  srv = LiveServer(LLM(**CFG))
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def ref():
  return LLM(**CFG)


def _offline(ref: LLM, prompt, **kw):
  return ref.generate([prompt], SamplingParams(**kw))[0]


def _no_leak(srv: LiveServer, timeout: float = 5.0) -> None:
  deadline = time.time() + timeout
  while srv.metric("kv_blocks_used") != 0 or srv.engine.num_in_flight:
    assert time.time() < deadline, "blocks or requests leaked"
    time.sleep(0.05)


# ---------------------------------------------------------------- completions
def test_completion_equals_offline_generate(live, ref):
  c = live.client()
  r = c.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0)
  want = _offline(ref, "def ", max_tokens=12, temperature=0.0)
  assert r.choices[0].text == want.outputs[0].text
  assert r.choices[0].finish_reason == "length"
  assert r.usage.prompt_tokens == len(want.prompt_token_ids)
  assert r.usage.completion_tokens == 12
  assert r.object == "text_completion" and r.model == "tiny"
  ids = c.completions.create(model="tiny", prompt=want.prompt_token_ids, max_tokens=12,
                             temperature=0)
  assert ids.choices[0].text == want.outputs[0].text


def test_streaming_equals_non_streaming_and_reports_usage(live, ref):
  c = live.client()
  chunks = list(c.completions.create(model="tiny", prompt="class ", max_tokens=10,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True}))
  want = _offline(ref, "class ", max_tokens=10, temperature=0.0)
  assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.outputs[0].text
  assert len([ch for ch in chunks if ch.choices]) > 1  # it really streamed
  assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_raw_sse_ends_with_done(live):
  with httpx.stream("POST", live.url + "/v1/completions", headers=live.headers, timeout=60,
                    json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.iter_lines() if ln]
  assert lines[-1] == "data: [DONE]"
  assert all(ln.startswith("data: ") for ln in lines)
  json.loads(lines[0][len("data: "):])


def test_n_seed_logprobs_and_prompt_lists(live, ref):
  c = live.client()
  kw = dict(max_tokens=6, temperature=0.9, top_k=20, n=2, seed=11, logprobs=2)
  r = c.completions.create(model="tiny", prompt=["a b", "c d"], extra_body={"top_k": 20},
                           **{k: v for k, v in kw.items() if k != "top_k"})
  assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
  for i, prompt in enumerate(["a b", "c d"]):
    want = _offline(ref, prompt, **kw)
    for j in range(2):
      got = r.choices[2 * i + j]
      assert got.text == want.outputs[j].text
      lp = got.logprobs
      assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6
      exp = [d[t].logprob for t, d in zip(want.outputs[j].token_ids, want.outputs[j].logprobs)]
      assert lp.token_logprobs == pytest.approx(exp, abs=1e-5)
      assert all(len(t) >= 2 for t in lp.top_logprobs)
  again = c.completions.create(model="tiny", prompt=["a b", "c d"], extra_body={"top_k": 20},
                               **{k: v for k, v in kw.items() if k != "top_k"})
  assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]


def test_streamed_n2_sends_each_final_choice_once_with_text_offsets(live, ref):
  chunks = list(live.client().completions.create(
      model="tiny", prompt="import ", max_tokens=8, temperature=0.8, seed=5, n=2, logprobs=1,
      stream=True))
  want = _offline(ref, "import ", max_tokens=8, temperature=0.8, seed=5, n=2, logprobs=1)
  for j in range(2):
    mine = [c for ch in chunks for c in ch.choices if c.index == j]
    assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert "".join(c.text for c in mine) == want.outputs[j].text
    tokens = [t for c in mine for t in c.logprobs.tokens]
    offsets = [o for c in mine for o in c.logprobs.text_offset]
    assert len(tokens) == 8 and offsets == [sum(map(len, tokens[:k])) for k in range(8)]


def test_stop_strings_streaming_and_not(live, ref):
  c = live.client()
  base = _offline(ref, "def ", max_tokens=24, temperature=0.0).outputs[0].text
  stop = base[5:7]  # a string the greedy continuation contains
  want = _offline(ref, "def ", max_tokens=24, temperature=0.0, stop=[stop]).outputs[0]
  assert want.finish_reason == "stop"
  r = c.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0, stop=stop)
  assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
  chunks = list(c.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0,
                                     stop=[stop], stream=True))
  assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text


def test_echo_vllm_extras_and_models(live, ref):
  c = live.client()
  r = c.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, echo=True,
                           extra_body={"min_tokens": 4, "ignore_eos": True,
                                       "cache_salt": "tenant-a"})
  assert r.choices[0].text == "abc" + _offline(ref, "abc", max_tokens=4, temperature=0.0).outputs[0].text
  beams = c.completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0, n=2,
                               extra_body={"use_beam_search": True})
  want = ref.generate(["def "], SamplingParams(max_tokens=5, temperature=0.0, n=2,
                                               use_beam_search=True))[0]
  assert [ch.text for ch in beams.choices] == [o.text for o in want.outputs]
  models = c.models.list()
  assert [m.id for m in models.data] == ["tiny"]
  assert httpx.get(live.url + "/health").status_code == 200


# --------------------------------------------------------------- bad requests
def _post(live, body, headers=None, content=None):
  h = dict(live.headers if headers is None else headers)
  if content is not None:
    return httpx.post(live.url + "/v1/completions", content=content,
                      headers=h | {"content-type": "application/json"}, timeout=60)
  return httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=60)


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ({"prompt": "x", "max_token": 3}, 400, "max_token"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "min_tokens": 20}, 400, "min_tokens"),
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
])
def test_bad_requests_get_an_error_object_and_the_next_is_served(live, body, status, param):
  r = _post(live, body)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["message"]
  assert err["param"] == param, err
  ok = _post(live, {"prompt": "x", "max_tokens": 2})
  assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_invalid_json_oversized_body_and_api_key(live):
  r = _post(live, None, content=b"{not json")
  assert r.status_code == 400 and r.json()["error"]["param"] == "body"
  r = _post(live, None, content=b"[1, 2]")
  assert r.status_code == 400
  r = _post(live, {"prompt": "x" * (70 * 1024)})
  assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLarge"
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
    r = _post(live, {"prompt": "x"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
  r = httpx.get(live.url + "/v1/models")
  assert r.status_code == 401
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
  assert _post(live, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_chat_without_template_is_a_clear_400(live):
  with pytest.raises(openai.BadRequestError, match="chat template"):
    live.client().chat.completions.create(model="tiny",
                                          messages=[{"role": "user", "content": "hi"}])


def test_internal_failure_fails_that_request_with_500_only(live, ref, monkeypatch):
  llm = live.llm
  real = llm._request_output

  def poisoned(group, *, decode=True):
    if decode and group.prompt == "poison ":
      raise RuntimeError("injected output failure")
    return real(group, decode=decode)

  monkeypatch.setattr(llm, "_request_output", poisoned)

  async def both():
    async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=60) as h:
      return await asyncio.gather(
          h.post("/v1/completions", json={"prompt": "poison ", "max_tokens": 6, "temperature": 0}),
          h.post("/v1/completions", json={"prompt": "def ", "max_tokens": 6, "temperature": 0}))

  bad, good = asyncio.run(both())
  monkeypatch.setattr(llm, "_request_output", real)
  assert bad.status_code == 500 and "injected" in bad.json()["error"]["message"]
  assert good.status_code == 200
  assert good.json()["choices"][0]["text"] == _offline(ref, "def ", max_tokens=6,
                                                       temperature=0.0).outputs[0].text
  _no_leak(live)


# ---------------------------------------------------------- disconnect, load
def test_disconnect_mid_stream_aborts_and_frees_blocks(live):
  with httpx.stream("POST", live.url + "/v1/completions", headers=live.headers, timeout=60,
                    json={"prompt": "def ", "max_tokens": 400, "stream": True,
                          "ignore_eos": True}) as r:
    it = r.iter_lines()
    while not next(it).startswith("data: "):
      pass
    assert live.metric("kv_blocks_used") > 0
  t0 = time.time()
  _no_leak(live, timeout=1.0)
  assert time.time() - t0 <= 1.0
  text = httpx.get(live.url + "/metrics").text
  assert re.search(r'^pagedjax:request_success_total\{finished_reason="abort".*\} [1-9]', text, re.M)


def test_64_concurrent_streaming_clients_match_offline_and_leak_nothing(live, ref):
  prompts = [f"{w} " for w in ("def", "class", "import", "for", "if", "while", "return",
                               "print")] * 2
  want = {p: o.outputs[0].text for p, o in zip(
      prompts, ref.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0)))}

  async def client(i: int, h: httpx.AsyncClient):
    got = []
    for k in range(2):
      p = prompts[(i + k) % len(prompts)]
      text = ""
      async with h.stream("POST", "/v1/completions",
                          json={"prompt": p, "max_tokens": 5, "temperature": 0,
                                "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        lines = [ln async for ln in r.aiter_lines() if ln]
      assert lines[-1] == "data: [DONE]"
      for ln in lines[:-1]:
        text += "".join(c["text"] for c in json.loads(ln[6:])["choices"])
      got.append((p, text))
    return got

  async def run():
    limits = httpx.Limits(max_connections=80)
    async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=300,
                                 limits=limits) as h:
      return await asyncio.gather(*(client(i, h) for i in range(64)))

  results = asyncio.run(run())
  assert sum(len(r) for r in results) == 128
  for r in results:
    for p, text in r:
      assert text == want[p]
  _no_leak(live)


def test_overload_beyond_the_queue_bound_gets_503_not_a_hang():
  srv = LiveServer(LLM(**CFG), max_queued_requests=2)
  try:
    async def run():
      async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=120,
                                   limits=httpx.Limits(max_connections=40)) as h:
        return await asyncio.gather(*(h.post("/v1/completions", json={
            "prompt": "def ", "max_tokens": 40, "ignore_eos": True}) for _ in range(30)))

    rs = asyncio.run(run())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 10  # bound: 8 running + 2 queued
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == 503
    _no_leak(srv)
  finally:
    srv.close()


# ----------------------------------------------------------------- metrics, pool
def test_metrics_use_vllm_names_and_count(live):
  text = httpx.get(live.url + "/metrics").text
  for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
               "kv_cache_usage_perc", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached",
               "host_blocks_used", "num_preemptions_total", "prompt_tokens_total",
               "generation_tokens_total", "time_to_first_token_seconds_bucket",
               "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
               "prefix_cache_queries_total", "prefix_cache_hits_total"):
    assert re.search(rf"^pagedjax:{name}[{{ ]", text, re.M), name
  before = live.metric("generation_tokens_total")
  live.client().completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
  assert live.metric("generation_tokens_total") == before + 3
  assert "_created" not in text


def test_pool_json_shows_owners_while_running(live):
  with httpx.stream("POST", live.url + "/v1/completions", headers=live.headers, timeout=60,
                    json={"prompt": "def f(x):\n  return x + 1\n" * 2, "max_tokens": 200,
                          "stream": True, "n": 2,
                          "ignore_eos": True}) as r:
    it = r.iter_lines()
    while not next(it).startswith("data: "):
      pass
    snap = httpx.get(live.url + "/v1/pool", headers=live.headers).json()
  assert snap["counts"]["owned"] > 0 and snap["counts"]["shared"] > 0  # n=2 shares the prompt
  assert len(snap["owner"]) == snap["num_blocks"] == CFG["num_blocks"]
  assert any(q["state"] == "running" for q in snap["requests"])
  page = httpx.get(live.url + "/").text
  assert "/v1/pool" in page and "owned-count" in page and "<script" in page
  assert "http" not in re.sub(r"https?://(127\.0\.0\.1|localhost)", "", page.split("<script")[1])
  _no_leak(live)


# ----------------------------------------------------------------------- chat
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}"
            "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
  from test_hf import CASES, build_tokenizer, write_checkpoint  # noqa: PLC0415

  directory = tmp_path_factory.mktemp("chat") / "llama"
  write_checkpoint(directory, "llama", build_tokenizer(CASES["llama"]["bos"] == "post_processor"))
  cfg_path = directory / "tokenizer_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps(cfg | {"chat_template": TEMPLATE}))
  kw = dict(num_blocks=32, max_num_seqs=4, max_num_batched_tokens=32)
  srv = LiveServer(LLM(str(directory), **kw), model_name="llama-tiny")
  yield srv, LLM(str(directory), **kw)
  srv.close()


def test_chat_renders_the_template_and_equals_offline(chat_server):
  srv, ref = chat_server
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
  text = "<s>system: Be brief.\nuser: Hello\nassistant:"
  ids = ref.tokenizer.encode(text, add_bos=False)
  assert ids[0] == ref.tokenizer.bos_id and ids.count(ref.tokenizer.bos_id) == 1
  want = ref.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0]
  c = srv.client()
  r = c.chat.completions.create(model="llama-tiny", messages=messages, max_tokens=8,
                                temperature=0, logprobs=True, top_logprobs=2)
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == want.text
  assert r.usage.prompt_tokens == len(ids)
  assert len(r.choices[0].logprobs.content) == len(want.token_ids)
  assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
  chunks = list(c.chat.completions.create(model="llama-tiny", messages=messages, max_tokens=8,
                                          temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
  capped = c.chat.completions.create(model="llama-tiny", messages=messages,
                                     max_completion_tokens=3, temperature=0)
  assert capped.usage.completion_tokens <= 3


def test_chat_bad_messages_and_template_errors_are_400(chat_server):
  srv, _ = chat_server
  c = srv.client()
  with pytest.raises(openai.BadRequestError, match="tool messages are not supported"):
    c.chat.completions.create(model="llama-tiny", max_tokens=2,
                              messages=[{"role": "tool", "content": "x"}])
  for messages in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
    r = httpx.post(srv.url + "/v1/chat/completions", headers=srv.headers, timeout=60,
                   json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
  r = c.chat.completions.create(model="llama-tiny", max_tokens=2,
                                messages=[{"role": "user", "content": "ok"}])
  assert r.choices[0].finish_reason in ("length", "stop")


def test_chat_template_runs_sandboxed():
  from pagedjax.entrypoints.openai.chat import ChatTemplate, ChatTemplateError  # noqa: PLC0415
  from pagedjax.weights.tokenizer import ByteTokenizer  # noqa: PLC0415

  evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", ByteTokenizer())
  with pytest.raises(ChatTemplateError):
    evil.render([{"role": "user", "content": "x"}])
  mutate = ChatTemplate("{% set _ = messages.append(1) %}x", ByteTokenizer())
  with pytest.raises(ChatTemplateError):
    mutate.render([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------- the page
def _chromium() -> str | None:
  import shutil  # noqa: PLC0415

  return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
               if p), None)


def test_pool_page_draws_the_pool_in_headless_chromium(live, tmp_path):
  """Loads / in headless Chromium while a request runs: the DOM reports owned and shared
  blocks, and a screenshot is taken. Skips (saying why) without a Chromium binary;
  .ci/run installs Debian's `chromium` when it is missing."""
  import subprocess  # noqa: PLC0415

  browser = _chromium()
  if browser is None:
    pytest.skip("no chromium binary (apt-get install chromium); .ci/run installs it")
  done = threading.Event()

  def long_request():
    try:
      httpx.post(live.url + "/v1/completions", headers=live.headers, timeout=120, json={
          "prompt": "def f(x):\n  return x + 1\n" * 2, "max_tokens": 300, "n": 2,
          "ignore_eos": True})
    finally:
      done.set()

  # The request's steps are held while Chromium reads the page (the engine thread keeps
  # answering /v1/pool between the held steps): the 300 tokens took ~0.5 s, less than
  # Chromium's start, so the page could find the request already done.
  hold = threading.Event()
  step = live.llm.step

  def held_step():
    if hold.is_set():
      time.sleep(0.01)
      return []
    return step()

  live.llm.step = held_step
  t = threading.Thread(target=long_request)
  t.start()
  try:
    deadline = time.time() + 60
    while httpx.get(live.url + "/v1/pool", headers=live.headers,
                    timeout=30).json()["counts"]["shared"] == 0:  # forked: n = 2
      assert time.time() < deadline
      time.sleep(0.01)
    hold.set()
    url = f"{live.url}/#key={KEY}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,700",
             "--virtual-time-budget=3000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = tmp_path / "pool.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
  finally:
    hold.clear()
    t.join()
    del live.llm.step
  counts = dict(re.findall(r'id="([a-z-]+-count)">(\d+)<', dom.stdout))
  assert int(counts["owned-count"]) > 0 and int(counts["shared-count"]) > 0, dom.stdout[-2000:]
  assert int(counts["running-count"]) >= 1
  assert 'id="err"></span>' in dom.stdout  # the page fetched /v1/pool with the key
  assert shot.exists() and shot.stat().st_size > 5000
  _no_leak(live)
