"""Beam search bookkeeping on the host: candidate selection, hypotheses, stopping.

Pure Python over the (id, logprob) candidates the device returns per beam; the
engine turns the selection into block-manager forks and frees (so beams share
their history's KV blocks, copy-on-write on the next write). Rules, as in
Hugging Face's `BeamSearchScorer` with early_stopping=False:
  * candidates are (beam, token) pairs scored by the beam's cumulative logprob
    plus the token's logprob; the best 2 * beam_width are walked in order;
  * an EOS candidate ranked within the first beam_width ends a hypothesis
    (kept, scored cum / len ** length_penalty); a later one is dropped;
  * the first beam_width non-EOS candidates become the next beams;
  * the search is done when beam_width hypotheses exist and the best running
    beam, scored at its current length, cannot beat the worst of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence


@dataclasses.dataclass
class Hypothesis:
  """A finished beam: generated token ids (EOS included), cumulative logprob, score."""

  token_ids: list[int]
  cumulative_logprob: float
  finish_reason: str
  score: float


def beam_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
  return cumulative_logprob / (max(length, 1) ** length_penalty)


def select(beams: Sequence[tuple[list[int], float]], cand_ids, cand_logprobs, *, beam_width: int,
           eos_ids: Collection[int], length_penalty: float
           ) -> tuple[list[tuple[int, int, float]], list[Hypothesis]]:
  """One beam-search step.

  Args:
    beams: per running beam, (generated token ids so far, cumulative logprob).
    cand_ids: [num_beams, K] candidate token ids per beam, best first (K >= 2 * beam_width).
    cand_logprobs: [num_beams, K] their logprobs.
    beam_width: beams to keep.
    eos_ids: ids that end a hypothesis (empty when EOS is ignored).
    length_penalty: exponent of the length normalisation.

  Returns:
    (next beams as (beam index, token, logprob), best first; new hypotheses).
  """
  cands = []
  for b, (_, cum) in enumerate(beams):
    for k in range(2 * beam_width):
      lp = float(cand_logprobs[b][k])
      cands.append((cum + lp, b, k, int(cand_ids[b][k]), lp))
  # Ties broken by beam order then candidate rank: deterministic on every path.
  cands.sort(key=lambda c: (-c[0], c[1], c[2]))
  nxt: list[tuple[int, int, float]] = []
  finished: list[Hypothesis] = []
  for rank, (cum, b, _, tok, lp) in enumerate(cands[:2 * beam_width]):
    if tok in eos_ids:
      if rank < beam_width:
        ids = beams[b][0] + [tok]
        finished.append(Hypothesis(ids, cum, "stop", beam_score(cum, len(ids), length_penalty)))
      continue
    nxt.append((b, tok, lp))
    if len(nxt) == beam_width:
      break
  return nxt, finished


def best(hypotheses: list[Hypothesis], k: int) -> list[Hypothesis]:
  return sorted(hypotheses, key=lambda h: -h.score)[:k]


def is_done(hypotheses: list[Hypothesis], running: Sequence[tuple[list[int], float]], *,
            beam_width: int, length_penalty: float) -> bool:
  """True when no running beam can still beat the worst of the best beam_width hypotheses."""
  if not running:
    return True
  if len(hypotheses) < beam_width:
    return False
  worst = best(hypotheses, beam_width)[-1].score
  best_running = max(beam_score(cum, len(ids), length_penalty) for ids, cum in running)
  return best_running <= worst
