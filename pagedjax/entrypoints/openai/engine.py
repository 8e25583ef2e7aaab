"""EngineLoop: one background thread owns the `LLM`; HTTP handlers talk to it by message.

The engine is single-threaded by design (host manager + donated device state), so no
handler touches it. Handlers `submit` a request (validated on the engine thread, between
steps, so a bad one raises there and changes nothing), then read its outputs from an
asyncio queue; every `llm.step()` serves every connected client at once. `call(fn)` runs
fn(llm) between steps (metrics, the pool snapshot). `abort` ends a request and frees its
blocks at the next step boundary (a client that disconnected).

Admission is bounded: at most `max_queued_requests` requests may wait beyond what the
engine runs (`max_num_seqs`); beyond that `submit` raises QueueFullError (the server
answers 503 with Retry-After), so memory never grows without bound.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from pagedjax.entrypoints.llm import LLM
from pagedjax.outputs import RequestOutput
from pagedjax.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
  """The waiting queue is at its bound; retry later."""


class EngineDeadError(RuntimeError):
  """The engine thread has stopped."""


class _Request:
  """One admitted request: its mailbox (the latest cumulative output only, so a slow
  reader costs one output of memory, not one per step) and its timing."""

  def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, arrival: float):
    self.request_id, self.loop, self.arrival = request_id, loop, arrival
    self.latest: Any = None
    self.ready = asyncio.Event()
    self.num_prompt_tokens = 0
    self.first_token: float | None = None
    self.last_token: float | None = None
    self.num_tokens = 0

  def deliver(self, item) -> None:  # on the request's event loop
    if isinstance(self.latest, BaseException) or (
        isinstance(self.latest, RequestOutput) and self.latest.finished):
      return  # the final item stays
    self.latest = item
    self.ready.set()


class RequestStream:
  """Outputs of one request as the engine produces them (cumulative RequestOutputs; a
  reader slower than the engine skips to the newest). A stream dropped before it finished
  (e.g. a response that never started because the client left) aborts its request."""

  def __init__(self, engine: "EngineLoop", req: _Request):
    self._engine, self._req = engine, req
    self.request_id = req.request_id
    self.finished = False

  def __aiter__(self):
    return self

  async def __anext__(self) -> RequestOutput:
    if self.finished:
      raise StopAsyncIteration
    await self._req.ready.wait()
    self._req.ready.clear()
    item = self._req.latest
    if isinstance(item, BaseException):
      self.finished = True
      raise item
    if item.finished:
      self.finished = True
    return item

  def abort(self) -> None:
    if not self.finished:
      self.finished = True
      self._engine.abort(self.request_id)

  def __del__(self):
    if not getattr(self, "finished", True):
      self._engine.abort(self.request_id)


class EngineLoop:
  """Runs `llm` on a daemon thread; see the module docstring.

  Args:
    llm: the engine (used only from the loop's thread once started).
    max_queued_requests: requests allowed to wait beyond max_num_seqs running ones.
    on_token: called on the engine thread for each request a step gave tokens, with
      (request, now, previous token time or None).
    on_finish: called on the engine thread for each request that ended (finished, failed
      or aborted) with (its last output or None, request, reason).
  """

  def __init__(self, llm: LLM, *, max_queued_requests: int = 256,
               on_token: Callable | None = None, on_finish: Callable | None = None):
    if isinstance(max_queued_requests, bool) or not isinstance(max_queued_requests, int) \
        or max_queued_requests < 0:
      raise ValueError(f"max_queued_requests must be an int >= 0, got {max_queued_requests!r}")
    self.llm = llm
    self.max_in_flight = llm.max_num_seqs + max_queued_requests
    self._on_token, self._on_finish = on_token, on_finish
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._requests: dict[str, _Request] = {}
    self._lock = threading.Lock()
    self._num_in_flight = 0  # admitted or being admitted (guarded by _lock)
    self._ids = itertools.count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
    self.error: BaseException | None = None
    self.tokens_per_s = collections.deque(maxlen=32)  # (time, generated tokens) per step
    self._thread.start()

  # ------------------------------------------------------------ handler side
  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  @property
  def num_in_flight(self) -> int:
    return self._num_in_flight

  async def submit(self, prompt, params: SamplingParams, *, request_id: str | None = None
                   ) -> RequestStream:
    """Queues one request; raises ValueError / TypeError (bad request), QueueFullError."""
    if not self.alive:
      raise EngineDeadError("the engine has stopped")
    with self._lock:
      if self._num_in_flight >= self.max_in_flight:
        raise QueueFullError(f"{self._num_in_flight} requests in flight (bound "
                             f"{self.max_in_flight}); retry later")
      self._num_in_flight += 1
    loop = asyncio.get_running_loop()
    rid = request_id or f"req-{next(self._ids)}"
    req = _Request(rid, loop, time.perf_counter())
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._post(("add", (req, prompt, params), fut))
    try:
      await asyncio.wrap_future(fut)
    except BaseException:  # refused, or the handler was cancelled (client gone) meanwhile
      if fut.cancel():  # never reached the engine
        self._release()
      else:  # refused (released here) or admitted after all (aborted, released by the abort)
        fut.add_done_callback(
            lambda f: self._release() if f.exception() is not None else self.abort(rid))
      raise
    return RequestStream(self, req)

  def abort(self, request_id: str) -> None:
    self._inbox.put(("abort", request_id, None))

  async def call(self, fn: Callable[[LLM], Any]) -> Any:
    """fn(llm) on the engine thread, between steps."""
    if not self.alive:
      raise EngineDeadError("the engine has stopped")
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._post(("call", fn, fut))
    return await asyncio.wrap_future(fut)

  def _post(self, message) -> None:
    self._inbox.put(message)
    if not self.alive:  # died meanwhile: the dying loop may have drained the inbox already
      self._fail_inbox()

  def shutdown(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._inbox.put(("wake", None, None))
    self._thread.join(timeout)

  # ------------------------------------------------------------- engine side
  def _run(self) -> None:
    error: BaseException = EngineDeadError("the engine was shut down")
    try:
      while not self._stop.is_set():
        busy = self.llm.has_unfinished_requests()
        self._drain(block=not busy)
        if self._stop.is_set():
          break
        if self.llm.has_unfinished_requests():
          self._step()
    except BaseException as e:  # noqa: BLE001  (a bug in the loop itself: fail everyone)
      log.exception("engine loop died")
      self.error = e
      error = EngineDeadError(f"the engine stopped: {e!r}")
    self._stop.set()
    for req in list(self._requests.values()):
      self._send(req, error)
    self._requests.clear()
    self._fail_inbox()

  def _fail_inbox(self) -> None:
    while True:
      try:
        _, _, fut = self._inbox.get_nowait()
      except queue.Empty:
        return
      if fut is not None and fut.set_running_or_notify_cancel():
        fut.set_exception(EngineDeadError("the engine has stopped"))

  def _drain(self, *, block: bool) -> None:
    """Handles every queued message (waits for one first when the engine is idle)."""
    while True:
      try:
        kind, arg, fut = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
      except queue.Empty:
        return
      block = False
      if fut is not None and not fut.set_running_or_notify_cancel():
        continue  # cancelled before it was handled
      if kind == "add":
        req, prompt, params = arg
        try:
          try:
            _, ids, _ = self.llm._tokenize(prompt)
          except (ValueError, TypeError) as e:
            raise type(e)(f"prompt: {e}") from e
          if len(ids) + params.max_tokens > self.llm.max_model_len:
            # as vLLM's server: refuse rather than silently stop at the context
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceed "
                f"the model's context of {self.llm.max_model_len} tokens")
          self.llm.add_request(req.request_id, prompt, params)
        except BaseException as e:  # noqa: BLE001  (bad request: the requester's)
          fut.set_exception(e)
          continue
        req.num_prompt_tokens = len(self.llm._groups[req.request_id].prompt_token_ids)
        self._requests[req.request_id] = req
        fut.set_result(None)
      elif kind == "abort":
        req = self._requests.pop(arg, None)
        if req is not None:
          self.llm.abort_request(arg)
          self._release()
          if self._on_finish is not None:
            self._on_finish(None, req, "abort")
      elif kind == "call":
        try:
          fut.set_result(arg(self.llm))
        except BaseException as e:  # noqa: BLE001
          fut.set_exception(e)

  def _release(self) -> None:
    with self._lock:
      self._num_in_flight -= 1

  def _step(self) -> None:
    outputs = self.llm.step()
    now = time.perf_counter()
    new_tokens = 0
    for out in outputs:
      req = self._requests.get(out.request_id)
      if req is None:  # aborted meanwhile
        continue
      n = sum(len(o.token_ids) for o in out.outputs)
      if n > req.num_tokens:
        new_tokens += n - req.num_tokens
        if self._on_token is not None:
          self._on_token(req, now, req.last_token)
        if req.first_token is None:
          req.first_token = now
        req.last_token = now
        req.num_tokens = n
      self._send(req, out)
      if out.finished:
        del self._requests[out.request_id]
        self._release()
        if self._on_finish is not None:
          reason = "error" if out.error else (out.outputs[0].finish_reason if out.outputs
                                              else None) or "abort"
          self._on_finish(out, req, reason)
    self.tokens_per_s.append((now, new_tokens))

  @staticmethod
  def _send(req: _Request, item) -> None:
    try:
      req.loop.call_soon_threadsafe(req.deliver, item)
    except RuntimeError:  # the handler's event loop is closed
      pass

  def recent_tokens_per_s(self, window_s: float = 5.0) -> float:
    now = time.perf_counter()
    recent = [(t, n) for t, n in list(self.tokens_per_s) if now - t <= window_s]
    if len(recent) < 2:
      return 0.0
    return sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0])
