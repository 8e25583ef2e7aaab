"""The OpenAI-compatible HTTP server: FastAPI routes over one `EngineLoop`.

  POST /v1/completions, POST /v1/chat/completions (models with a chat template),
  GET /v1/models, /health, /metrics (Prometheus), /v1/pool (the block pool as JSON),
  GET / (a live page of the pool), POST /reset_prefix_cache (as vLLM's).

Errors are OpenAI's object `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
request (the field named), 401 for a missing / wrong API key, 404 for an unknown model,
413 for an oversized body, 503 with Retry-After when the waiting queue is at its bound,
500 for a request that failed inside the engine (the others go on).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import pathlib
import re
import secrets
import time
from typing import Any

import fastapi
import pydantic
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from pagedjax.entrypoints.openai import chat as chat_lib
from pagedjax.entrypoints.openai.engine import EngineDeadError, EngineLoop, QueueFullError
from pagedjax.entrypoints.openai.metrics import Metrics
from pagedjax.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  field_of, path_of)
from pagedjax.outputs import RequestOutput

STATIC = pathlib.Path(__file__).parent / "static"
RETRY_AFTER_S = 1
DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
  def __init__(self, status: int, message: str, type_: str, param: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param = status, message, type_, param
    self.headers = headers or {}


def _error_body(status: int, message: str, type_: str, param: str | None) -> dict:
  return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _bad(message: str, param: str | None = None) -> APIError:
  return APIError(400, message, "BadRequestError", param)


def _param_of(message: str, names) -> str | None:
  """The request field a ValueError / TypeError message is about: the one it starts with,
  else the first one it names."""
  for name in names:
    if re.match(rf"{name}\b", message):
      return name
  for name in names:
    if re.search(rf"(?<![\w\[=]){name}\b", message):
      return name
  return None


_FIELDS = ("max_completion_tokens", "max_tokens", "min_tokens", "top_logprobs", "best_of",
           "temperature", "top_p", "top_k", "n", "stop_token_ids", "stop", "seed",
           "logprobs", "use_beam_search", "length_penalty", "prompt",
           "cache_salt", "presence_penalty", "frequency_penalty", "messages")


# ------------------------------------------------------------------ pool page
def pool_snapshot(llm) -> dict:
  """The block pool for the page: per device / host block its owner, refs and cache state."""
  bm, sched = llm.bm, llm.scheduler
  dev, host = bm.device_allocator, bm.host_allocator
  dev_owner = [-1] * bm.num_blocks
  host_owner = [-1] * bm.num_host_blocks
  requests = []
  for state, groups in (("running", sched.running), ("swapped", sched.swapped),
                        ("waiting", sched.waiting)):
    for g in groups:
      idx = len(requests)
      blocks = 0
      for seq in g.seqs:
        if not bm.has_seq(seq.seq_id):
          continue
        owner = host_owner if bm.is_swapped(seq.seq_id) else dev_owner
        for b in bm.block_table(seq.seq_id):
          if owner[b] == -1:
            owner[b] = idx
            blocks += 1
      requests.append({"id": g.request_id, "state": state, "blocks": blocks,
                       "tokens": len(g.prompt_token_ids) + max(
                           (len(s.output_token_ids) for s in g.seqs), default=0)})
  dev_refs = list(dev.ref_counts)
  cached = [1 if c else 0 for c in dev.cached]
  owned = sum(1 for o in dev_owner if o >= 0)
  return {
      "num_blocks": bm.num_blocks, "num_host_blocks": bm.num_host_blocks,
      "block_size": bm.block_size,
      "owner": dev_owner, "refs": dev_refs, "cached": cached,
      "host_owner": host_owner, "host_refs": list(host.ref_counts),
      "requests": requests,
      "counts": {"owned": owned, "shared": sum(1 for r in dev_refs if r > 1),
                 "cached_free": sum(1 for r, c in zip(dev_refs, cached) if c and r == 0),
                 "free": bm.num_free_blocks, "host_used": sum(1 for r in host.ref_counts if r),
                 "running": len(sched.running), "waiting": len(sched.waiting),
                 "swapped": len(sched.swapped)},
  }


def server_stats(llm) -> dict:
  s = llm.memory_stats()
  s["num_running_requests"] = len(llm.scheduler.running)
  s["host_blocks_used"] = s["used_host_blocks"]
  return s


def _default_chat_max_tokens(llm, prompt_len: int, body) -> int:
  """vLLM's default (the rest of the context), cut to what the KV cache can ever hold for
  this request, so that omitting max_tokens is never refused."""
  from pagedjax.core.scheduler import max_blocks_needed  # noqa: PLC0415

  width = body.n
  def fits(m):
    return max_blocks_needed(prompt_len, m, width, block_size=llm.block_size,
                             max_model_len=llm.max_model_len) <= llm.bm.num_blocks
  lo, hi = 1, max(1, llm.max_model_len - prompt_len)
  if fits(hi):
    return hi
  while lo < hi:  # largest m in [1, hi) that fits (1 if none: the engine then says why)
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


# ------------------------------------------------------------------- the app
def build_app(engine: EngineLoop, *, model_name: str, api_key: str | None = None,
              max_body_bytes: int = 1 << 20, max_prompts: int = 64) -> fastapi.FastAPI:
  """The FastAPI app over a started `EngineLoop` (the caller owns its lifetime)."""
  llm = engine.llm
  metrics = Metrics(model_name)
  template = chat_lib.ChatTemplate.from_tokenizer(llm.tokenizer)
  app = fastapi.FastAPI(title="pagedjax", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.engine, app.state.metrics = engine, metrics
  created = int(time.time())

  def on_token(req, now: float, previous: float | None) -> None:
    if previous is None:
      metrics.ttft.observe(now - req.arrival)
    else:
      metrics.itl.observe(now - previous)

  def on_finish(out: RequestOutput | None, req, reason: str) -> None:
    metrics.prompt_tokens.inc(req.num_prompt_tokens)
    metrics.generation_tokens.inc(req.num_tokens)
    metrics.request_success.labels(model_name, reason).inc()
    metrics.e2e.observe(time.perf_counter() - req.arrival)

  engine._on_token, engine._on_finish = on_token, on_finish

  @app.exception_handler(APIError)
  async def _api_error(_request, e: APIError):
    metrics.http_errors.labels(model_name, str(e.status)).inc()
    return JSONResponse(_error_body(e.status, e.message, e.type, e.param), status_code=e.status,
                        headers=e.headers)

  @app.exception_handler(Exception)
  async def _internal_error(_request, e: Exception):
    metrics.http_errors.labels(model_name, "500").inc()
    return JSONResponse(_error_body(500, f"internal error: {e!r}", "InternalServerError", None),
                        status_code=500)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation_error(_request, e):
    metrics.http_errors.labels(model_name, "400").inc()
    err = e.errors()[0]
    return JSONResponse(_error_body(400, err.get("msg", "invalid request"), "BadRequestError",
                                    field_of(tuple(err.get("loc", ())))), status_code=400)

  @app.exception_handler(404)
  async def _not_found(request, _e):
    metrics.http_errors.labels(model_name, "404").inc()
    return JSONResponse(_error_body(404, f"no route {request.method} {request.url.path}",
                                    "NotFoundError", None), status_code=404)

  @app.exception_handler(405)
  async def _not_allowed(request, _e):
    return JSONResponse(_error_body(405, f"method {request.method} not allowed on "
                                    f"{request.url.path}", "MethodNotAllowed", None),
                        status_code=405)

  def check_auth(request: Request) -> None:
    if api_key is None:
      return
    got = request.headers.get("authorization", "")
    if not got.startswith("Bearer ") or not hmac.compare_digest(
        got[len("Bearer "):].encode(), api_key.encode()):
      raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                     "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})

  async def read_body(request: Request, model: type[pydantic.BaseModel]):
    check_auth(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
      raise APIError(413, f"request body of {length} bytes exceeds {max_body_bytes}",
                     "RequestTooLarge")
    raw = bytearray()
    async for chunk in request.stream():
      raw += chunk
      if len(raw) > max_body_bytes:
        raise APIError(413, f"request body exceeds {max_body_bytes} bytes", "RequestTooLarge")
    try:
      data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise _bad(f"invalid JSON body: {e}", "body") from None
    if not isinstance(data, dict):
      raise _bad("the request body must be a JSON object", "body")
    try:
      body = model.model_validate(data)
    except pydantic.ValidationError as e:
      err = e.errors()[0]
      loc = tuple(err.get("loc", ()))
      raise _bad(f"{path_of(loc)}: {err.get('msg', 'invalid value')} "
                 f"(got {err.get('input')!r:.80})", field_of(loc)) from None
    if body.model is not None and body.model != model_name:
      raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                     f"{model_name!r}", "NotFoundError", "model")
    return body

  async def submit_all(prompts: list, params, salt: str | None) -> list:
    streams = []
    try:
      for p in prompts:
        key = "prompt" if isinstance(p, str) else "prompt_token_ids"
        prompt = {key: p} | ({"cache_salt": salt} if salt is not None else {})
        streams.append(await engine.submit(prompt, params))
    except BaseException as e:
      for s in streams:
        s.abort()
      if isinstance(e, (ValueError, TypeError)):
        msg = str(e)
        raise _bad(msg, _param_of(msg, _FIELDS)) from None
      if isinstance(e, QueueFullError):
        raise APIError(503, str(e), "ServiceUnavailable",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
      if isinstance(e, EngineDeadError):
        raise APIError(503, str(e), "ServiceUnavailable") from None
      raise APIError(500, f"internal error: {e!r}", "InternalServerError") from e
    return streams

  async def respond(request: Request, body, params, prompts: list, *, chat: bool):
    """Submits the prompts and answers: an SSE stream, or the whole response."""
    streams = await submit_all(prompts, params, body.cache_salt)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    gen = _Completion(rid, created, model_name, body, params, streams, chat=chat,
                      decode=llm._decode)
    if body.stream:
      return StreamingResponse(gen.sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    return await gen.full(request)

  # ------------------------------------------------------------ completions
  @app.post("/v1/completions")
  async def completions(request: Request):
    body: CompletionRequest = await read_body(request, CompletionRequest)
    try:
      prompts = body.prompts()
      if len(prompts) > max_prompts:
        raise ValueError(f"prompt holds {len(prompts)} prompts; at most {max_prompts}")
      if body.suffix is not None:
        raise ValueError("suffix is not supported")
      if body.best_of not in (None, body.n):
        raise ValueError(f"best_of must equal n here, got {body.best_of!r}")
      if body.echo and body.logprobs is not None:
        raise ValueError("echo with logprobs is not supported (no prompt logprobs)")
      params = body.sampling_params(default_max_tokens=DEFAULT_MAX_TOKENS,
                                    logprobs=body.logprobs)
    except (ValueError, TypeError) as e:
      raise _bad(str(e), _param_of(str(e), _FIELDS)) from None
    return await respond(request, body, params, prompts, chat=False)

  # ------------------------------------------------------------------- chat
  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
    if template is None:
      raise _bad(f"the model {model_name!r} has no chat template (tokenizer_config.json "
                 "chat_template); use /v1/completions", "messages")
    try:
      ids = template.render_ids([m.model_dump(exclude_none=True) for m in body.messages],
                                add_generation_prompt=body.add_generation_prompt)
      max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
          else body.max_tokens
      body.max_tokens = max_tokens
      params = body.sampling_params(default_max_tokens=_default_chat_max_tokens(
          llm, len(ids), body), logprobs=body.chat_logprobs())
    except (ValueError, TypeError) as e:
      raise _bad(str(e), _param_of(str(e), _FIELDS)) from None
    return await respond(request, body, params, [ids], chat=True)

  # ------------------------------------------------------------------ other
  @app.get("/v1/models")
  async def models(request: Request):
    check_auth(request)
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": created, "owned_by": "pagedjax",
        "root": model_name, "max_model_len": llm.max_model_len}]}

  @app.get("/health")
  async def health():
    if not engine.alive:
      raise APIError(503, f"the engine has stopped: {engine.error}", "ServiceUnavailable")
    return Response(status_code=200)

  @app.get("/metrics")
  async def prometheus_metrics():
    try:
      metrics.update(await engine.call(server_stats))
    except EngineDeadError:
      pass
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

  async def call(fn):
    try:
      return await engine.call(fn)
    except EngineDeadError as e:
      raise APIError(503, str(e), "ServiceUnavailable") from None

  @app.get("/v1/pool")
  async def pool(request: Request):
    check_auth(request)
    snap = await call(pool_snapshot)
    snap["tokens_per_s"] = engine.recent_tokens_per_s()
    snap["num_in_flight"] = engine.num_in_flight
    return snap

  @app.post("/reset_prefix_cache")
  async def reset_prefix_cache(request: Request):
    """vLLM's route: drops every unreferenced cached block (benchmarks warm up with it)."""
    check_auth(request)
    return {"num_freed_blocks": await call(lambda llm: llm.reset_prefix_cache())}

  @app.get("/")
  async def page():
    return HTMLResponse((STATIC / "pool.html").read_text())

  return app


# --------------------------------------------------------------- responses
class _Completion:
  """Builds the OpenAI response (or SSE chunks) of one completion / chat request."""

  def __init__(self, rid, created, model, body, params, streams, *, chat: bool, decode):
    self.decode = decode
    self.rid, self.created, self.model = rid, created, model
    self.body, self.params, self.streams, self.chat = body, params, streams, chat
    self.n = params.n
    self.hold = max((len(s) for s in params.stop), default=1) - 1  # stop-string hold-back

  def _index(self, prompt_i: int, j: int) -> int:
    return prompt_i * self.n + j

  def _logprobs(self, c, start: int, offset: int = 0) -> Any:
    """Logprobs of tokens [start:] in the API's shape; `offset`: the text offset of the
    first of them (completions' text_offset)."""
    if c.logprobs is None:
      return None
    lps = c.logprobs[start:]
    toks = c.token_ids[start:start + len(lps)]
    if self.chat:
      content = []
      for t, d in zip(toks, lps):
        lp = d[t]
        content.append({"token": lp.decoded_token or "", "logprob": lp.logprob,
                        "bytes": list((lp.decoded_token or "").encode()),
                        "top_logprobs": [{"token": v.decoded_token or "", "logprob": v.logprob,
                                          "bytes": list((v.decoded_token or "").encode())}
                                         for k, v in sorted(d.items(), key=lambda kv: kv[1].rank or 0)
                                         if v.rank is not None and v.rank <= (self.params.logprobs or 0)]})
      return {"content": content}
    tokens = [d[t].decoded_token or "" for t, d in zip(toks, lps)]
    offsets = []
    for tok in tokens:
      offsets.append(offset)
      offset += len(tok)
    return {"tokens": tokens, "token_logprobs": [d[t].logprob for t, d in zip(toks, lps)],
            "top_logprobs": [{v.decoded_token or str(k): v.logprob for k, v in d.items()}
                             for d in lps],
            "text_offset": offsets}

  def _usage(self, finals: list[RequestOutput]) -> dict:
    p = sum(len(o.prompt_token_ids) for o in finals)
    c = sum(len(x.token_ids) for o in finals for x in o.outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

  def prompt_text(self, text: str | None, ids: list[int]) -> str:
    return text if text is not None else self.decode(ids)

  def _choice(self, index, c, prompt_text: str | None, prompt_ids: list[int]) -> dict:
    reason = c.finish_reason if c.finish_reason in ("stop", "length") else c.finish_reason
    if self.chat:
      return {"index": index, "message": {"role": "assistant", "content": c.text},
              "logprobs": self._logprobs(c, 0), "finish_reason": reason,
              "stop_reason": c.stop_reason}
    prefix = self.prompt_text(prompt_text, prompt_ids) if self.body.echo else ""
    return {"index": index, "text": prefix + c.text,
            "logprobs": self._logprobs(c, 0, len(prefix)),
            "finish_reason": reason, "stop_reason": c.stop_reason}

  async def _final(self, stream) -> RequestOutput:
    last = None
    async for out in stream:
      last = out
    return last

  async def full(self, request: Request) -> Response:
    """The whole response; a client that goes away meanwhile has its requests aborted."""
    tasks = [asyncio.ensure_future(self._final(s)) for s in self.streams]
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
      while not all(t.done() for t in tasks):
        await asyncio.wait([t for t in tasks if not t.done()] + [watch],
                           return_when=asyncio.FIRST_COMPLETED)
        if watch.done():  # the client went away: free its blocks now
          return Response(status_code=499)
        if any(t.done() and t.exception() is not None for t in tasks):
          break
      finals = [t.result() for t in tasks]
    except EngineDeadError as e:
      raise APIError(503, str(e), "ServiceUnavailable") from None
    finally:
      watch.cancel()
      for s in self.streams:
        s.abort()  # no-op for finished ones
      for t in tasks:
        t.cancel()
    errors = [o.error for o in finals if o.error]
    if errors:
      raise APIError(500, f"the request failed inside the engine: {errors[0]}",
                     "InternalServerError")
    choices = []
    for i, o in enumerate(finals):
      for j, c in enumerate(o.outputs):
        choices.append(self._choice(self._index(i, j), c, o.prompt, o.prompt_token_ids))
    return JSONResponse({"id": self.rid, "created": self.created, "model": self.model,
                         "object": "chat.completion" if self.chat else "text_completion",
                         "choices": choices, "usage": self._usage(finals)})

  def _chunk(self, choices: list, usage=None) -> str:
    obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
           "created": self.created, "model": self.model, "choices": choices}
    if usage is not None or (self.body.stream_options and self.body.stream_options.include_usage):
      obj["usage"] = usage
    return f"data: {json.dumps(obj)}\n\n"

  async def sse(self):
    """The SSE body; a failure after the headers went out ends the stream with an error
    event and [DONE] (the client's other requests and the engine go on)."""
    events = self._events()
    try:
      async for event in events:
        yield event
    except Exception as e:  # noqa: BLE001
      body = _error_body(500, f"internal error: {e}", "InternalServerError", None)
      yield f"data: {json.dumps(body)}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      await events.aclose()

  async def _events(self):
    # Bounded: with a slow client, the pumps wait here and each request's mailbox keeps
    # only its newest (cumulative) output, so memory stays flat.
    merged: asyncio.Queue = asyncio.Queue(maxsize=2 * len(self.streams) + 2)

    async def pump(i, stream):
      try:
        async for out in stream:
          await merged.put((i, out))
      except Exception as e:  # noqa: BLE001
        await merged.put((i, e))
      await merged.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
    sent_text: dict[tuple[int, int], int] = {}
    sent_lp: dict[tuple[int, int], int] = {}
    sent_offset: dict[tuple[int, int], int] = {}
    finals: dict[int, RequestOutput] = {}
    closed: set[tuple[int, int]] = set()  # choices whose final chunk went out
    open_streams = len(self.streams)
    try:
      if self.chat:
        yield self._chunk([{"index": self._index(0, j), "delta": {"role": "assistant",
                                                                  "content": ""},
                            "logprobs": None, "finish_reason": None} for j in range(self.n)])
      while open_streams:
        i, out = await merged.get()
        if out is None:
          open_streams -= 1
          continue
        if isinstance(out, Exception) or out.error:
          msg = str(out) if isinstance(out, Exception) else out.error
          yield f"data: {json.dumps(_error_body(500, msg, 'InternalServerError', None))}\n\n"
          continue
        choices = []
        for j, c in enumerate(out.outputs):
          key = (i, j)
          if key in closed:
            continue
          if self.params.use_beam_search and not out.finished:
            continue  # beams change until the end: send the best ones when they finish
          done = c.finish_reason is not None or out.finished
          upto = len(c.text) if done else max(sent_text.get(key, 0), len(c.text) - self.hold)
          start = sent_text.get(key, 0)
          if not self.chat and key not in sent_text and self.body.echo:
            delta = self.prompt_text(out.prompt, out.prompt_token_ids) + c.text[start:upto]
          else:
            delta = c.text[start:upto]
          sent_text[key] = upto
          lp = self._logprobs(c, sent_lp.get(key, 0), sent_offset.get(key, 0))
          if lp is not None and not self.chat:
            sent_offset[key] = sent_offset.get(key, 0) + sum(len(t) for t in lp["tokens"])
          sent_lp[key] = len(c.token_ids)
          if not delta and not done and not (lp and (lp.get("tokens") or lp.get("content"))):
            continue
          reason = c.finish_reason if done else None
          if done:
            closed.add(key)
          if self.chat:
            choices.append({"index": self._index(i, j), "delta": {"content": delta},
                            "logprobs": lp, "finish_reason": reason})
          else:
            choices.append({"index": self._index(i, j), "text": delta, "logprobs": lp,
                            "finish_reason": reason, "stop_reason": c.stop_reason if done else None})
        if out.finished:
          finals[i] = out
        if choices:
          yield self._chunk(choices)
      if self.body.stream_options and self.body.stream_options.include_usage and \
          len(finals) == len(self.streams):
        yield self._chunk([], usage=self._usage([finals[i] for i in sorted(finals)]))
      yield "data: [DONE]\n\n"
    finally:  # normal end, or the client disconnected (the generator is closed)
      for s in self.streams:
        s.abort()
      for t in tasks:
        t.cancel()


async def _wait_disconnect(request: Request) -> None:
  while not await request.is_disconnected():
    await asyncio.sleep(0.1)


# ------------------------------------------------------------------- running
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_server(llm, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               model_name: str = "pagedjax-bundled", max_queued_requests: int = 256,
               max_body_bytes: int = 1 << 20, precompile: bool = True, log=None) -> None:
  """Serves `llm` over HTTP until interrupted (uvicorn, one process, one engine thread)."""
  import uvicorn  # noqa: PLC0415  (only the server needs it)

  log = log or (lambda msg: print(msg, flush=True))

  if precompile:
    log(f"compiling the engine's step programs (once, ~{llm.max_num_seqs} shapes)...")
    llm.precompile()
  engine = EngineLoop(llm, max_queued_requests=max_queued_requests)
  app = build_app(engine, model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes)
  where = "the loopback only" if host in LOOPBACK else f"{host}: reachable from other machines"
  log(f"pagedjax serving {model_name!r} on http://{host}:{port} ({where}); "
      f"API key {'required' if api_key else 'not required'}; pool page at /")
  try:
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
  finally:
    engine.shutdown()
