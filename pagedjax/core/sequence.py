"""Sequence and SequenceGroup: the host-side record of one request.

A request (SequenceGroup) owns one or more sequences (parallel samples or beams) that
share the prompt. A sequence is a list of token ids, the prompt followed by the
generated tokens, and `num_computed_tokens`: how many of them have their K/V in the
cache. A step computes some of the rest (a prefill chunk, or the one token a decode
feeds) and, when it reaches the last token, samples the next one.

This module only keeps records: block allocation lives in the block manager, policy in
the scheduler, text in the engine's output processor.
"""

from __future__ import annotations

import enum
import itertools

from pagedjax.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
  WAITING = "waiting"      # no blocks: needs a (re)prefill
  RUNNING = "running"      # blocks on the device (possibly still prefilling)
  SWAPPED = "swapped"      # blocks in the host pool
  FINISHED = "finished"


# Read in the per-step loops: an enum member's attribute lookup (SequenceStatus.X) costs
# ~3x a module global's on Python 3.11.
_RUNNING, _FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED


class Sequence:
  """One token stream: prompt + generated tokens, and how much of it is cached."""

  _ids = itertools.count()

  def __init__(self, prompt_token_ids: list[int], *, request_id: str = "", sample_index: int = 0):
    self.seq_id = next(Sequence._ids)
    self.request_id = request_id
    self.prompt_token_ids = prompt_token_ids  # shared, never mutated
    self.output_token_ids: list[int] = []
    self.output_logprobs: list[float] = []
    # Per generated token, the top (token id, logprob) pairs when the request asked for
    # logprobs (SamplingParams.logprobs), else empty.
    self.output_top_logprobs: list[list[tuple[int, float]]] = []
    self.output_ranks: list[int] = []  # rank of each sampled token (with logprobs only)
    self.cumulative_logprob = 0.0
    self.sample_index = sample_index  # the sample's own PRNG stream (n > 1)
    self.status = SequenceStatus.WAITING
    # Tokens whose K/V are in the sequence's blocks (device or host).
    self.num_computed_tokens = 0
    self.finish_reason: str | None = None
    self.stop_reason: str | int | None = None
    # Set when a stop string ends the sequence: the text before it. Otherwise the text
    # is the detokenized output, computed when an output is built.
    self.output_text: str | None = None
    # Characters of detokenized text, and output tokens, seen by the last stop-string check.
    self.num_text_chars = 0
    self.num_stop_checked = 0
    # The engine's incremental detokenizer of the output and its built logprob dicts
    # (caches of the output processor, rebuilt on demand: not copied by fork).
    self.detokenizer = None
    self.logprob_dicts: list = []

  @property
  def num_tokens(self) -> int:
    return len(self.prompt_token_ids) + len(self.output_token_ids)

  def token_slice(self, start: int, end: int) -> list[int]:
    """Token ids at positions [start, end) of prompt + output."""
    p = len(self.prompt_token_ids)
    if end <= p:
      return self.prompt_token_ids[start:end]
    if start >= p:
      return self.output_token_ids[start - p:end - p]
    return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

  @property
  def num_uncomputed_tokens(self) -> int:
    return self.num_tokens - self.num_computed_tokens

  @property
  def is_finished(self) -> bool:
    return self.status is _FINISHED

  def fork(self, *, sample_index: int) -> Sequence:
    """A new sequence with this one's tokens so far (its blocks are forked by the caller)."""
    child = Sequence(self.prompt_token_ids, request_id=self.request_id, sample_index=sample_index)
    child.output_token_ids = list(self.output_token_ids)
    child.output_logprobs = list(self.output_logprobs)
    child.output_top_logprobs = list(self.output_top_logprobs)
    child.output_ranks = list(self.output_ranks)
    child.cumulative_logprob = self.cumulative_logprob
    child.num_computed_tokens = self.num_computed_tokens
    child.output_text = self.output_text
    child.num_text_chars = self.num_text_chars
    child.num_stop_checked = self.num_stop_checked
    child.status = self.status
    return child

  def append_token(self, token_id: int, logprob: float, top=None) -> None:
    self.output_token_ids.append(token_id)
    self.output_logprobs.append(logprob)
    if top is not None:
      self.output_top_logprobs.append(top)
    self.cumulative_logprob += logprob

  def reset_for_recompute(self) -> None:
    """Drops the cache state: every token is computed again (recompute preemption)."""
    self.num_computed_tokens = 0
    self.status = SequenceStatus.WAITING

  def __repr__(self) -> str:
    return (f"Sequence(id={self.seq_id}, prompt={len(self.prompt_token_ids)}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"{self.status.value})")


class SequenceGroup:
  """One request: its sampling params and its sequences (n samples / beams).

  Attributes:
    request_id, prompt, prompt_token_ids, params: what the request asked for.
    arrival: monotone admission order; lower = higher priority.
    seed: the resolved 64-bit seed of the request's PRNG streams.
    seqs: the live sequences (finished ones are removed for beams, kept for samples).
    hypotheses: beam search only: finished beams (beam_search.Hypothesis).
    width: sequences the request decodes (n, or beam_width for beam search).
    forked: whether the prompt has been sampled (and forked into `width` sequences).
    shared_prefix_tokens: after a recompute preemption of a forked group, the prompt
      tokens (whole blocks) its sequences share again: the first sequence recomputes
      them, the others fork those blocks instead of computing their own copies.
    error: the message of a failure inside a step, if one ended this request.
  """

  def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               *, arrival: int, seed: int, prompt: str | None = None, cache_salt: str | None = None):
    self.request_id = request_id
    self.prompt = prompt
    self.prompt_token_ids = list(prompt_token_ids)
    self.params = params
    self.arrival = arrival
    self.seed = seed
    self.cache_salt = cache_salt
    self.seqs = [Sequence(self.prompt_token_ids, request_id=request_id)]
    self.hypotheses: list = []
    self.width = params.width
    self.forked = False
    self.shared_prefix_tokens = 0
    self.error: str | None = None
    # Wall-clock marks for metrics (set by the engine): arrival, first token, last token.
    self.arrival_time: float | None = None
    self.first_token_time: float | None = None

  def seqs_with(self, status: SequenceStatus) -> list[Sequence]:
    return [s for s in self.seqs if s.status is status]

  # (The three below run for every request several times per step: one-sequence
  # requests, most of them, take a path without a generator.)
  @property
  def live_seqs(self) -> list[Sequence]:
    seqs = self.seqs
    if len(seqs) == 1:
      return [] if seqs[0].status is _FINISHED else [seqs[0]]
    return [s for s in seqs if s.status is not _FINISHED]

  @property
  def is_finished(self) -> bool:
    seqs = self.seqs
    if len(seqs) == 1:
      return seqs[0].status is _FINISHED
    return all(s.status is _FINISHED for s in seqs)

  @property
  def num_seats(self) -> int:
    """Sequences this request occupies in a batch (counts the width before the fork)."""
    return self.width if not self.forked else len(self.live_seqs)

  def is_decode_ready(self) -> bool:
    """Every live sequence has all but its last token cached: the next step decodes."""
    live = self.live_seqs
    return bool(live) and all(s.num_computed_tokens == s.num_tokens - 1 for s in live)

  def __repr__(self) -> str:
    return f"SequenceGroup({self.request_id!r}, arrival={self.arrival}, seqs={self.seqs})"
