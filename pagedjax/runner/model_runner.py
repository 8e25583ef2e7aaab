"""ModelRunner: the device side of the engine.

It owns the model parameters, the KV pages (`KVCache`) and the host swap pool, sizes
them, and turns each scheduled step into typed, bucketed device inputs (`StepBatch`,
`SamplingBatch`), runs the block copies the scheduler asked for (swap-out, swap-in,
copy-on-write, in that order) and the jitted step, and hands back the sampled tokens as
numpy arrays.

Shapes are padded to a few buckets so a long run compiles a bounded number of programs:
tokens T and sample rows R to powers of two, and, for the xla attention, the decode rows
and prefill tiles to powers of two as well. `programs` records every distinct step
program this runner ran (with its abstract signature, so tests can compile it again and
read XLA's memory accounting).

The runner reads the scheduler's output by duck typing (`seqs`, each with `token_ids`,
`start`, `block_table`, `sample_indices`, `seq.output_token_ids` and
`group.device_sampling`; `swap_out`, `swap_in`, `cow`): it imports nothing from the host
side.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pagedjax.intmath import ceil_div, next_power_of_two, round_up
from pagedjax.runner import cpu_matmul
from pagedjax.runner import kv_cache as kvc
from pagedjax.runner import sharding as sharding_lib
from pagedjax.runner import step as step_lib
from pagedjax.runner.attention import IMPLS, ROW_IMPLS, TILE_SIZE, AttentionMetadata

MAX_BANNED = 8      # banned ids per sample row (min_tokens: stop ids + EOS)
MIN_FEED_WIDTH = 64  # StepBatch.prev_tokens width: engines up to 64 sequences share programs
POOL_GRANULE = 64   # device / host page arrays are padded to a multiple of this
_MIN_TOKEN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class DeviceSampling:
  """A request's sampling settings as the device takes them (built once per request).

  seed_words: the 64-bit seed as (hi, lo) uint32 words; top_k: 0 or <= the vocabulary;
  banned_until: output length below which `banned_ids` may not be drawn (min_tokens);
  wants_top: the request reads its rows' top tokens (logprobs > 0, beam search).
  """

  seed_words: tuple[int, int]
  temperature: float
  top_k: int
  top_p: float
  banned_until: int
  banned_ids: tuple[int, ...]
  wants_top: bool = False


_SEQ, _START, _TABLE, _FEED, _SAMPLES, _TOKENS, _OUTPUT = map(operator.attrgetter, (
  "seq", "start", "block_table", "feed_row", "sample_indices", "token_ids", "output_token_ids"))
_FIRST = operator.itemgetter(0)


class _DecodeBatch(NamedTuple):
  """What `_prepare_decodes` keeps of the decode step it built last (its buffer is
  never written again: the next step starts from a copy)."""

  key: tuple  # the program's input key
  seqs: list  # the Sequence of each token row
  buf: np.ndarray  # the packed inputs
  order: list[int]  # decode row k (past the padding) is token row order[k]
  tables: list[list[int]]  # the block table of each token row
  banned: list[int]  # rows of requests with min_tokens bans


def _wait_or_delete(tree) -> None:
  """Waits for a swap's output; if the copy failed, deletes it (and re-raises), so that
  `state_is_lost` sees it lost, as it sees the donated input of any failed call."""
  try:
    jax.block_until_ready(tree)
  except Exception:
    for x in jax.tree.leaves(tree):
      if isinstance(x, jax.Array) and not x.is_deleted():
        x.delete()
    raise


class ModelRunner:
  """Device state and the jitted step for one model.

  Args:
    module: the model (a `Transformer`); split into graphdef + params here.
    num_blocks: device blocks the block manager hands out (the page arrays are padded
      to a multiple of POOL_GRANULE, so engines of nearby sizes share programs).
    block_size: tokens per block.
    num_host_blocks: host swap-pool blocks (0: no swapping).
    max_model_len: context limit (sets the block-table width).
    dtype: compute dtype (and the KV dtype when kv_cache_dtype is None).
    kv_cache_dtype: None (= dtype), or the pages' dtype: float32, bfloat16, or int8 /
      float8_e4m3fn (quantized on write, with per-token scales; see kv_cache).
    swap_dtype: None (swapped blocks kept as the device stores them), or int8 /
      float8_e4m3fn: an unquantized pool's blocks are stored quantized in the host pool.
    async_swap: dispatch swaps without waiting (JAX orders them before later uses of
      the pools); False waits for each swap to land (the synchronous baseline).
    attention_impl: "xla", "cpu", "pallas" or "pallas_interpret".
    vocab_size: the tokenizer's vocabulary (ids beyond it are never sampled).
    max_num_seqs: most sample rows in a step (sets the sample-row bucket of steps with
      prefill chunks, see `prepare`).
    mesh: None (one device), or a 1-D tensor-parallel mesh (`sharding.make_mesh`):
      parameters sharded by heads, the pool by kv heads (each device holds 1/k of every
      block; kv heads replicated when k exceeds them), see pagedjax.runner.sharding.
      num_blocks counts blocks, which stay global.
    num_scheduler_steps: inner steps of a multi-step decode program (`step.multi_step`;
      the scheduler decides when a step is one, see `Scheduler`).
  """

  def __init__(self, module, *, num_blocks: int, block_size: int, num_host_blocks: int,
               max_model_len: int, dtype, attention_impl: str, vocab_size: int,
               max_num_seqs: int = 64, kv_cache_dtype=None, swap_dtype=None,
               async_swap: bool = True, mesh=None, num_scheduler_steps: int = 1):
    if attention_impl not in IMPLS:
      raise ValueError(f"attention_impl must be one of {IMPLS}, got {attention_impl!r}")
    cfg = module.cfg
    self.cfg = cfg
    self.mesh = None if mesh is None or mesh.size == 1 else mesh
    self.tensor_parallel_size = 1 if self.mesh is None else self.mesh.size
    tp = self.tensor_parallel_size
    if self.mesh is not None:
      sharding_lib.check_tensor_parallel_size(tp, num_heads=cfg.num_heads,
                                              num_kv_heads=cfg.num_kv_heads,
                                              hidden_dim=cfg.hidden_dim, num_devices=tp)
    self.impl = attention_impl
    self.max_num_seqs = max_num_seqs
    self.dtype = jnp.dtype(dtype)
    # Decode-only steps run T = their sample-row bucket (1, 2, 4, ...) where the model's
    # products are the native ones (a row's projections do not depend on M); XLA's
    # products round differently at M < 8 than at 8, so elsewhere 8 rows at least.
    self._min_decode_bucket = (
      1 if (attention_impl == "cpu" and self.mesh is None and self.dtype == jnp.float32
            and cpu_matmul.native_available()) else _MIN_TOKEN_BUCKET)
    # StepBatch.prev_tokens when nothing is fed; its width is that of the tokens a step
    # hands the next one on the device (async scheduling): at least every sample row (a
    # step draws at most pow2(max_num_seqs) rows). Placed below, on the device.
    no_feed = np.zeros(max(MIN_FEED_WIDTH, next_power_of_two(max_num_seqs)), np.int32)
    self.num_scheduler_steps = num_scheduler_steps
    self.kv_cache_dtype = self.dtype if kv_cache_dtype is None else jnp.dtype(kv_cache_dtype)
    self.swap_dtype = None if swap_dtype is None else jnp.dtype(swap_dtype)
    self.async_swap = async_swap
    # Swap traffic and the host time spent issuing (async) or waiting for (sync) swaps.
    self.swap_stats = {"swap_out_bytes": 0, "swap_in_bytes": 0, "swap_time_s": 0.0}
    self.block_size = block_size
    self.vocab_size = vocab_size
    self.max_blocks_per_seq = ceil_div(max_model_len, block_size)
    self._geometry = kvc.PoolGeometry(cfg.num_layers,
                                      sharding_lib.kv_heads_stored(cfg.num_kv_heads, tp),
                                      round_up(num_blocks, POOL_GRANULE), block_size,
                                      cfg.head_dim)
    self._num_host_blocks = num_host_blocks
    self.kv = self._new_kv()
    self.host_pool = self._new_host_pool()
    graphdef, params = nnx.split(module)
    self._graphdef = graphdef
    params = jax.tree.map(lambda x: x.astype(self.dtype) if x.dtype == jnp.float32 else x, params)
    if self.mesh is not None:
      params = sharding_lib.replicate_kv_heads(params, num_kv_heads=cfg.num_kv_heads,
                                               head_dim=cfg.head_dim, tp=tp)
      params = sharding_lib.put_global(params, self.mesh, sharding_lib.param_specs(params))
    self._params = params
    # What `step` takes: the parameters' arrays, unflattened inside (StaticGraph.param_tree);
    # the static argument is interned, so jit's per-call hash is an identity check.
    leaves, tree = jax.tree.flatten(params)
    self._param_leaves = tuple(leaves)
    self._static_graph = step_lib.static_graph(graphdef, tree)
    # Placed as a step's `feed_tokens` output is (committed, where the parameters are;
    # replicated on a mesh): jit keys its executables by their inputs' placement too, so
    # a host array here compiled every program a second time when a step first fed the
    # one before (unseen by `programs`, after `precompile`: seconds-long stalls in the
    # middle of serving). `_run` re-places it if a step's output says otherwise.
    where = (jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
             if self.mesh is not None else jax.tree.leaves(params)[0].sharding)
    self._no_feed = jax.device_put(no_feed, where)
    self.programs: dict[tuple, tuple] = {}  # program key -> abstract (batch, sampling)
    # (t_cap, r_cap, attention shape) -> (all-padding packed inputs, their layout)
    self._inputs: dict[tuple, tuple[np.ndarray, step_lib.PackLayout]] = {}
    self._last_decode: _DecodeBatch | None = None  # (`_prepare_decodes`)

  # ------------------------------------------------------------------ state
  def _new_kv(self) -> kvc.KVCache:
    g = self._geometry
    # The xla path writes with integer scatters (see kv_cache.to_storage).
    return kvc.init_kv_cache(num_layers=g.num_layers, num_kv_heads=g.num_kv_heads,
                             num_blocks=g.num_blocks, block_size=g.block_size,
                             head_dim=g.head_dim, dtype=self.kv_cache_dtype,
                             bit_storage=self.impl in ROW_IMPLS, sharding=self.kv_sharding)

  @property
  def kv_sharding(self):
    """Where the pages live: None (the default device) or sharded by kv head on the mesh."""
    if self.mesh is None:
      return None
    return jax.sharding.NamedSharding(self.mesh, sharding_lib.KV_SPEC)

  def _new_host_pool(self):
    if not self._num_host_blocks:
      return None
    swap_dtype = None if self.kv.quantized else self.swap_dtype
    return kvc.init_host_pool(self.kv, round_up(self._num_host_blocks, POOL_GRANULE),
                              dtype=swap_dtype)

  @property
  def bytes_per_block(self) -> int:
    """Device bytes of one block: all layers, K and V, scales included (all devices'
    shards together, kv-head replicas included)."""
    return self.kv.bytes_per_block

  @property
  def bytes_per_block_per_device(self) -> int:
    """Bytes of one block each device holds (its kv heads' shard)."""
    return self.kv.bytes_per_block // self.tensor_parallel_size

  @property
  def lossy_swap(self) -> bool:
    """Swapped blocks come back rounded: an unquantized pool swapped to a quantized host pool."""
    return self.host_pool is not None and self.host_pool.quantized and not self.kv.quantized

  @property
  def host_dtype(self) -> str:
    """The dtype swapped-out blocks are stored in (bit patterns named by their values' type)."""
    return str(self.swap_dtype) if self.lossy_swap else str(self.kv.dtype)

  @property
  def host_bytes_per_block(self) -> int:
    return 0 if self.host_pool is None else self.host_pool.bytes_per_block

  def state_is_lost(self) -> tuple[bool, bool]:
    """(device pages lost, host pool lost): buffers deleted by a donated call that failed."""
    host = self.host_pool
    host_lost = (host is not None and host.memory_kind == "pinned_host"
                 and host.k_blocks.is_deleted())
    return self.kv.k_pages.is_deleted(), host_lost

  def reset(self, *, device: bool, host: bool) -> None:
    """Allocates fresh (zero) pages after a failure deleted them."""
    self._last_decode = None
    if device:
      self.kv = self._new_kv()
    if host:
      self.host_pool = self._new_host_pool()

  # -------------------------------------------------------------- block ops
  def copy_blocks(self, so) -> None:
    """Swap-out, swap-in, then copy-on-write copies, each in place (donated)."""
    if so.swap_out or so.swap_in:
      start = time.perf_counter()
      if so.swap_out:
        dev, host = (np.asarray(x, np.int32) for x in zip(*so.swap_out))
        self.host_pool = kvc.swap_out_blocks(self.kv, self.host_pool, dev, host)
        self.swap_stats["swap_out_bytes"] += len(dev) * self.host_bytes_per_block
        if not self.async_swap:
          _wait_or_delete(self.host_pool)
      if so.swap_in:
        host, dev = (np.asarray(x, np.int32) for x in zip(*so.swap_in))
        self.kv = kvc.swap_in_blocks(self.kv, self.host_pool, host, dev)
        self.swap_stats["swap_in_bytes"] += len(dev) * self.host_bytes_per_block
        if not self.async_swap:
          _wait_or_delete(self.kv)
      self.swap_stats["swap_time_s"] += time.perf_counter() - start
    if so.cow:
      src, dst = (np.asarray(x, np.int32) for x in zip(*so.cow))
      self.kv = kvc.copy_blocks(self.kv, src, dst)

  # ------------------------------------------------------------------- step
  def execute(self, so):
    """Runs one scheduled step and waits for it: `fetch(so, submit(so))`."""
    return self.fetch(so, self.submit(so))

  def submit(self, so, prev=None):
    """Dispatches one scheduled step and returns at once, with its outputs still on the
    device (a handle for `fetch`, and `prev` of a step scheduled after it).

    prev: the handle of the step dispatched just before, for a step scheduled while that
      one ran (async scheduling): each sequence with `feed_row` >= 0 feeds that row's
      sampled token, taken on the device (its token_ids entry is a placeholder).
    """
    batch, samp, key, inputs = self.prepare(so)
    prev_tokens = self._no_feed if prev is None else prev[1]
    ms = None if so.num_steps == 1 else self._multi_step_batch(so, batch.token_ids.shape[0],
                                                               samp.row_index.shape[0])
    out, feed = self._run(key, inputs, prev_tokens, ms)
    return out, feed, bool(samp.need_top)

  def fetch(self, so, handle):
    """Waits for a submitted step; returns (tokens, logprobs, ranks, top_ids,
    top_logprobs) as numpy arrays, each with a leading [so.num_steps] axis when the step
    is a multi-step decode; top_ids / top_logprobs are None when no row wants them (not
    computed: `SamplingBatch.need_top`). A device failure raises here; the pages it left
    are then deleted, so that `state_is_lost` reports them."""
    out, _, need_top = handle
    try:
      # (the head: one transfer; np.asarray, not jax.device_get: its tree walk, trace
      # annotations and context managers cost more than the copy at batch 1)
      out = [np.asarray(x) for x in (out if need_top else out[:1])]
    except Exception:
      try:
        _wait_or_delete(self.kv)
      except Exception:  # noqa: BLE001  (the step's own error is the one to raise)
        pass
      raise
    out = step_lib.unpack_outputs(*out)
    return out if so.num_steps == 1 else tuple(None if x is None else x[:so.num_steps]
                                               for x in out)

  def _run(self, key, inputs, prev_tokens, ms=None):
    """Runs the program of input key `key` (`prepare`) on its packed inputs; with a
    MultiStepBatch, the multi-step program (key + ("steps", num_scheduler_steps))."""
    layout = self._inputs[key][1]
    if ms is not None:
      key = (*key, "steps", self.num_scheduler_steps)
    first = key not in self.programs
    if first:
      abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
      batch, samp = jax.tree.unflatten(layout.treedef, [jax.ShapeDtypeStruct(shape, dtype)
                                                        for _, shape, dtype in layout.leaves])
      self.programs[key] = (batch.replace(prev_tokens=abstract(prev_tokens)), samp) + (
          () if ms is None else (jax.tree.map(abstract, ms),))
    common = dict(layout=layout, graphdef=self._static_graph, impl=self.impl,
                  vocab_size=self.vocab_size, mesh=self.mesh)
    if ms is None:
      self.kv, out, feed = step_lib.step_program(self._param_leaves, self.kv, inputs,
                                                 prev_tokens, **common)
      if first and feed.sharding != self._no_feed.sharding:  # (a Python __eq__: not per step)
        self._no_feed = jax.device_put(self._no_feed, feed.sharding)
      return out, feed
    ms_inputs, ms_layout = step_lib.pack(ms)
    self.kv, out = step_lib.multi_step_program(self._param_leaves, self.kv, inputs, prev_tokens,
                                               ms_inputs, ms_layout=ms_layout,
                                               max_steps=self.num_scheduler_steps, **common)
    return out, None

  def _multi_step_batch(self, so, t_cap: int, r_cap: int) -> step_lib.MultiStepBatch:
    """MultiStepBatch of a decode-only step: sequence i is token row i and sample row i."""
    n = len(so.seqs)
    row_steps = np.zeros(t_cap, np.int32)
    row_steps[:n] = [s.num_steps for s in so.seqs]
    tables = np.zeros((t_cap, self.max_blocks_per_seq), np.int32)
    for i, s in enumerate(so.seqs):
      tables[i, :len(s.block_table)] = s.block_table
    feed = np.full(r_cap, t_cap, np.int32)
    feed[:n] = np.arange(n)
    return step_lib.MultiStepBatch(np.asarray(so.num_steps, np.int32), row_steps, tables, feed)

  def _row_bucket(self, num_rows: int, t_cap: int, prefill: bool) -> int:
    """Sample-row bucket. Decode-only steps: the next power of two of the rows (the
    LM head and sampler run on exactly that many). Steps with prefill chunks: at least
    min(t_cap, pow2(max_num_seqs)), so that such steps are keyed by their token bucket
    alone and a serving run compiles a few dozen programs, not hundreds (the extra rows
    cost little next to t_cap tokens of matmuls)."""
    r_cap = next_power_of_two(num_rows)
    if prefill:
      r_cap = max(r_cap, min(t_cap, next_power_of_two(self.max_num_seqs)))
    return r_cap

  # ------------------------------------------------------------ step inputs
  @staticmethod
  def _padding_meta(t_cap: int, attn_key: tuple, p: int, rows: bool) -> AttentionMetadata:
    """All-padding AttentionMetadata: the xla path's (rows: attn_key = (decode rows,
    tiles)) or the Pallas kernel's (attn_key = (sequences,)), p pages per sequence."""
    if rows:
      sd, np_ = attn_key
      return AttentionMetadata(
          decode_token_index=np.full(sd, t_cap, np.int32),
          decode_block_tables=np.zeros((sd, p), np.int32),
          decode_positions=np.full(sd, -1, np.int32),
          tile_token_index=np.full((np_, TILE_SIZE), t_cap, np.int32),
          tile_block_tables=np.zeros((np_, p), np.int32),
          tile_positions=np.full((np_, TILE_SIZE), -1, np.int32))
    s_cap, = attn_key
    return AttentionMetadata(cu_q_lens=np.zeros(s_cap + 1, np.int32),
                             kv_lens=np.zeros(s_cap, np.int32),
                             block_tables=np.zeros((s_cap, p), np.int32),
                             num_seqs=np.zeros(1, np.int32))

  def _padding_inputs(self, key: tuple) -> tuple[step_lib.StepBatch, step_lib.SamplingBatch]:
    """The all-padding StepBatch (prev_tokens None) and SamplingBatch of program `key`:
    nothing is written (every slot -1), no query attends, every row is greedy."""
    t_cap, r_cap = key[:2]
    meta = self._padding_meta(t_cap, key[2:], self.max_blocks_per_seq, self.impl in ROW_IMPLS)
    zeros_t = np.zeros(t_cap, np.int32)
    batch = step_lib.StepBatch(zeros_t, zeros_t.copy(), np.full(t_cap, -1, np.int32), meta,
                               np.zeros(r_cap, np.int32), np.full(t_cap, -1, np.int32), None)
    r0 = np.zeros(r_cap, np.int32)
    samp = step_lib.SamplingBatch(r0, np.zeros((r_cap, 2), np.uint32), r0.copy(), r0.copy(),
                                  np.zeros(r_cap, np.float32), r0.copy(),
                                  np.ones(r_cap, np.float32),
                                  np.full((r_cap, MAX_BANNED), -1, np.int32), np.asarray(False))
    return batch, samp

  def _new_inputs(self, key: tuple, base: np.ndarray | None = None):
    """A fresh packed input buffer of program `key` holding its all-padding inputs (or a
    copy of `base`, an earlier buffer of that program), and the typed StepBatch /
    SamplingBatch whose arrays are views into it (prepare fills them; the program gets
    the buffer, one argument: see `step_lib.pack`; a bool leaf is an int32 view)."""
    entry = self._inputs.get(key)
    if entry is None:
      entry = self._inputs[key] = step_lib.pack(self._padding_inputs(key))
    template, layout = entry
    buf = (template if base is None else base).copy()  # (a dispatched buffer is never written)
    views = [np.ndarray(shape, np.int32 if dtype == bool else dtype, buffer=buf, offset=4 * o)
             for o, shape, dtype in layout.leaves]
    batch, samp = jax.tree.unflatten(layout.treedef, views)
    return buf, batch, samp

  def prepare(self, so):
    """Packs a scheduled step into its program's bucketed input buffer; returns the typed
    StepBatch and SamplingBatch (views into the buffer: prev_tokens None, the program
    takes it beside the buffer; need_top a 0 / 1 int32 view), the program key and the
    buffer."""
    seqs = so.seqs
    if self.impl in ROW_IMPLS and all(len(s.token_ids) == 1 and s.sample_indices for s in seqs):
      return self._prepare_decodes(seqs)
    self._last_decode = None
    n = len(seqs)
    bs = self.block_size
    lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)  # [S]
    starts = np.fromiter((s.start for s in seqs), np.int64, n)
    num_tokens = int(lens.sum())
    sampling = [(i, s) for i, s in enumerate(seqs) if s.sample_indices]
    # Decode rows: one-token entries that sample (a one-token chunk in mid-prompt, left by
    # the budget, is a tile: decode rows are padded to the sample-row bucket).
    is_decode = lens == 1
    if len(sampling) < n:
      is_decode &= np.fromiter((bool(s.sample_indices) for s in seqs), bool, n)
    num_rows = sum(len(s.sample_indices) for _, s in sampling)
    all_decode = bool(is_decode.all())
    if all_decode:  # T = the sample-row bucket (n > 1 on a one-token prompt: more rows)
      t_cap = next_power_of_two(max(num_tokens, num_rows), self._min_decode_bucket)
    else:
      t_cap = next_power_of_two(num_tokens, _MIN_TOKEN_BUCKET)
    r_cap = self._row_bucket(num_rows, t_cap, not all_decode)
    if self.impl in ROW_IMPLS:
      key = (t_cap, r_cap, *self._tile_shape(lens, is_decode, t_cap, r_cap))
    else:
      key = (t_cap, r_cap, next_power_of_two(n))
    buf, batch, samp = self._new_inputs(key)

    cu = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    tables = np.zeros((n, self.max_blocks_per_seq), np.int32)
    for i, s in enumerate(seqs):
      tables[i, :len(s.block_table)] = s.block_table
    if all_decode:
      seq_of_token, pos = np.arange(n), starts
      batch.token_ids[:n] = [s.token_ids[0] for s in seqs]
    else:
      seq_of_token = np.repeat(np.arange(n), lens)  # [num_tokens]
      pos = starts[seq_of_token] + np.arange(num_tokens) - cu[:-1][seq_of_token]
      batch.token_ids[:num_tokens] = np.fromiter(
          itertools.chain.from_iterable(s.token_ids for s in seqs), np.int32, num_tokens)
    batch.positions[:num_tokens] = pos
    batch.slot_mapping[:num_tokens] = tables[seq_of_token, pos // bs] * bs + pos % bs
    feed_rows = np.fromiter((s.feed_row for s in seqs), np.int32, n)  # [S]
    fed = feed_rows >= 0
    batch.feed_index[cu[:-1][fed]] = feed_rows[fed]
    self._fill_sampling(samp, batch.logits_index, sampling, cu)
    if self.impl in ROW_IMPLS:
      self._fill_tiles(batch.attn, lens, starts, cu, tables, t_cap, is_decode)
    else:
      self._fill_ragged(batch.attn, lens, starts, cu, tables)
    return batch, samp, key, buf

  def _prepare_decodes(self, seqs):
    """`prepare` of a decode-only step on the xla / cpu path (most steps): sequence i is
    token row i and logits row i, so each column is one Python list stored once (the
    general path's numpy index arithmetic costs more than it saves at these sizes).

    When the decode step before had the same sequences in the same order (steady
    decoding: vLLM V1's persistent batch), its buffer is the starting point: the
    sampling rows (fixed per request) are in it already, and so are the block-table rows
    of the tables that did not change; only tokens, positions, slots, feeds, output
    positions, min_tokens bans and the tables that grew are written. The same inputs as
    the general path either way (tests/test_step_inputs.py checks every step's buffer
    against a plain-Python reference)."""
    n = len(seqs)
    bs = self.block_size
    # (Columns read with C-level maps: a Python frame per element costs more here.)
    num_rows = sum(map(len, map(_SAMPLES, seqs)))
    t_cap = next_power_of_two(max(n, num_rows), self._min_decode_bucket)
    r_cap = self._row_bucket(num_rows, t_cap, False)
    key = (t_cap, r_cap, r_cap, 0)  # (`_tile_shape`: every row a decode, no tile)
    members = list(map(_SEQ, seqs))
    last = self._last_decode
    same = (last is not None and last.key == key and num_rows == n == len(last.seqs)
            and all(map(operator.is_, members, last.seqs)))
    buf, batch, samp = self._new_inputs(key, last.buf if same else None)
    starts = list(map(_START, seqs))
    tables = list(map(_TABLE, seqs))
    batch.token_ids[:n] = list(map(_FIRST, map(_TOKENS, seqs)))
    batch.positions[:n] = starts
    batch.slot_mapping[:n] = [t[p // bs] * bs + p % bs for t, p in zip(tables, starts)]
    feeds = list(map(_FEED, seqs))
    batch.feed_index[:n] = feeds  # (-1: not fed)
    if same:
      banned = last.banned
      # A fed decode's own token is still in flight: it draws output position num_out + 1.
      num_out = samp.out_positions[:n]
      num_out[:] = list(map(len, map(_OUTPUT, members)))
      num_out += batch.feed_index[:n] >= 0
      for r in banned:  # rows of requests with min_tokens bans: set or cleared
        d = seqs[r].group.device_sampling
        samp.banned_ids[r] = -1
        if num_out[r] < d.banned_until:
          samp.banned_ids[r, :len(d.banned_ids)] = d.banned_ids
    else:
      self._fill_sampling(samp, batch.logits_index, list(enumerate(seqs)), range(n + 1))
      banned = [r for r, s in enumerate(seqs) if s.group.device_sampling.banned_until > 0]
    # Decode rows sorted by context, the padding first (as `_fill_tiles`).
    meta = batch.attn
    order = sorted(range(n), key=starts.__getitem__)
    first = r_cap - n
    meta.decode_positions[first:] = list(map(starts.__getitem__, order))
    rows = meta.decode_block_tables
    if same and order == last.order:  # (each context one longer: the usual case)
      for i in itertools.compress(range(n), map(operator.ne, tables, last.tables)):
        t, k = tables[i], first + order.index(i)  # (a few rows a step: those that grew)
        rows[k, :len(t)] = t
        rows[k, len(t):] = 0
    else:
      meta.decode_token_index[first:] = order
      if same:
        rows[first:] = 0
      for k, i in enumerate(order):
        rows[first + k, :len(tables[i])] = tables[i]
    # (A fresh n > 1 prompt's rows are not one per sequence: such a step is not kept.)
    self._last_decode = (_DecodeBatch(key, members, buf, order, tables, banned)
                         if num_rows == n else None)
    return batch, samp, key, buf

  @staticmethod
  def _tile_shape(lens, is_decode, t_cap: int, r_cap: int) -> tuple[int, int]:
    """(decode rows, prefill tiles) of the xla attention metadata: decode rows padded to
    the sample-row bucket r_cap (every decode samples, so there are at most that many:
    one bucket fewer to compile, at the cost of a few padded rows, which attend to
    nothing); tiles to a power of two, at least t_cap / TILE_SIZE: the usual count for
    that many tokens, so a token bucket rarely needs a second tile bucket (fewer
    programs under varying load)."""
    sd = r_cap if is_decode.any() else 0
    if is_decode.all():
      return sd, 0
    tiles = int(ceil_div(lens[~is_decode], TILE_SIZE).sum())
    return sd, max(next_power_of_two(tiles), t_cap // TILE_SIZE)

  def _tiles(self, lens, starts, cu, tables, t_cap, r_cap, is_decode):
    """AttentionMetadata for the xla path (fresh arrays) and its (decode rows, tiles)."""
    shape = self._tile_shape(lens, is_decode, t_cap, r_cap)
    meta = self._padding_meta(t_cap, shape, tables.shape[1], rows=True)
    self._fill_tiles(meta, lens, starts, cu, tables, t_cap, is_decode)
    return meta, shape

  @staticmethod
  def _fill_tiles(meta, lens, starts, cu, tables, t_cap, is_decode) -> None:
    """Writes the xla path's AttentionMetadata into `meta` (all padding, shaped by
    `_tile_shape`): decode rows and prefill tiles of TILE_SIZE queries, each kind sorted
    by context with the padding first (attention splits each kind into groups of
    consecutive rows that loop only as far as their own longest context)."""
    dec = np.flatnonzero(is_decode)
    if len(dec):
      sd = meta.decode_positions.shape[0]
      order = dec[np.argsort(starts[dec], kind="stable")]
      meta.decode_token_index[sd - len(dec):] = cu[order]
      meta.decode_positions[sd - len(dec):] = starts[order]
      meta.decode_block_tables[sd - len(dec):] = tables[order]
    pre = np.flatnonzero(~is_decode)
    if not len(pre):
      return
    per_seq = ceil_div(lens[pre], TILE_SIZE)  # tiles per prefill sequence (numpy ints)
    tile_seq = np.repeat(pre, per_seq)  # [tiles]
    first_tile = np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    offset = (np.arange(len(tile_seq)) - first_tile) * TILE_SIZE  # first query of the tile
    j = offset[:, None] + np.arange(TILE_SIZE)[None, :]  # [tiles, Tq] query within chunk
    valid = j < lens[tile_seq][:, None]
    index = np.where(valid, cu[tile_seq][:, None] + j, t_cap)
    positions = np.where(valid, starts[tile_seq][:, None] + j, -1)
    order = np.argsort(positions.max(1), kind="stable")
    np_, k = meta.tile_positions.shape[0], len(tile_seq)
    meta.tile_token_index[np_ - k:] = index[order]
    meta.tile_positions[np_ - k:] = positions[order]
    meta.tile_block_tables[np_ - k:] = tables[tile_seq[order]]

  def _ragged(self, lens, starts, cu, tables):
    """AttentionMetadata for the Pallas ragged kernel (fresh arrays) and its key part."""
    key = (next_power_of_two(len(lens)),)
    meta = self._padding_meta(int(cu[-1]), key, tables.shape[1], rows=False)
    self._fill_ragged(meta, lens, starts, cu, tables)
    return meta, key

  @staticmethod
  def _fill_ragged(meta, lens, starts, cu, tables) -> None:
    """Writes the Pallas ragged kernel's AttentionMetadata into `meta` (all padding)."""
    n = len(lens)
    meta.cu_q_lens[:n + 1] = cu
    meta.cu_q_lens[n + 1:] = cu[-1]
    meta.kv_lens[:n] = starts + lens
    meta.block_tables[:n] = tables
    meta.num_seqs[0] = n

  @staticmethod
  def _fill_sampling(samp, logits_index, sampling, cu) -> bool:
    """Writes the sample rows into `samp` (all padding) and the logits rows into
    `logits_index`: one logits row per sampling sequence, one sample row per (sequence,
    sample index). Returns whether any row wants its top tokens (need_top)."""
    if not sampling:
      return False
    # Columns built as lists, stored once each (per-row numpy stores cost more).
    logits_index[:len(sampling)] = [cu[i + 1] - 1 for i, _ in sampling]
    if all(len(s.sample_indices) == 1 for _, s in sampling):  # no fresh n > 1 prompt
      rows = [(k, s, s.sample_indices[0]) for k, (_, s) in enumerate(sampling)]
    else:
      rows = [(k, s, j) for k, (_, s) in enumerate(sampling) for j in s.sample_indices]
    n = len(rows)
    ds = [s.group.device_sampling for _, s, _ in rows]
    # A fed decode's own token is still in flight: it draws output position num_out + 1.
    num_out = [len(s.seq.output_token_ids) + (s.feed_row >= 0) for _, s, _ in rows]
    samp.row_index[:n] = [k for k, _, _ in rows]
    samp.sample_indices[:n] = [j for _, _, j in rows]
    samp.seeds[:n] = [d.seed_words for d in ds]
    samp.out_positions[:n] = num_out
    samp.temperature[:n] = [d.temperature for d in ds]
    samp.top_k[:n] = [d.top_k for d in ds]
    samp.top_p[:n] = [d.top_p for d in ds]
    for r, (d, m) in enumerate(zip(ds, num_out)):
      if m < d.banned_until:
        samp.banned_ids[r, :len(d.banned_ids)] = d.banned_ids
    need_top = any(d.wants_top for d in ds)
    samp.need_top[...] = need_top
    return need_top

  def serving_program_keys(self, max_num_batched_tokens: int) -> list[tuple]:
    """The xla step programs (t_cap, r_cap, decode rows, tiles) a serving run reaches:
    decode-only steps for each sample-row bucket 1..pow2(max_num_seqs); for each token
    bucket 8..pow2(budget), prefill-only and mixed steps with every tile bucket a step of
    that many tokens can have: from the usual t_cap / TILE_SIZE up to the most, one
    partial tile per prefill sequence on top of the full ones (many short prompts in one
    step: alpaca-like traffic reached 32 tiles at 128 tokens, and each such program
    compiled in the middle of a timed serving run), at least twice the usual. A step
    with more sample rows than its bucket's usual (n > 1 on several fresh prompts) still
    compiles when it comes. With num_scheduler_steps > 1, the multi-step decode of each
    row bucket too."""
    keys = []
    t_max = next_power_of_two(max_num_batched_tokens, _MIN_TOKEN_BUCKET)
    r = 1
    while r <= next_power_of_two(self.max_num_seqs):
      t_cap = next_power_of_two(r, self._min_decode_bucket)
      if t_cap <= t_max:
        keys.append((t_cap, r, r, 0))
        if self.num_scheduler_steps > 1:
          keys.append((t_cap, r, r, 0, "steps", self.num_scheduler_steps))
      r *= 2
    t_cap = _MIN_TOKEN_BUCKET
    while t_cap <= t_max:
      r_cap = self._row_bucket(1, t_cap, True)
      tiles = max(1, t_cap // TILE_SIZE)
      most = next_power_of_two(t_cap // TILE_SIZE + min(self.max_num_seqs, t_cap))
      np_ = tiles
      while np_ <= max(2 * tiles, most):
        keys += [(t_cap, r_cap, 0, np_), (t_cap, r_cap, r_cap, np_)]
        np_ *= 2
      t_cap *= 2
    return keys

  def precompile(self, max_num_batched_tokens: int) -> int:
    """Runs every program of `serving_program_keys` once on all-padding inputs (nothing
    is written: every slot is -1), so no step compiles while requests wait. Returns the
    number of programs that were new to this runner."""
    if self.impl not in ROW_IMPLS:
      raise ValueError(f"precompile supports attention_impl {ROW_IMPLS}, not {self.impl!r}")
    p = self.max_blocks_per_seq
    before = len(self.programs)
    for key in self.serving_program_keys(max_num_batched_tokens):
      if key in self.programs:
        continue
      t_cap, r_cap = key[:2]
      buf = self._new_inputs(key[:4])[0]  # (the input key: the multi-step suffix dropped)
      ms = None
      if len(key) > 4:  # multi-step: no inner step runs (the program compiles all the same)
        ms = step_lib.MultiStepBatch(np.asarray(0, np.int32), np.zeros(t_cap, np.int32),
                                     np.zeros((t_cap, p), np.int32),
                                     np.full(r_cap, t_cap, np.int32))
      self._run(key[:4], buf, self._no_feed, ms)
    return len(self.programs) - before

  # ---------------------------------------------------------------- checks
  def abstract_kv(self, num_blocks: int | None = None) -> kvc.KVCache:
    """The KV cache's abstract shapes, with `num_blocks` pages per layer if given."""
    def shape(x):
      dims = list(x.shape)
      if num_blocks is not None:
        dims[2] = num_blocks
      return jax.ShapeDtypeStruct(tuple(dims), x.dtype, sharding=x.sharding)
    return jax.tree.map(shape, self.kv)

  def compiled_programs(self, num_blocks: int | None = None):
    """Yields (key, compiled executable) for every step program this runner ran: the
    same shapes compiled again (with a pool of `num_blocks` pages if given), for XLA's
    memory accounting (tests)."""
    params = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                   for x in self._param_leaves)
    kv = self.abstract_kv(num_blocks)
    common = dict(graphdef=self._static_graph, impl=self.impl, vocab_size=self.vocab_size,
                  mesh=self.mesh)
    for key, args in self.programs.items():
      lowered = step_lib.lower(params, kv, *args, max_steps=self.num_scheduler_steps, **common)
      yield key, lowered.compile()
