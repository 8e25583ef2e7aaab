"""SamplingParams: how one request is decoded, shaped like vLLM's.

Validation happens here, at the public boundary: every bad value raises a
`ValueError` that names it, before the request touches the scheduler.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

_GREEDY_EPS = 1e-5


@dataclasses.dataclass
class SamplingParams:
  """Decoding settings for one request.

  Attributes:
    max_tokens: most tokens to generate per output sequence (>= 1).
    temperature: 0 means greedy; > 0 scales the logits before sampling.
    top_k: keep the k most likely tokens; 0 (or -1, vLLM's spelling) keeps all.
    top_p: nucleus sampling mass in (0, 1]; 1 keeps all.
    seed: per-request PRNG seed. None draws one from the engine's seed stream
      when the request is added (recorded, so preemption never changes it).
    stop: strings that end generation; the stop string is not returned.
    stop_token_ids: token ids that end generation (returned in token_ids).
    ignore_eos: keep generating past EOS.
    min_tokens: EOS and stop token ids are banned until this many tokens exist.
    n: number of output sequences (parallel sampling).
    use_beam_search: beam search instead of sampling.
    beam_width: beams kept per step (defaults to n).
    length_penalty: beam score = cum_logprob / len**length_penalty.
    logprobs: if set, also return the logprob of each sampled token.
  """

  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: str | Sequence[str] | None = None
  stop_token_ids: Sequence[int] | None = None
  ignore_eos: bool = False
  min_tokens: int = 0
  n: int = 1
  use_beam_search: bool = False
  beam_width: int | None = None
  length_penalty: float = 1.0
  logprobs: int | None = None

  def __post_init__(self):
    if isinstance(self.stop, str):
      self.stop = [self.stop]
    self.stop = list(self.stop or [])
    self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
    if self.top_k == -1:
      self.top_k = 0
    if self.beam_width is None:
      self.beam_width = self.n
    self._validate()

  def _validate(self) -> None:
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (or -1 for all), got {self.top_k!r}")
    if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
      raise ValueError(
          f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
    if not isinstance(self.n, int) or self.n < 1:
      raise ValueError(f"n must be an int >= 1, got {self.n!r}")
    if self.seed is not None and not isinstance(self.seed, int):
      raise ValueError(f"seed must be an int or None, got {self.seed!r}")
    if any(not s for s in self.stop):
      raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
    if self.logprobs is not None and self.logprobs < 0:
      raise ValueError(f"logprobs must be >= 0, got {self.logprobs!r}")
    if self.use_beam_search:
      if self.beam_width < self.n:
        raise ValueError(f"beam_width={self.beam_width} must be >= n={self.n}")
      if self.temperature > _GREEDY_EPS:
        raise ValueError(
            f"beam search is deterministic: temperature must be 0, got {self.temperature!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature < _GREEDY_EPS
