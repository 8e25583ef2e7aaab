"""Token sampling on device: greedy, temperature, top-k, top-p, bans, top logprobs.

Every row carries its own settings, so one jitted program serves a batch of requests
with different SamplingParams. The PRNG key of a row is derived from (request seed,
sample index, output position) and never from the batch slot, so a request draws the
same tokens whatever else shares its batch, however its prompt was chunked and however
often it is preempted. A seed is 64 bits, passed as two uint32 words (the threefry key
data), so every Python seed maps to its own stream (see
`SamplingParams.device_seed`).

Logprobs are the log-softmax of the raw logits (before temperature / top-k / top-p),
after removing ids outside the real vocabulary and banned ids; this is what
cumulative_logprob, beam search and the returned top logprobs use (vLLM's default
"raw" logprobs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def row_keys(seeds: jax.Array, sample_indices: jax.Array, positions: jax.Array) -> jax.Array:
  """One PRNG key per row: seeds uint32 [R, 2] (hi, lo words), indices / positions [R] int."""

  def one(seed, index, pos):
    key = jax.random.wrap_key_data(seed.astype(jnp.uint32), impl="threefry2x32")
    return jax.random.fold_in(jax.random.fold_in(key, index), pos)

  return jax.vmap(one)(seeds, sample_indices, positions)


def sample(logits: jax.Array, *, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys, banned_ids: jax.Array, vocab_size: int, num_top_logprobs: int,
           need_top=True):
  """Samples one token per row.

  Args:
    logits: [R, V] float logits (V may exceed vocab_size: padded ids are masked).
    temperature: [R] float; < 1e-5 means greedy (argmax).
    top_k: [R] int; 0 keeps every token (values above V keep every token too).
    top_p: [R] float in (0, 1].
    keys: [R] PRNG keys (see `row_keys`), or a function returning them: called only
      where a row draws (an all-greedy batch derives no keys).
    banned_ids: [R, K] int32 token ids that may not be drawn (-1 = unused).
    vocab_size: real vocabulary size (static).
    num_top_logprobs: how many (id, logprob) pairs to return per row (static).
    need_top: bool scalar (traced or not): whether any row wants its top tokens
      (logprobs, beam search); if not, top_ids / top_logprobs are zeros and the top-k
      is skipped.

  Returns:
    tokens [R] int32, logprobs [R] float32 (of the drawn tokens), ranks [R] int32 (1 =
    the most likely token), top_ids [R, num_top_logprobs] int32,
    top_logprobs [R, num_top_logprobs] f32.
  """
  logits = logits.astype(jnp.float32)
  _, v = logits.shape
  ids = jnp.arange(v, dtype=jnp.int32)
  banned = (banned_ids[:, :, None] == ids[None, None, :]).any(axis=1)  # [R, V]
  allowed = (ids[None, :] < vocab_size) & ~banned
  logits = jnp.where(allowed, logits, _NEG_INF)
  logprobs = jax.nn.log_softmax(logits, axis=-1)

  greedy = temperature < 1e-5
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw():
    # The mask is applied again after scaling: a huge temperature must not bring
    # disallowed ids (at -inf) back level with the allowed ones.
    scaled = jnp.where(allowed, logits / jnp.where(greedy, 1.0, temperature)[:, None], _NEG_INF)
    # top-k and top-p on the sorted row (descending); thresholds mapped back by value.
    sorted_logits = -jnp.sort(-scaled, axis=-1)  # [R, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [R, 1]
    sorted_probs = jax.nn.softmax(jnp.where(sorted_logits >= kth, sorted_logits, _NEG_INF), -1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < top_p[:, None]) & (sorted_logits >= kth)
    keep_sorted = keep_sorted.at[:, 0].set(True)  # the most likely token, whatever top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where((scaled >= cutoff) & allowed, scaled, _NEG_INF)
    row_keys_ = keys() if callable(keys) else keys
    drawn = jax.vmap(jax.random.categorical)(row_keys_, filtered).astype(jnp.int32)
    return jnp.where(greedy, argmax, drawn)

  # An all-greedy batch (common in serving benchmarks) skips the sort and the draws.
  tokens = jax.lax.cond(jnp.all(greedy), lambda: argmax, draw)
  token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  ranks = 1 + (logprobs > token_logprobs[:, None]).sum(-1, dtype=jnp.int32)
  r = logits.shape[0]

  def top():
    values, ids = jax.lax.top_k(logprobs, num_top_logprobs)
    return ids.astype(jnp.int32), values

  def no_top():
    return (jnp.zeros((r, num_top_logprobs), jnp.int32),
            jnp.zeros((r, num_top_logprobs), jnp.float32))

  # XLA:CPU's top-k is a heap per row: ~0.3 ms of a 64-row step that most batches discard.
  top_ids, top_logprobs = jax.lax.cond(jnp.asarray(need_top, bool), top, no_top)
  return tokens, token_logprobs, ranks, top_ids, top_logprobs
