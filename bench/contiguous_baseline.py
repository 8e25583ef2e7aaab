"""A contiguous-KV, static-batching server: the pre-vLLM design the engine is compared with.

What it is (the classic FasterTransformer / early-Orca shape the vLLM paper measures):
  * every sequence of a batch owns a *contiguous* KV region preallocated for its maximum
    length S_max, in one array per K and V of shape [L, B, S_max, Hkv, D];
  * at a fixed KV byte budget that allows B = budget_tokens // S_max sequences at once;
  * batches are *static*: B requests are prefilled together, then decoded together until
    the longest of them has produced all its tokens; finished rows keep occupying their
    slot (and compute) until the batch ends; only then does the next batch start.

Two reservation policies (`reserve=`):
  * "max-context": S_max = the model's context (what a server that does not know output
    lengths must reserve; the vLLM paper's "Orca (Max)");
  * "oracle": S_max = the batch's longest prompt + max_tokens, rounded up to a multiple
    of 64 (knows every output length in advance; the paper's "Orca (Oracle)"), and batches
    are formed greedily so that B * S_max fits the budget.

It runs the same weights through the model's own `Attention.qkv` / `Attention.out`, `MLP`
and norms, with its own jitted prefill and decode (dense masked attention from
`pagedjax.runner.attention`'s references over the contiguous cache), greedy decoding only, no
EOS handling: every request generates exactly its `output_len` tokens (like the engine
with ignore_eos=True). It does no paging, preemption or sampling, by design.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pagedjax.intmath import next_power_of_two, round_up
from pagedjax.runner.attention import decode_attention_reference, prefill_attention_reference

RESERVE_POLICIES = ("max-context", "oracle")
_ORACLE_ROUND = 64  # oracle S_max granularity: bounds the number of compiled shapes
_KV_LEN_ROUND = 128  # decode attends to a prefix of this granularity, not all of S_max
_MIN_PREFILL = 16


@dataclasses.dataclass
class BatchStats:
  """Counters over a `ContiguousServer.generate` call.

  Attributes:
    num_batches: static batches run.
    num_steps: jitted calls (one prefill + decode steps per batch).
    used_token_steps: sum over decode steps of the KV tokens of still-running requests.
    reserved_token_steps: sum over decode steps of the B * S_max slots of the batch.
    budget_token_steps: sum over decode steps of the whole budget's slots.
    step_time_s: time inside prefill/decode calls, device_get included.
  """

  num_batches: int = 0
  num_steps: int = 0
  used_token_steps: int = 0
  reserved_token_steps: int = 0
  budget_token_steps: int = 0
  step_time_s: float = 0.0


class ContiguousServer:
  """Static batches over a contiguous, preallocated KV cache.

  Args:
    module: the `pagedjax.runner.model.Transformer` (its weights are used as they are).
    budget_tokens: KV slots (tokens) the cache may hold in all; same bytes per token as
      the engine's paged cache.
    reserve: "max-context" or "oracle" (see the module docstring).
    num_valid_tokens: argmax only over ids below this (the tokenizer's vocabulary).
  """

  def __init__(
    self,
    module,
    *,
    budget_tokens: int,
    reserve: str = "max-context",
    num_valid_tokens: int | None = None,
  ):
    if reserve not in RESERVE_POLICIES:
      raise ValueError(f"reserve must be one of {RESERVE_POLICIES}, got {reserve!r}")
    cfg = module.cfg
    if budget_tokens < cfg.max_seq_len and reserve == "max-context":
      raise ValueError(f"budget_tokens={budget_tokens} holds no {cfg.max_seq_len}-token sequence")
    self.cfg = cfg
    self.budget_tokens = budget_tokens
    self.reserve = reserve
    self.num_valid_tokens = num_valid_tokens or cfg.vocab_size
    self._graphdef, self._params = nnx.split(module)
    self.num_compilations = 0
    self.stats = BatchStats()
    self._prefill = jax.jit(self._prefill_fn, donate_argnames=("cache",))
    self._decode = jax.jit(self._decode_fn, donate_argnames=("cache",), static_argnames=("kv_len",))

  # ------------------------------------------------------------------ jitted
  def _greedy(self, model, x):
    logits = model.logits(x)[:, 0, : self.num_valid_tokens]  # [B, V']
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def _prefill_fn(self, params, cache, tokens, lens):
    """tokens [B, T] right-padded, lens [B] -> (cache, first generated token [B])."""
    self.num_compilations += 1  # once per trace = per compiled program
    model = nnx.merge(self._graphdef, params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = model.embed_tokens(tokens)  # [B, T, dim]
    ks, vs = list(cache[0]), list(cache[1])
    zeros = jnp.zeros((b,), jnp.int32)
    for i, layer in enumerate(model.layers):
      q, k, v = layer.attn.qkv(layer.attn_norm(x), positions)  # [B, T, H|Hkv, D]
      # Padded positions >= lens are written too; decode overwrites each before reading it.
      ks[i] = jax.lax.dynamic_update_slice(ks[i], k.astype(ks[i].dtype), (0, 0, 0, 0))
      vs[i] = jax.lax.dynamic_update_slice(vs[i], v.astype(vs[i].dtype), (0, 0, 0, 0))
      o = prefill_attention_reference(q, k, v, zeros, lens, sm_scale=layer.attn.sm_scale)
      x = x + layer.attn.out(o)
      x = x + layer.mlp(layer.mlp_norm(x))
    last = jnp.take_along_axis(x, (lens - 1)[:, None, None], axis=1)  # [B, 1, dim]
    return (tuple(ks), tuple(vs)), self._greedy(model, last)

  def _decode_fn(self, params, cache, tokens, positions, *, kv_len):
    """tokens, positions [B] -> (cache, next token [B]); attends to cache[:, :kv_len]."""
    self.num_compilations += 1
    model = nnx.merge(self._graphdef, params)
    b = tokens.shape[0]
    rows = jnp.arange(b)
    x = model.embed_tokens(tokens[:, None])  # [B, 1, dim]
    ks, vs = list(cache[0]), list(cache[1])
    for i, layer in enumerate(model.layers):
      q, k, v = layer.attn.qkv(layer.attn_norm(x), positions[:, None])
      ks[i] = ks[i].at[rows, positions].set(k[:, 0].astype(ks[i].dtype))
      vs[i] = vs[i].at[rows, positions].set(v[:, 0].astype(vs[i].dtype))
      o = decode_attention_reference(
        q[:, 0], ks[i][:, :kv_len], vs[i][:, :kv_len], positions + 1, sm_scale=layer.attn.sm_scale
      )
      x = x + layer.attn.out(o[:, None])
      x = x + layer.mlp(layer.mlp_norm(x))
    return (tuple(ks), tuple(vs)), self._greedy(model, x)

  # -------------------------------------------------------------------- host
  def _new_cache(self, b: int, s: int):
    cfg = self.cfg
    # One [B, S_max, Hkv, D] array per layer (together the [L, B, S_max, Hkv, D] cache):
    # on XLA:CPU indexing layer i of a stacked array inside jit copies that layer.
    shape = (b, s, cfg.num_kv_heads, cfg.head_dim)
    dt = cfg.compute_dtype
    return (
      tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
      tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
    )

  def plan_batches(
    self, prompt_lens: list[int], output_lens: list[int]
  ) -> list[tuple[list[int], int]]:
    """FCFS static batches as (request indices, S_max), each within the budget."""
    ctx = self.cfg.max_seq_len
    batches, i, n = [], 0, len(prompt_lens)
    while i < n:
      if self.reserve == "max-context":
        b = self.budget_tokens // ctx
        batches.append((list(range(i, min(n, i + b))), ctx))
        i += b
        continue
      idx, s_max = [], 0
      while i < n:
        s = min(ctx, round_up(prompt_lens[i] + output_lens[i], _ORACLE_ROUND))
        s_new = max(s_max, s)
        if idx and (len(idx) + 1) * s_new > self.budget_tokens:
          break
        if not idx and s_new > self.budget_tokens:
          raise ValueError(f"request {i} needs {s_new} slots; budget is {self.budget_tokens}")
        idx.append(i)
        s_max = s_new
        i += 1
      batches.append((idx, s_max))
    return batches

  def _shapes(self, lens: np.ndarray, outs: np.ndarray, s_max: int) -> tuple[int, list[int]]:
    """(prefill length T, decode kv_len of each decode step) of one static batch."""
    t = min(s_max, next_power_of_two(int(lens.max()), _MIN_PREFILL))
    top = int(lens.max())
    kv_lens = [
      min(s_max, round_up(min(top + step - 1, s_max - 1) + 1, _KV_LEN_ROUND))
      for step in range(1, int(outs.max()))
    ]
    return t, kv_lens

  def warmup(self, prompt_lens: list[int], output_lens: list[int]) -> None:
    """Compiles every program `generate` will run on these lengths, on dummy inputs."""
    seen = set()
    for idx, s_max in self.plan_batches(prompt_lens, output_lens):
      b = len(idx)
      lens = np.array([prompt_lens[j] for j in idx], np.int32)
      t, kv_lens = self._shapes(lens, np.array([output_lens[j] for j in idx]), s_max)
      for kv_len in [None, *kv_lens]:
        if (b, s_max, t, kv_len) in seen:
          continue
        seen.add((b, s_max, t, kv_len))
        cache = self._new_cache(b, s_max)
        if kv_len is None:
          out = self._prefill(self._params, cache, np.zeros((b, t), np.int32), lens)
        else:
          zeros = np.zeros((b,), np.int32)
          out = self._decode(self._params, cache, zeros, zeros, kv_len=kv_len)
        jax.block_until_ready(out)

  def generate(
    self, prompts: list[list[int]], output_lens: list[int], *, pbar=None
  ) -> list[list[int]]:
    """Greedy-generates output_lens[i] tokens for every prompt, batch after batch.

    Args:
      prompts: token id lists (each non-empty, prompt + output within the context).
      output_lens: tokens to generate per request (>= 1).
      pbar: optional tqdm bar, advanced by one per finished request.

    Returns:
      The generated token ids per request, in input order.
    """
    if len(prompts) != len(output_lens):
      raise ValueError(f"{len(prompts)} prompts but {len(output_lens)} output_lens")
    for p, o in zip(prompts, output_lens):
      if not p or o < 1 or len(p) + o > self.cfg.max_seq_len:
        raise ValueError(
          f"bad request: prompt of {len(p)} tokens, output_len {o}, context {self.cfg.max_seq_len}"
        )
    prompt_lens = [len(p) for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]
    st = self.stats
    for idx, s_max in self.plan_batches(prompt_lens, output_lens):
      b = len(idx)
      lens = np.array([prompt_lens[j] for j in idx], np.int32)
      outs = np.array([output_lens[j] for j in idx], np.int32)
      t, kv_lens = self._shapes(lens, outs, s_max)
      tokens = np.zeros((b, t), np.int32)
      for r, j in enumerate(idx):
        tokens[r, : lens[r]] = prompts[j]
      cache = self._new_cache(b, s_max)
      start = time.perf_counter()
      cache, tok = self._prefill(self._params, cache, tokens, lens)
      tok = np.asarray(jax.device_get(tok))
      st.step_time_s += time.perf_counter() - start
      st.num_steps += 1
      st.num_batches += 1
      if pbar is not None:
        pbar.update(int((outs == 1).sum()))
      gen = [tok]
      for step in range(1, int(outs.max())):
        # Row r writes its token `step - 1` at position lens[r] + step - 1; rows that have
        # finished keep computing on a clamped position (their output is discarded).
        pos = np.minimum(lens + step - 1, s_max - 1).astype(np.int32)
        kv_len = kv_lens[step - 1]
        start = time.perf_counter()
        cache, tok = self._decode(self._params, cache, tok, pos, kv_len=kv_len)
        tok = np.asarray(jax.device_get(tok))
        st.step_time_s += time.perf_counter() - start
        st.num_steps += 1
        gen.append(tok)
        live = outs > step
        st.used_token_steps += int((lens + step)[live].sum())
        st.reserved_token_steps += b * s_max
        st.budget_token_steps += self.budget_tokens
        if pbar is not None:
          pbar.update(int((outs == step + 1).sum()))
      gen = np.stack(gen, axis=1)  # [B, max out]
      for r, j in enumerate(idx):
        results[j] = gen[r, : outs[r]].tolist()
    return results
