"""RequestOutput / CompletionOutput / Logprob: what `LLM.generate` and `LLM.step` return.

Shaped like vLLM's: a RequestOutput per request with one CompletionOutput per sample or
beam; with SamplingParams.logprobs = k, `CompletionOutput.logprobs` holds, per generated
token, a dict {token_id: Logprob} of the k most likely tokens and the sampled one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
  """One candidate token at one position: its logprob, its rank (1 = most likely) and text."""

  logprob: float
  rank: int | None = None
  decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
  """One generated sequence of a request.

  Attributes:
    index: sample / beam index within the request.
    text: decoded text (stop strings removed; "" when the model has no tokenizer).
    token_ids: generated token ids.
    cumulative_logprob: sum of the drawn tokens' logprobs.
    logprobs: per generated token, {token_id: Logprob} (the top-k and the sampled token)
      when SamplingParams.logprobs is set, else None.
    finish_reason: None while running, else "stop", "length", "abort" or "error".
    stop_reason: the stop string or stop token id that ended it, if any.
  """

  index: int
  text: str
  token_ids: list[int]
  cumulative_logprob: float
  logprobs: list[dict[int, Logprob]] | None = None
  finish_reason: str | None = None
  stop_reason: str | int | None = None

  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
  """The state of one request after a step (or at the end of `generate`).

  Attributes:
    request_id, prompt, prompt_token_ids: the request.
    outputs: one CompletionOutput per sample / beam (best beams first).
    finished: whether the request is done.
    error: for a request that failed inside a step (finish_reason "error"), the message.
  """

  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  error: str | None = None
