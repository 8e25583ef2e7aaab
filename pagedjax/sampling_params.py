"""SamplingParams: how one request is decoded, shaped like vLLM's.

Validation happens here, at the public boundary: a value of the wrong type raises
`TypeError`, a value out of range (or not finite) raises `ValueError`; both name the
field and the value, before the request touches the engine. As in vLLM, numpy integers
and floats are accepted (and stored as Python numbers); a bool is not an int. The
engine adds the checks that need the model (vocabulary, context, cache size).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import numbers
from typing import Sequence

_GREEDY_EPS = 1e-5
_F32_MAX = 3.4028234663852886e38
_F32_TINY = 1.1754943508222875e-38  # smallest normal float32
_U64 = 1 << 64


def _int(name: str, value, *, minimum: int | None = None, none_ok: bool = False) -> int | None:
  if value is None and none_ok:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _float(name: str, value, *, device: bool = False) -> float:
  """A finite float; `device`: also finite as the float32 the step computes with."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}")
  if device and abs(value) > _F32_MAX:
    raise ValueError(f"{name}={value!r} is not representable as float32 (|x| <= {_F32_MAX:.4g})")
  return value


def _bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
  return value


def seed_words(seed: int) -> tuple[int, int]:
  """Maps any int seed to the device's 64-bit key space as (hi, lo) uint32 words.

  Seeds in [0, 2**64) map to themselves, so nearby seeds never collide; any other int
  (negative, or wider than 64 bits) is hashed (blake2b of its decimal form) into 64
  bits, so two such seeds collide only with probability 2**-64.
  """
  if not 0 <= seed < _U64:
    seed = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "big")
  return seed >> 32, seed & 0xFFFFFFFF


class RequestOutputKind(enum.Enum):
  """Which `LLM.step()` calls return a request's RequestOutput (vLLM's names).

  CUMULATIVE: every step that advanced it (all of its output so far; the streaming API).
  FINAL_ONLY: only the step that finished it (what `LLM.generate` needs: no output,
    detokenization or logprob dicts are built while it runs).
  (vLLM's DELTA kind, new tokens only, is not offered.)
  """

  CUMULATIVE = 0
  FINAL_ONLY = 2


@dataclasses.dataclass
class SamplingParams:
  """Decoding settings for one request.

  Attributes:
    max_tokens: most tokens to generate per output sequence (>= 1).
    temperature: 0 means greedy; > 0 scales the logits before sampling.
    top_k: keep the k most likely tokens; 0 (or -1, vLLM's spelling) keeps all; a k
      larger than the vocabulary keeps all.
    top_p: nucleus sampling mass in (0, 1]; 1 keeps all.
    seed: per-request PRNG seed, any int (see `seed_words`). None draws one from the
      engine's seed stream when the request is added (recorded, so preemption never
      changes it).
    stop: strings that end generation; the stop string is not returned.
    stop_token_ids: token ids that end generation (returned in token_ids).
    ignore_eos: keep generating past EOS.
    min_tokens: EOS and stop token ids are banned until this many tokens exist.
    n: number of output sequences (parallel sampling).
    use_beam_search: beam search instead of sampling.
    beam_width: beams kept per step (defaults to n).
    length_penalty: beam score = cum_logprob / len**length_penalty.
    logprobs: if set to k, also return, per generated token, the k most likely tokens
      with their logprobs (plus the sampled token), as vLLM does; 0 returns only the
      sampled token's.
    output_kind: RequestOutputKind: which `LLM.step()` calls return this request's
      output (CUMULATIVE: each step that advanced it; FINAL_ONLY: the last one).
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
  output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

  def __post_init__(self):
    self.max_tokens = _int("max_tokens", self.max_tokens, minimum=1)
    self.temperature = _float("temperature", self.temperature, device=True)
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    self.top_k = _int("top_k", self.top_k, minimum=-1)
    if self.top_k == -1:
      self.top_k = 0
    self.top_p = _float("top_p", self.top_p)
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.top_p < _F32_TINY:
      raise ValueError(f"top_p={self.top_p!r} rounds to 0 in float32; use a value >= "
                       f"{_F32_TINY:.4g} (any positive top_p keeps the most likely token)")
    self.seed = _int("seed", self.seed, none_ok=True)
    self.stop = self._stop_strings(self.stop)
    ids = self.stop_token_ids
    if ids is None:
      ids = []
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
      raise TypeError(f"stop_token_ids must be a list of ints, got {ids!r}")
    self.stop_token_ids = [_int("stop_token_ids[]", t, minimum=0) for t in ids]
    self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
    self.min_tokens = _int("min_tokens", self.min_tokens, minimum=0)
    if self.min_tokens > self.max_tokens:
      raise ValueError(
          f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
    self.n = _int("n", self.n, minimum=1)
    self.use_beam_search = _bool("use_beam_search", self.use_beam_search)
    self.beam_width = _int("beam_width", self.n if self.beam_width is None else self.beam_width,
                           minimum=1)
    self.length_penalty = _float("length_penalty", self.length_penalty)
    self.logprobs = _int("logprobs", self.logprobs, minimum=0, none_ok=True)
    if not isinstance(self.output_kind, RequestOutputKind):
      raise TypeError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r} "
                      f"({type(self.output_kind).__name__})")
    if self.use_beam_search:
      if self.beam_width < self.n:
        raise ValueError(f"beam_width={self.beam_width} must be >= n={self.n}")
      if self.temperature > _GREEDY_EPS:
        raise ValueError(
            f"beam search is deterministic: temperature must be 0, got {self.temperature!r}")

  @staticmethod
  def _stop_strings(stop) -> list[str]:
    if stop is None:
      return []
    if isinstance(stop, str):
      stop = [stop]
    elif not isinstance(stop, Sequence) or isinstance(stop, bytes):
      raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in stop:
      if not isinstance(s, str):
        raise TypeError(f"stop must hold strings, got {s!r} ({type(s).__name__}) in {stop!r}")
      if not s:
        raise ValueError(f"stop strings must be non-empty, got {stop!r}")
    return list(stop)

  @property
  def greedy(self) -> bool:
    return self.temperature < _GREEDY_EPS

  @property
  def width(self) -> int:
    """Sequences the request decodes: beam_width for beam search, else n."""
    return self.beam_width if self.use_beam_search else self.n
