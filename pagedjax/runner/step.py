"""The jitted engine step: copy-on-write copies, paged forward, sampling.

One pure function of (params, KV cache, step plan, sampling arrays); the cache is
donated so its pages update in place. It is module-level with the model's graphdef
as a static argument, so every engine serving the same model structure shares the
compiled programs (one per padded shape). It knows nothing of requests or blocks:
the engine builds the plan from the scheduler's decisions.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from pagedjax.runner import kv_cache as kvc
from pagedjax.runner import sampler

# (id, logprob) pairs returned per sample row each step; beam search needs 2 * beam_width.
NUM_TOP_LOGPROBS = 16
TRACES = {"step": 0}  # traces (= compilations) of `step` in this process


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "vocab_size"),
                   donate_argnames=("kv",))
def step(params, kv, plan, samp, *, graphdef, impl, vocab_size):
  """One engine step.

  Args:
    params: the model's nnx state (split from graphdef).
    kv: the paged KVCache (donated).
    plan: int32 arrays: tokens / positions / slot_mapping [B, T], block_tables [B, P],
      context_lens / query_lens [B], cow_src / cow_dst [B] (-1 = padding).
    samp: per sample row [R]: row_index (its logit row), seeds, sample_indices,
      out_positions, temperature, top_k, top_p; banned_ids [R, K].
    graphdef: the model's static graph definition.
    impl: attention implementation.
    vocab_size: the tokenizer's vocabulary (ids beyond it are never drawn).

  Returns:
    (new KVCache, (tokens [R], logprobs [R], top_ids [R, N], top_logprobs [R, N])).
  """
  TRACES["step"] += 1  # runs once per trace, i.e. per compiled program
  kv = kvc.copy_kv_blocks(kv, plan["cow_src"], plan["cow_dst"])
  model = nnx.merge(graphdef, params)
  logits, kv = model.forward_paged(
      plan["tokens"], plan["positions"], kv, block_tables=plan["block_tables"],
      context_lens=plan["context_lens"], query_lens=plan["query_lens"],
      slot_mapping=plan["slot_mapping"], impl=impl)  # logits [B, V] at each row's last token
  logits = logits[samp["row_index"]]  # [R, V]: one row per sample
  keys = sampler.row_keys(samp["seeds"], samp["sample_indices"], samp["out_positions"])
  out = sampler.sample(logits, temperature=samp["temperature"], top_k=samp["top_k"],
                       top_p=samp["top_p"], keys=keys, banned_ids=samp["banned_ids"],
                       vocab_size=vocab_size, num_top_logprobs=NUM_TOP_LOGPROBS)
  return kv, out
