"""RequestOutput / CompletionOutput: what `LLM.generate` and `LLM.step` return (vLLM's shapes)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
  """One generated sequence of a request.

  Attributes:
    index: sample / beam index within the request.
    text: decoded text (stop strings removed).
    token_ids: generated token ids.
    cumulative_logprob: sum of the drawn tokens' logprobs.
    logprobs: per-token logprobs when SamplingParams.logprobs is set, else None.
    finish_reason: None while running, else "stop", "length" or "abort".
    stop_reason: the stop string or stop token id that ended it, if any.
  """

  index: int
  text: str
  token_ids: list[int]
  cumulative_logprob: float
  logprobs: list[float] | None = None
  finish_reason: str | None = None
  stop_reason: str | int | None = None

  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
  """The state of one request after a step (or at the end of `generate`)."""

  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
