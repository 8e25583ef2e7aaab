"""Sequence and SequenceGroup: the host-side record of one request.

A request (SequenceGroup) owns one or more sequences (parallel samples or
beams) that share the prompt. A sequence is a list of token ids: the prompt
followed by the generated tokens. This module only keeps records; block
allocation lives in the block manager and policy lives in the scheduler.
"""

from __future__ import annotations

import enum
import itertools

from pagedjax.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
  WAITING = "waiting"      # not on the device: needs a (re)prefill
  RUNNING = "running"      # blocks on the device
  SWAPPED = "swapped"      # blocks in the host pool
  FINISHED = "finished"


class Sequence:
  """One token stream: prompt + generated tokens."""

  _ids = itertools.count()

  def __init__(self, prompt_token_ids: list[int], *, request_id: str = "", sample_index: int = 0):
    self.seq_id = next(Sequence._ids)
    self.request_id = request_id
    self.prompt_token_ids = list(prompt_token_ids)
    self.output_token_ids: list[int] = []
    self.output_logprobs: list[float] = []
    self.cumulative_logprob = 0.0
    self.sample_index = sample_index  # the sample's own PRNG stream (n > 1)
    self.status = SequenceStatus.WAITING
    self.finish_reason: str | None = None
    self.stop_reason: str | int | None = None
    # Set only when a stop string ends the sequence: the text before it. Otherwise the
    # text is the detokenized output, computed when an output is built.
    self.output_text: str | None = None
    # Characters of detokenized text seen by the last stop-string check.
    self.num_text_chars = 0

  @property
  def num_tokens(self) -> int:
    return len(self.prompt_token_ids) + len(self.output_token_ids)

  @property
  def token_ids(self) -> list[int]:
    return self.prompt_token_ids + self.output_token_ids

  @property
  def last_token_id(self) -> int:
    return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

  @property
  def is_finished(self) -> bool:
    return self.status is SequenceStatus.FINISHED

  def fork(self, *, sample_index: int) -> Sequence:
    """A new sequence with this one's tokens so far (its blocks are forked by the caller)."""
    child = Sequence(self.prompt_token_ids, request_id=self.request_id, sample_index=sample_index)
    child.output_token_ids = list(self.output_token_ids)
    child.output_logprobs = list(self.output_logprobs)
    child.cumulative_logprob = self.cumulative_logprob
    child.output_text = self.output_text
    child.num_text_chars = self.num_text_chars
    child.status = self.status
    return child

  def append_token(self, token_id: int, logprob: float) -> None:
    self.output_token_ids.append(token_id)
    self.output_logprobs.append(logprob)
    self.cumulative_logprob += logprob

  def __repr__(self) -> str:
    return (f"Sequence(id={self.seq_id}, prompt={len(self.prompt_token_ids)}, "
            f"out={len(self.output_token_ids)}, {self.status.value})")


class SequenceGroup:
  """One request: its sampling params and its sequences (n samples / beams)."""

  def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               *, arrival: int, seed: int, prompt: str | None = None):
    self.request_id = request_id
    self.prompt = prompt  # the prompt text, when the request gave one
    self.prompt_token_ids = list(prompt_token_ids)
    self.params = params
    self.arrival = arrival  # monotone admission order: lower = higher priority
    self.seed = seed        # resolved per-request seed (params.seed or drawn at add time)
    self.seqs = [Sequence(prompt_token_ids, request_id=request_id)]
    # Beam search only: finished hypotheses (beam_search.Hypothesis).
    self.hypotheses: list = []

  def seqs_with(self, status: SequenceStatus) -> list[Sequence]:
    return [s for s in self.seqs if s.status is status]

  @property
  def is_finished(self) -> bool:
    return all(s.is_finished for s in self.seqs)

  def __repr__(self) -> str:
    return f"SequenceGroup({self.request_id!r}, arrival={self.arrival}, seqs={self.seqs})"
