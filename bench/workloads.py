"""Seeded synthetic request traces named after the vLLM paper's length mixes.

The vLLM paper (Kwon et al., SOSP 2023, Fig. 11) serves two traces: ShareGPT
(mean 161.31 input / 337.99 output tokens) and Alpaca (19.31 / 58.45), both long-tailed.
Nothing is downloaded here: lengths are drawn from log-normal distributions with those
means, then *scaled* to the model's context, then clipped. The scale factor defaults to
`max_seq_len / 2048` (2048 is the context of the OPT models the paper served), so the
bundled 512-token model gets 0.25: "sharegpt-like" becomes ~40 in / ~85 out. Benchmarks
must print the factor and the realised means (`Trace.describe`) next to their results.

Clipping: prompt in [1, max_seq_len - 1], output in [1, max_seq_len - prompt], so every
request fits the context and a server generates exactly `output_len` tokens
(with ignore_eos). Prompt token ids are uniform random byte ids (0..255).

This module does not talk to an engine: it only makes lengths and token ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Paper means (input, output) in tokens; the tail shape (sigma) is ours.
MIXES = {
  "sharegpt-like": (161.31, 337.99),
  "alpaca-like": (19.31, 58.45),
}
# Log-normal shape for both lengths: sigma 0.8 gives a p99 / mean ratio near 4.5.
SIGMA = 0.8
REFERENCE_CONTEXT = 2048


@dataclasses.dataclass(frozen=True)
class Trace:
  """A list of requests: prompt token ids and how many tokens each must generate.

  Attributes:
    name: the mix name (a key of MIXES).
    seed: the numpy seed it was drawn with.
    scale: factor applied to the paper's means before clipping.
    max_seq_len: the context the lengths were clipped to.
    prompts: one list of token ids per request.
    output_lens: tokens to generate per request (max_tokens, with ignore_eos).
  """

  name: str
  seed: int
  scale: float
  max_seq_len: int
  prompts: list[list[int]]
  output_lens: list[int]

  @property
  def prompt_lens(self) -> list[int]:
    return [len(p) for p in self.prompts]

  def describe(self) -> dict:
    """JSON-friendly summary: inputs, realised length statistics and the scaling used."""
    pin, pout = MIXES[self.name]
    p, o = np.asarray(self.prompt_lens), np.asarray(self.output_lens)
    return {
      "name": self.name,
      "seed": self.seed,
      "num_requests": len(self.prompts),
      "paper_mean_input": pin,
      "paper_mean_output": pout,
      "scale": self.scale,
      "scale_note": f"lengths = paper-mix log-normal x {self.scale:g} "
      f"(model context {self.max_seq_len} / {REFERENCE_CONTEXT}), clipped to the context",
      "mean_input": float(p.mean()),
      "mean_output": float(o.mean()),
      "p50_input": float(np.median(p)),
      "p50_output": float(np.median(o)),
      "max_input": int(p.max()),
      "max_output": int(o.max()),
      "total_output_tokens": int(o.sum()),
    }


def _lognormal(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
  mu = np.log(mean) - SIGMA**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
  return rng.lognormal(mu, SIGMA, n)


def make_trace(
  name: str, num_requests: int, *, max_seq_len: int, seed: int = 0, scale: float | None = None
) -> Trace:
  """Draws a seeded trace.

  Args:
    name: "sharegpt-like" or "alpaca-like".
    num_requests: number of requests (>= 1).
    max_seq_len: the model's context; prompt + output never exceeds it.
    seed: numpy seed; the same arguments always give the same trace.
    scale: multiplies the paper's means; None means max_seq_len / 2048.

  Returns:
    The Trace.
  """
  if name not in MIXES:
    raise ValueError(f"unknown mix {name!r}; expected one of {sorted(MIXES)}")
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
  scale = max_seq_len / REFERENCE_CONTEXT if scale is None else scale
  if scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  rng = np.random.default_rng(seed)
  mean_in, mean_out = MIXES[name]
  ins = np.clip(np.rint(_lognormal(rng, mean_in * scale, num_requests)), 1, max_seq_len - 1)
  outs = np.rint(_lognormal(rng, mean_out * scale, num_requests))
  outs = np.clip(outs, 1, max_seq_len - ins)
  prompts = [rng.integers(0, 256, int(n)).tolist() for n in ins]
  return Trace(name, seed, scale, max_seq_len, prompts, [int(n) for n in outs])
