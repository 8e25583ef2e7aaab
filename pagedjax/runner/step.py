"""The jitted engine step: one packed forward + sampling, KV pages donated.

One pure function of (params, KV cache, StepBatch, SamplingBatch); the cache is donated
so its pages update in place. It is module-level with the model's graphdef as a static
argument, so every engine serving the same model structure shares the compiled
programs (one per padded shape). It knows nothing of requests or blocks: the model
runner builds the batch from the scheduler's decisions.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from pagedjax.runner import cpu_matmul, sampler
from pagedjax.runner import sharding as sharding_lib
from pagedjax.runner.attention import AttentionMetadata

# (id, logprob) pairs returned per sample row each step: beam search needs 2 * beam_width,
# SamplingParams.logprobs may ask for up to this many.
NUM_TOP_LOGPROBS = 16
TRACES = {"step": 0}  # traces (= compilations) of `step` in this process


class StaticGraph:
  """A model's nnx GraphDef as `step`'s static argument, hashed once.

  jit hashes its static arguments on every call, and hashing a GraphDef walks the whole
  graph (~0.5 ms for the bundled model, a third of a batch-1 decode step). `static_graph`
  interns one StaticGraph per distinct GraphDef, so a call's cache lookup is an identity
  check and engines serving the same model structure still share compiled programs.
  """

  __slots__ = ("graphdef", "param_tree", "_hash")

  def __init__(self, graphdef: nnx.GraphDef, param_tree):
    self.graphdef = graphdef
    # The treedef of the model's nnx State: `step` takes the parameters as the tuple of
    # their arrays. Flattening the State's nnx Variables in Python cost ~60 us
    # per call, a twentieth of a batch-1 step; a tuple is flattened in C++.
    self.param_tree = param_tree
    self._hash = hash((graphdef, param_tree))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, StaticGraph) and self.graphdef == other.graphdef
                             and self.param_tree == other.param_tree)


_INTERNED: dict[tuple, StaticGraph] = {}


def static_graph(graphdef: nnx.GraphDef, param_tree) -> StaticGraph:
  """The process's one StaticGraph for (graphdef, param_tree) pairs equal to these."""
  return _INTERNED.setdefault((graphdef, param_tree), StaticGraph(graphdef, param_tree))


@flax.struct.dataclass
class StepBatch:
  """One packed step: T tokens (padded), R logits rows. Padding tokens have slot -1.

  Attributes:
    token_ids: i32[T] packed tokens: decodes and prefill chunks back to back.
    positions: i32[T] position of each token in its sequence.
    slot_mapping: i32[T] KV slot each token writes (block * block_size + offset; -1 pad).
    attn: where each token sits (AttentionMetadata for the impl).
    logits_index: i32[R] token rows whose logits are computed (last token of each
      sequence that samples; padding repeats row 0).
    feed_index: i32[T] async scheduling: the sample row of the step before this one
      whose token this token row feeds (its token_ids entry is a placeholder); -1: none.
    prev_tokens: i32[F] the step before's sampled tokens (its `feed_tokens`, still on
      the device: the host never waited for them), or zeros when nothing is fed.
  """

  token_ids: jax.Array  # [T]
  positions: jax.Array  # [T]
  slot_mapping: jax.Array  # [T]
  attn: AttentionMetadata
  logits_index: jax.Array  # [R]
  feed_index: jax.Array  # [T]
  prev_tokens: jax.Array  # [F]


@flax.struct.dataclass
class SamplingBatch:
  """Per sample row (R, padded): which logits row it draws from and how.

  Attributes:
    row_index: i32[R] logits row (a fresh parallel-sampling prompt has n sample rows on
      one logits row).
    seeds: u32[R, 2] the request's 64-bit seed (hi, lo words).
    sample_indices: i32[R] the sample's stream within the request.
    out_positions: i32[R] output position of the token drawn.
    temperature: f32[R] (< 1e-5: greedy).
    top_k: i32[R] (0: all).
    top_p: f32[R].
    banned_ids: i32[R, K] ids that may not be drawn (min_tokens), -1 = unused.
    need_top: bool[] whether any row returns its top tokens (logprobs, beam search):
      if not, the step skips the top-k and returns zeros there.
  """

  row_index: jax.Array  # [R]
  seeds: jax.Array  # [R, 2]
  sample_indices: jax.Array  # [R]
  out_positions: jax.Array  # [R]
  temperature: jax.Array  # [R]
  top_k: jax.Array  # [R]
  top_p: jax.Array  # [R]
  banned_ids: jax.Array  # [R, K]
  need_top: jax.Array  # [] bool


@flax.struct.dataclass
class MultiStepBatch:
  """What a multi-step decode (`multi_step`) needs beyond its first step's StepBatch.

  Inner step j feeds the token drawn at step j - 1 (the StepBatch's tokens at j = 0) at
  position `positions + j` of every token row with j < row_steps; other rows write
  nothing and attend to nothing.

  Attributes:
    num_steps: i32[] inner steps to run (the largest row_steps; at most the static
      `max_steps` of the program).
    row_steps: i32[T] inner steps of each token row (0: padding).
    row_tables: i32[T, P] each token row's block table, covering its last inner step.
    feed_index: i32[R] token row that sample row r feeds at the next inner step (T: none).
  """

  num_steps: jax.Array  # []
  row_steps: jax.Array  # [T]
  row_tables: jax.Array  # [T, P]
  feed_index: jax.Array  # [R]


def _fed(batch: StepBatch) -> StepBatch:
  """The batch with each fed token row's placeholder replaced by the previous step's token."""
  fed = batch.prev_tokens[jnp.maximum(batch.feed_index, 0)]
  return batch.replace(token_ids=jnp.where(batch.feed_index >= 0, fed, batch.token_ids))


def _feed_tokens(tokens: jax.Array, width: int) -> jax.Array:
  """A step's sampled tokens [R] padded to the fixed width F of `prev_tokens`, so that
  the next step's program does not depend on this step's row bucket."""
  return jnp.zeros(width, jnp.int32).at[:tokens.shape[0]].set(tokens.astype(jnp.int32),
                                                              mode="drop")


def _forward_and_sample(params, kv, batch: StepBatch, samp: SamplingBatch, *, graphdef, impl,
                        vocab_size, mesh):
  """One packed forward (under shard_map on a mesh) and the sampling of its rows."""

  params = jax.tree.unflatten(graphdef.param_tree, params)  # the State, from its arrays

  def forward(params, kv, batch):
    model = nnx.merge(graphdef.graphdef, params)
    # The native products with the native attention, on one device (cpu_matmul).
    with cpu_matmul.enabled(impl == "cpu" and mesh is None):
      return model.forward_packed(
          batch.token_ids, batch.positions, kv, slot_mapping=batch.slot_mapping,
          attn_meta=batch.attn, logits_index=batch.logits_index, impl=impl,
          tp_axis=None if mesh is None else sharding_lib.AXIS)  # [R, V]

  if mesh is not None:
    kv_specs = jax.tree.map(lambda _: sharding_lib.KV_SPEC, kv)
    forward = jax.shard_map(forward, mesh=mesh,
                            in_specs=(sharding_lib.param_specs(params), kv_specs, P()),
                            out_specs=(P(), kv_specs),
                            # The logits are replicated by construction (psum'd residual,
                            # replicated norm and LM head); unchecked, so that the
                            # attention loops and kernels need no varying-axis casts.
                            check_vma=False)
  logits, kv = forward(params, kv, batch)
  logits = logits[samp.row_index]  # one row per sample
  keys = functools.partial(sampler.row_keys, samp.seeds, samp.sample_indices,
                           samp.out_positions)  # derived only where a row draws
  out = sampler.sample(logits, temperature=samp.temperature, top_k=samp.top_k,
                       top_p=samp.top_p, keys=keys, banned_ids=samp.banned_ids,
                       vocab_size=vocab_size, num_top_logprobs=NUM_TOP_LOGPROBS,
                       need_top=samp.need_top)
  return kv, out


class PackLayout:
  """Where each leaf of a host input tree sits in its packed int32 buffer (`pack`).

  A step's host inputs (~20 small numpy arrays) cost jit ~7 us each to take as
  arguments; packed, they are one argument, sliced apart inside the program (`unpack`,
  bit-exact). The layout is a static argument of the jitted steps: interned, so that
  jit's per-call hash is an identity check, and programs are keyed by it exactly as by
  the leaves' shapes and dtypes before.

  Attributes:
    treedef: the input tree's structure.
    leaves: (offset in the buffer, shape, dtype) per leaf, in flattening order.
    size: the buffer's length in int32 words.
  """

  __slots__ = ("treedef", "leaves", "size", "_hash")

  def __init__(self, treedef, leaves: tuple):
    self.treedef = treedef
    self.leaves = leaves
    self.size = sum(math.prod(shape) for _, shape, _ in leaves)
    self._hash = hash((treedef, leaves))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, PackLayout) and self.treedef == other.treedef
                             and self.leaves == other.leaves)


_LAYOUTS: dict[tuple, PackLayout] = {}
_PACKABLE = {np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float32), np.dtype(bool)}


def _layout(treedef, leaves) -> PackLayout:
  sig = (treedef, tuple((x.shape, np.dtype(x.dtype)) for x in leaves))
  layout = _LAYOUTS.get(sig)
  if layout is None:
    entries, offset = [], 0
    for shape, dtype in sig[1]:
      if dtype not in _PACKABLE:
        raise TypeError(f"pack takes int32, uint32, float32 and bool leaves, got {dtype}")
      entries.append((offset, tuple(shape), dtype))
      offset += math.prod(shape)
    layout = _LAYOUTS.setdefault(sig, PackLayout(treedef, tuple(entries)))
  return layout


def pack(tree, layout: PackLayout | None = None) -> tuple[np.ndarray, PackLayout]:
  """A tree of host arrays (32-bit or bool leaves) as one int32 buffer and its layout.

  layout: the tree's layout if the caller knows it (a runner caches one per program
  key); the buffer's length is checked against it."""
  leaves, treedef = jax.tree.flatten(tree)
  if layout is None:
    leaves = [np.asarray(x) for x in leaves]
    layout = _layout(treedef, leaves)
  if not leaves:
    return np.zeros(0, np.int32), layout
  buf = np.concatenate([x.reshape(-1).view(np.int32) if x.dtype != bool
                        else x.reshape(-1).astype(np.int32) for x in leaves])
  if buf.shape[0] != layout.size:
    raise ValueError(f"packed {buf.shape[0]} words, the layout has {layout.size}")
  return buf, layout


def pack_abstract(tree) -> tuple[jax.ShapeDtypeStruct, PackLayout]:
  """`pack` of a tree of ShapeDtypeStructs (to lower a step without data)."""
  leaves, treedef = jax.tree.flatten(tree)
  layout = _layout(treedef, leaves)
  return jax.ShapeDtypeStruct((layout.size,), jnp.int32), layout


def unpack(buf: jax.Array, layout: PackLayout):
  """The tree `pack` packed, from its buffer (traced): static slices, bitcast back."""
  leaves = []
  for offset, shape, dtype in layout.leaves:
    x = lax.slice(buf, (offset,), (offset + math.prod(shape),)).reshape(shape)
    if dtype == np.dtype(bool):
      x = x != 0
    elif dtype != np.dtype(np.int32):
      x = lax.bitcast_convert_type(x, dtype)
    leaves.append(x)
  return jax.tree.unflatten(layout.treedef, leaves)


def _pack_outputs(out):
  """A step's (tokens, logprobs, ranks, top_ids, top_logprobs) as (head i32[..., 3, R]:
  tokens, the logprobs' float32 bits and ranks, top_ids, top_logprobs): every step fetches
  the head, one transfer instead of three (`unpack_outputs`)."""
  tokens, logprobs, ranks, top_ids, top_logprobs = out
  head = jnp.stack([tokens.astype(jnp.int32),
                    lax.bitcast_convert_type(logprobs.astype(jnp.float32), jnp.int32),
                    ranks.astype(jnp.int32)], axis=-2)
  return head, top_ids, top_logprobs


def unpack_outputs(head: np.ndarray, top_ids=None, top_logprobs=None) -> tuple:
  """(tokens, logprobs, ranks, top_ids, top_logprobs) from a fetched `_pack_outputs` head
  (numpy, leading axes kept; bit-exact)."""
  return (head[..., 0, :], head[..., 1, :].view(np.float32), head[..., 2, :], top_ids,
          top_logprobs)


@functools.partial(jax.jit, static_argnames=("layout", "graphdef", "impl", "vocab_size", "mesh"),
                   donate_argnames=("kv",))
def step_program(params, kv, inputs, prev_tokens, *, layout, graphdef, impl, vocab_size, mesh):
  """`step`'s program: its host inputs packed (inputs i32[layout.size]: the StepBatch
  without prev_tokens, and the SamplingBatch), prev_tokens i32[F] on the device."""
  TRACES["step"] += 1  # runs once per trace, i.e. per compiled program
  batch, samp = unpack(inputs, layout)
  batch = batch.replace(prev_tokens=prev_tokens)
  kv, out = _forward_and_sample(params, kv, _fed(batch), samp, graphdef=graphdef, impl=impl,
                                vocab_size=vocab_size, mesh=mesh)
  return kv, _pack_outputs(out), _feed_tokens(out[0], prev_tokens.shape[0])


def step(params, kv, batch: StepBatch, samp: SamplingBatch, *, graphdef, impl, vocab_size,
         mesh=None):
  """One engine step.

  The host arrays of `batch` and `samp` reach the jitted program packed in one buffer
  (`pack`); `batch.prev_tokens` (on the device) as it is.

  Args:
    params: the model's parameter arrays (a tuple, `StaticGraph.param_tree` order).
    kv: the paged KVCache (donated).
    batch: the packed tokens (StepBatch).
    samp: the sample rows (SamplingBatch).
    graphdef: the model's graph definition, interned (`static_graph`).
    impl: attention implementation.
    vocab_size: the tokenizer's vocabulary (ids beyond it are never drawn).
    mesh: None (one device), or the tensor-parallel mesh (pagedjax.runner.sharding):
      params and pages are sharded by heads, the forward runs per device under
      `shard_map` with one all-reduce per attention and MLP block, and sampling runs on
      the replicated logits.

  Returns:
    (new KVCache, (head [3, R], top_ids [R, N], top_logprobs [R, N]): the tokens, logprobs
    and ranks packed in head (`unpack_outputs` after fetching it), feed_tokens [F]: the
    tokens again, padded to prev_tokens' width, for a next step scheduled before they
    reach the host: its `prev_tokens`).
  """
  inputs, layout = pack((batch.replace(prev_tokens=None), samp))
  return step_program(params, kv, inputs, batch.prev_tokens, layout=layout, graphdef=graphdef,
                      impl=impl, vocab_size=vocab_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("layout", "ms_layout", "graphdef", "impl",
                                             "vocab_size", "mesh", "max_steps"),
                   donate_argnames=("kv",))
def multi_step_program(params, kv, inputs, prev_tokens, ms_inputs, *, layout, ms_layout,
                       graphdef, impl, vocab_size, max_steps: int, mesh):
  """`multi_step`'s program: as `step_program`, and the MultiStepBatch packed (ms_inputs
  i32[ms_layout.size])."""
  TRACES["step"] += 1
  batch, samp = unpack(inputs, layout)
  ms = unpack(ms_inputs, ms_layout)
  batch = _fed(batch.replace(prev_tokens=prev_tokens))
  t = batch.token_ids.shape[0]
  rows = jnp.arange(t)
  block_size = kv.k_pages.shape[-2]
  p = ms.row_tables.shape[1]

  def body(j, carry):
    kv, tokens, outs = carry
    active = j < ms.row_steps  # [T]
    pos = batch.positions + j
    page = ms.row_tables[rows, jnp.minimum(pos // block_size, p - 1)]
    slots = jnp.where(active, page * block_size + pos % block_size, -1)
    b = batch.replace(token_ids=tokens, positions=pos, slot_mapping=slots,
                      attn=advance_metadata(batch.attn, j, active))
    s = samp.replace(out_positions=samp.out_positions + j)
    kv, out = _forward_and_sample(params, kv, b, s, graphdef=graphdef, impl=impl,
                                  vocab_size=vocab_size, mesh=mesh)
    tokens = tokens.at[ms.feed_index].set(out[0], mode="drop")
    outs = jax.tree.map(lambda acc, x: lax.dynamic_update_index_in_dim(acc, x, j, 0), outs, out)
    return kv, tokens, outs

  shapes = jax.eval_shape(
      lambda: _forward_and_sample(params, kv, batch, samp, graphdef=graphdef, impl=impl,
                                  vocab_size=vocab_size, mesh=mesh)[1])
  outs = jax.tree.map(lambda x: jnp.zeros((max_steps, *x.shape), x.dtype), shapes)
  num = jnp.minimum(ms.num_steps, max_steps)
  kv, _, outs = lax.fori_loop(0, num, body, (kv, batch.token_ids, outs))
  return kv, _pack_outputs(outs)


def multi_step(params, kv, batch: StepBatch, samp: SamplingBatch, ms: MultiStepBatch, *,
               graphdef, impl, vocab_size, max_steps: int, mesh=None):
  """Several decode steps in one program (vLLM's multi-step scheduling).

  Inner step j is exactly the one-token decode `step` would run with the tokens drawn
  at step j - 1 fed back: same positions, slots, attention metadata and per-position
  PRNG keys, so the tokens are those of `ms.num_steps` single steps. The host stops
  each sequence where a stop rule ends it and discards what was drawn after.

  Args:
    params, kv, graphdef, impl, vocab_size, mesh: as `step` (kv donated).
    batch: the first inner step's StepBatch (decode rows only).
    samp: its SamplingBatch (out_positions of the first step).
    ms: MultiStepBatch.
    max_steps: the program's most inner steps (static; the result's leading axis).

  Returns:
    (new KVCache, step outputs as `step`'s, each with a leading [max_steps] axis; steps
    past ms.num_steps are zeros).
  """
  inputs, layout = pack((batch.replace(prev_tokens=None), samp))
  ms_inputs, ms_layout = pack(ms)
  return multi_step_program(params, kv, inputs, batch.prev_tokens, ms_inputs, layout=layout,
                            ms_layout=ms_layout, graphdef=graphdef, impl=impl,
                            vocab_size=vocab_size, max_steps=max_steps, mesh=mesh)


def lower(params, kv, batch: StepBatch, samp: SamplingBatch, ms: MultiStepBatch | None = None,
          *, graphdef, impl, vocab_size, max_steps: int = 1, mesh=None):
  """The step program (`multi_step`'s with `ms`) for these abstract inputs
  (ShapeDtypeStructs), lowered: `.compile()` it for XLA's memory accounting."""
  inputs, layout = pack_abstract((batch.replace(prev_tokens=None), samp))
  common = dict(layout=layout, graphdef=graphdef, impl=impl, vocab_size=vocab_size, mesh=mesh)
  if ms is None:
    return step_program.lower(params, kv, inputs, batch.prev_tokens, **common)
  ms_inputs, ms_layout = pack_abstract(ms)
  return multi_step_program.lower(params, kv, inputs, batch.prev_tokens, ms_inputs,
                                  ms_layout=ms_layout, max_steps=max_steps, **common)


def num_executables() -> int:
  """Step executables compiled in this process (`step` and `multi_step`, all engines).

  Unlike TRACES, this also counts a program compiled again for inputs placed elsewhere
  (the same trace): what a benchmark should see when it asks whether anything compiled.
  """
  return step_program._cache_size() + multi_step_program._cache_size()


def advance_metadata(meta: AttentionMetadata, j, active) -> AttentionMetadata:
  """Attention metadata of inner step j of a decode-only batch: every active token row
  (active bool[T]) one position further on; inactive rows attend to nothing."""
  if meta.decode_positions is not None:  # xla: decode rows (no prefill tiles here)
    t = active.shape[0]
    live = active[jnp.minimum(meta.decode_token_index, t - 1)] & (meta.decode_token_index < t)
    live &= meta.decode_positions >= 0
    return meta.replace(decode_positions=jnp.where(live, meta.decode_positions + j, -1))
  # Pallas: sequence i is token row cu_q_lens[i]; kv_lens counts this step's token.
  t = active.shape[0]
  n = meta.kv_lens.shape[0]
  live = active[jnp.minimum(meta.cu_q_lens[:n], t - 1)] & (jnp.arange(n) < meta.num_seqs[0])
  return meta.replace(kv_lens=jnp.where(live, meta.kv_lens + j, 0))
