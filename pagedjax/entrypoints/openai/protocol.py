"""Request models of the OpenAI API as vLLM's server accepts them (pydantic v2).

Unknown fields are refused (400 naming the field) rather than silently ignored, so a
typo such as `max_token` is the requester's visible problem. vLLM's extra sampling fields
(`top_k`, `min_tokens`, `ignore_eos`, `use_beam_search`, `cache_salt`, ...) are accepted
in the body, as `extra_body` of the openai client sends them.
"""

from __future__ import annotations

from typing import Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pagedjax.sampling_params import SamplingParams


class ErrorInfo(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: int | str | None = None


class ErrorResponse(BaseModel):
  error: ErrorInfo


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid")
  include_usage: bool = False
  continuous_usage_stats: bool = False


# Bounds that keep one request's per-token host work small (every stop string is searched
# for in each new token's text window).
MAX_STOP_STRINGS, MAX_STOP_LEN, MAX_STOP_TOKEN_IDS = 16, 256, 64

# strict ints (a JSON 1.5 or "3" is not a token count); floats accept JSON integers.
StrictInt = pydantic.StrictInt
TokenIds = list[StrictInt]


class _SamplingFields(BaseModel):
  model_config = ConfigDict(extra="forbid")

  model: str | None = None
  max_tokens: StrictInt | None = None
  temperature: float | None = None
  top_p: float | None = None
  n: StrictInt = 1
  stop: Union[str, list[str], None] = None
  stop_token_ids: TokenIds | None = None
  seed: StrictInt | None = None
  stream: pydantic.StrictBool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  # vLLM's extra sampling fields
  top_k: StrictInt | None = None
  min_tokens: StrictInt = 0
  ignore_eos: pydantic.StrictBool = False
  use_beam_search: pydantic.StrictBool = False
  length_penalty: float = 1.0
  cache_salt: str | None = Field(default=None, min_length=1)
  # accepted for the OpenAI API's sake; 0 is the only value this engine implements
  presence_penalty: float | None = None
  frequency_penalty: float | None = None

  @pydantic.field_validator("stop")
  @classmethod
  def _bounded_stop(cls, v):
    strings = [v] if isinstance(v, str) else v or []
    if len(strings) > MAX_STOP_STRINGS:
      raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
    if any(len(x) > MAX_STOP_LEN for x in strings):
      raise ValueError(f"stop strings must be at most {MAX_STOP_LEN} characters")
    return v

  @pydantic.field_validator("stop_token_ids")
  @classmethod
  def _bounded_stop_ids(cls, v):
    if v is not None and len(v) > MAX_STOP_TOKEN_IDS:
      raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(v)}")
    return v

  def sampling_params(self, *, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams (its checks raise ValueError / TypeError naming the field)."""
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      if value not in (None, 0, 0.0):
        raise ValueError(f"{name} is not supported by this engine (only 0), got {value!r}")
    return SamplingParams(
        max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
        temperature=1.0 if self.temperature is None else self.temperature,
        top_p=1.0 if self.top_p is None else self.top_p,
        top_k=0 if self.top_k is None else self.top_k,
        n=self.n, stop=self.stop, stop_token_ids=self.stop_token_ids, seed=self.seed,
        min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
        use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
        logprobs=logprobs)


class CompletionRequest(_SamplingFields):
  """POST /v1/completions."""

  prompt: Union[str, list[str], TokenIds, list[TokenIds]]
  logprobs: StrictInt | None = None
  echo: pydantic.StrictBool = False
  suffix: str | None = None
  best_of: StrictInt | None = None

  def prompts(self) -> list:
    """The prompts of the request: one string or token-id list each."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if not p:
      raise ValueError("prompt must not be empty")
    if isinstance(p[0], int):
      return [list(p)]
    out = list(p)
    if any(isinstance(x, list) and not x for x in out):
      raise ValueError("prompt must not hold an empty token list")
    return out


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")
  role: Literal["system", "user", "assistant", "tool", "developer"]
  content: Union[str, list[dict], None] = None


class ChatCompletionRequest(_SamplingFields):
  """POST /v1/chat/completions."""

  messages: list[ChatMessage] = Field(min_length=1)
  logprobs: pydantic.StrictBool = False
  top_logprobs: StrictInt | None = None
  max_completion_tokens: StrictInt | None = None
  add_generation_prompt: pydantic.StrictBool = True

  def chat_logprobs(self) -> int | None:
    if not self.logprobs:
      if self.top_logprobs is not None:
        raise ValueError("top_logprobs requires logprobs=true")
      return None
    return self.top_logprobs or 0


def field_of(loc: tuple) -> str:
  """The request field of a pydantic error location: its first element ('body' stripped);
  the full path is in the message."""
  parts = [str(p) for p in loc if p != "body"]
  return parts[0] if parts else "body"


def path_of(loc: tuple) -> str:
  """'messages.0.role' from a pydantic error location (union member tags dropped)."""
  parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in (
      "str", "int", "list", "dict", "none", "bool", "float")))]
  return ".".join(parts) or "body"
