"""Paged KV cache device state and the pure functions that update it.

The cache is an immutable pytree (`KVCache`) of two page arrays, K and V, each
`[num_layers, num_kv_heads, num_blocks, block_size, head_dim]`. A token's *slot* is
`block_id * block_size + offset`; the host-side `BlockManager` decides every slot
and every block copy/swap, this module only executes them on device.

Two kinds of entry points:

* traceable pure functions for use inside a caller's jitted step:
  `write_kv_layer`, `copy_kv_blocks` on the 5-D pages, and
  `write_kv_rows` on the row view `[L * Hkv * N, bs * D]` (`to_rows`)
  that the xla step uses throughout (see pagedjax.runner.attention for why);
* jitted public entries that *donate* the pages, so the update happens in place:
  `write_kv`, `copy_blocks`, `swap_out_blocks`, `swap_in_blocks`. After such a call
  the `KVCache` that was passed in is deleted; use the returned one.

Padding convention everywhere: a slot or block id `< 0` is padding and is ignored
(never written; reads of padding produce values that are then dropped). Block-id lists
given to the public entries are padded with -1 to the next power of two, so a long run
compiles at most ~log2(max ops) programs per entry (see `trace_counts`).

Swapping goes to a `HostKVPool`: JAX arrays in `memory_kind="pinned_host"` memory when
the default device offers that memory kind (the CPU backend does: memories
device / pinned_host / unpinned_host), otherwise numpy arrays in ordinary host memory.
`HostKVPool.memory_kind` says which one is in use.

Not here: deciding which slots or blocks to use (block_manager), attention (attention).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import SingleDeviceSharding

from pagedjax.intmath import next_power_of_two

# Number of times each jitted entry has been traced (= compiled programs), by name.
_TRACES: collections.Counter[str] = collections.Counter()


def trace_counts() -> dict[str, int]:
  """Returns how many times each jitted entry of this module has been traced."""
  return dict(_TRACES)


# Bit-pattern storage: bfloat16 pages may be stored as uint16 words. XLA:CPU has no
# native bfloat16 scatter: it converts the whole operand to float32, scatters and
# converts back, i.e. two full-pool copies per layer for a one-token write. An integer
# scatter of the same bits is native and in place, so the xla step stores bfloat16 pools
# as uint16 and views the few rows it gathers as bfloat16 (`from_storage`).
_BIT_STORAGE = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16),
                jnp.dtype(jnp.float8_e4m3fn): jnp.dtype(jnp.uint8)}
_LOGICAL = {v: k for k, v in _BIT_STORAGE.items()}


def to_storage(x: jax.Array, storage_dtype) -> jax.Array:
  """x (any float) as the pages' storage dtype (bit pattern when that is uint16)."""
  storage_dtype = jnp.dtype(storage_dtype)
  if storage_dtype in _LOGICAL:
    return lax.bitcast_convert_type(x.astype(_LOGICAL[storage_dtype]), storage_dtype)
  return x.astype(storage_dtype)


def from_storage(x: jax.Array) -> jax.Array:
  """Stored values in their logical float dtype (bit-pattern words viewed as bfloat16)."""
  if x.dtype in _LOGICAL:
    return lax.bitcast_convert_type(x, _LOGICAL[x.dtype])
  return x


# Quantized pages (kv_cache_dtype "int8" / "fp8"): each token's K (and V) vector of one
# kv head is stored in the narrow type with one float32 scale, value ~= stored * scale,
# scale = max |x| / QMAX (per token and kv head). A token's quantization depends on that
# token alone, so chunking, preemption and the order of writes never change a stored
# value (a per-block scale would grow as a block fills and re-round earlier tokens).
QUANT_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def is_quantized(dtype) -> bool:
  """Whether pages of this (logical or storage) dtype carry scales (uint8: fp8 bits)."""
  dtype = jnp.dtype(dtype)
  return dtype in QMAX or dtype == jnp.dtype(jnp.uint8)


def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """Per-vector symmetric quantization over the last axis.

  Args:
    x: `[..., D]` float K or V vectors.
    dtype: int8 or float8_e4m3fn.

  Returns:
    (`[..., D]` values in `dtype`, `[...]` float32 scales) with `x ~= values * scales[..., None]`;
    an all-zero vector gets scale 1 and zeros.
  """
  dtype = jnp.dtype(dtype)
  qmax = QMAX[dtype]
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  # A normal float32 at least (a subnormal scale could be flushed to zero: x / 0).
  scale = jnp.where(amax > 0, jnp.maximum(amax / qmax, jnp.finfo(jnp.float32).tiny), 1.0)
  y = x / scale[..., None]
  if dtype == jnp.int8:
    y = jnp.clip(jnp.round(y), -qmax, qmax)
  else:
    y = jnp.clip(y, -qmax, qmax)  # round-to-nearest-even on the cast; never saturates to NaN
  return y.astype(dtype), scale


def dequantize_kv(values: jax.Array, scales: jax.Array) -> jax.Array:
  """`values [..., D]` (int8 / float8_e4m3fn) times `scales [...]` in float32."""
  return values.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]


class _Blocks:
  """What the device cache and the host pool share: block arrays (pages, and scales when
  quantized) with blocks on axis 2."""

  @property
  def quantized(self) -> bool:
    return self.k_scales is not None

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  @property
  def bytes_per_block(self) -> int:
    """Bytes of one block in all layers, K and V, scales included."""
    return self.nbytes // self.num_blocks


@flax.struct.dataclass
class KVCache(_Blocks):
  """K and V pages of every layer.

  Attributes:
      k_pages: `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]` keys.
      v_pages: `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]` values.
        float32 or bfloat16, or uint16 holding bfloat16 bits (`init_kv_cache(bit_storage=)`);
        quantized: int8 or float8_e4m3fn (uint8 holding its bits), with scales.
      k_scales: `[num_layers, num_kv_heads, num_blocks, block_size]` float32, one per
        token and kv head (quantized pages only; None otherwise): key = k_pages * k_scales.
      v_scales: same for the values.
  """

  k_pages: jax.Array  # [L, Hkv, N, bs, D]
  v_pages: jax.Array  # [L, Hkv, N, bs, D]
  k_scales: jax.Array | None = None  # [L, Hkv, N, bs] f32, quantized pages only
  v_scales: jax.Array | None = None  # [L, Hkv, N, bs]

  @property
  def num_layers(self) -> int:
    return self.k_pages.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k_pages.shape[1]

  @property
  def num_blocks(self) -> int:
    return self.k_pages.shape[2]

  @property
  def block_size(self) -> int:
    return self.k_pages.shape[3]

  @property
  def head_dim(self) -> int:
    return self.k_pages.shape[4]

  @property
  def dtype(self) -> jnp.dtype:
    """The values' dtype (bfloat16 for bit-pattern storage)."""
    return _LOGICAL.get(self.k_pages.dtype, self.k_pages.dtype)



def block_bytes(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
                dtype) -> int:
  """Bytes of one block of a cache of `dtype` pages (all layers, K and V, scales included),
  what `KVCache.bytes_per_block` measures on an allocated cache."""
  itemsize = jnp.dtype(dtype).itemsize
  scale = 4 if jnp.dtype(dtype) in QMAX else 0  # one float32 per quantized vector
  return 2 * num_layers * num_kv_heads * block_size * (head_dim * itemsize + scale)


def init_kv_cache(
  *,
  num_layers: int,
  num_kv_heads: int,
  num_blocks: int,
  block_size: int,
  head_dim: int,
  dtype=jnp.float32,
  bit_storage: bool = False,
  sharding: jax.sharding.Sharding | None = None,
) -> KVCache:
  """Allocates a zero-filled cache.

  Args:
      num_layers, num_kv_heads, num_blocks, block_size, head_dim: positive sizes.
      dtype: float32 or bfloat16, or int8 / float8_e4m3fn (quantized: with scales).
      bit_storage: store bfloat16 as uint16 and float8_e4m3fn as uint8 bit patterns
        (what the xla step uses on CPU; see `to_storage`). No effect on float32 / int8.
      sharding: None (the default device), or where the pages live, e.g. a NamedSharding
        of the kv-head axis over a tensor-parallel mesh (scales get the same spec); each
        device allocates only its shard.

  Returns:
      A `KVCache` with both page arrays `[num_layers, num_kv_heads, num_blocks,
      block_size, head_dim]` (and float32 scales `[..., block_size]` when quantized).
  """
  shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
  if any(not isinstance(s, int) or s <= 0 for s in shape):
    raise ValueError(
      f"cache sizes must be positive ints, got (num_layers, num_kv_heads, "
      f"num_blocks, block_size, head_dim)={shape}"
    )
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), *QMAX):
    raise ValueError(f"dtype must be float32, bfloat16, int8 or float8_e4m3fn, got {dtype}")
  quantized = dtype in QMAX
  if bit_storage:
    dtype = _BIT_STORAGE.get(dtype, dtype)
  # Committed to the default device: the arrays that come back from the swap entries
  # are committed, and jit keys its compiled programs on commitment, so an uncommitted
  # initial cache would compile every step program a second time after the first swap.
  if sharding is None:
    sharding = SingleDeviceSharding(jax.devices()[0])
  zeros = lambda shape, dtype: _zeros(shape, dtype, sharding)  # noqa: E731
  scales = (lambda: zeros(shape[:-1], jnp.float32)) if quantized else (lambda: None)
  return KVCache(k_pages=zeros(shape, dtype), v_pages=zeros(shape, dtype), k_scales=scales(),
                 v_scales=scales())


# ----------------------------------------------------------------------------------
# Traceable pure functions.


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
  """Static sizes of a page pool `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]`."""

  num_layers: int
  num_kv_heads: int
  num_blocks: int
  block_size: int
  head_dim: int

  @classmethod
  def of(cls, pages: jax.Array) -> PoolGeometry:
    return cls(*pages.shape)

  @property
  def shape(self) -> tuple[int, int, int, int, int]:
    return (self.num_layers, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)


def to_rows(pages: jax.Array) -> jax.Array:
  """The row view `[L * Hkv * N, bs * D]` of a pool (a free reshape): one page of one
  head of one layer is row `(layer * Hkv + head) * N + block`."""
  return pages.reshape(-1, pages.shape[-2] * pages.shape[-1])


def from_rows(rows: jax.Array, geometry: PoolGeometry) -> jax.Array:
  return rows.reshape(geometry.shape)


def _drop_padding(ids: jax.Array, size: int) -> jax.Array:
  # Negative ids would wrap around under numpy indexing rules; send them out of
  # range instead so that a scatter with mode="drop" skips them.
  return jnp.where(ids < 0, size, ids)


def scale_rows(scales: jax.Array | None) -> jax.Array | None:
  """The row view `[L * Hkv * N, bs]` of scales `[L, Hkv, N, bs]` (row = `to_rows`'s row)."""
  return None if scales is None else scales.reshape(-1, scales.shape[-1])


def from_scale_rows(rows: jax.Array | None, geometry: PoolGeometry) -> jax.Array | None:
  return None if rows is None else rows.reshape(geometry.shape[:-1])


def _quantize_for(pool: jax.Array, x: jax.Array, scales_given: bool):
  # x [T, Hkv, D] -> (values in the pool's storage dtype, scales [T, Hkv] or None).
  if not scales_given:
    if is_quantized(pool.dtype):
      raise ValueError(f"a {pool.dtype} pool needs its scales")
    return to_storage(x, pool.dtype), None
  values, scales = quantize_kv(x, _LOGICAL.get(pool.dtype, pool.dtype))
  return to_storage(values, pool.dtype), scales


def write_kv_rows(k_rows: jax.Array, v_rows: jax.Array, layer, k: jax.Array, v: jax.Array,
                  slot_mapping: jax.Array, geometry: PoolGeometry, k_scale_rows=None,
                  v_scale_rows=None):
  """Scatters new tokens' K/V into their slots of one layer, on the row view.

  Quantized pools (scales given) store each token's vectors quantized (`quantize_kv`)
  and their scales: quantization happens here, inside the caller's jitted step.

  Args:
      k_rows, v_rows: `[L * Hkv * N, bs * D]` (`to_rows`).
      layer: layer index (int or int32 scalar, may be traced).
      k, v: `[T, Hkv, D]` for T new tokens.
      slot_mapping: `int32[T]`, `block * bs + offset`; `< 0` is padding (not written).
          Slots must be distinct.
      geometry: the pool's sizes.
      k_scale_rows, v_scale_rows: `[L * Hkv * N, bs]` float32 (`scale_rows`) for
          quantized pools, else None.

  Returns:
      The updated `(k_rows, v_rows, k_scale_rows, v_scale_rows)` (scales None when not
      quantized); in place when the caller donates them.
  """
  hkv, n, bs, d = geometry.num_kv_heads, geometry.num_blocks, geometry.block_size, geometry.head_dim
  slots = slot_mapping.astype(jnp.int32)  # [T]
  heads = (jnp.asarray(layer, jnp.int32) * hkv + jnp.arange(hkv, dtype=jnp.int32)) * n
  row = heads[None, :] + slots[:, None] // bs  # [T, Hkv]
  row = jnp.where(slots[:, None] < 0, k_rows.shape[0], row)  # padding: out of range
  col = jnp.broadcast_to((slots % bs)[:, None], row.shape)
  index = jnp.stack([row, col * d], axis=-1)  # [T, Hkv, 2]: (row, first column) of each write
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(0,),
                                      scatter_dims_to_operand_dims=(0, 1))
  scale_index = jnp.stack([row, col], axis=-1)
  scale_dnums = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0, 1),
                                            scatter_dims_to_operand_dims=(0, 1))

  def put(rows, x, srows):
    values, scales = _quantize_for(rows, x, srows is not None)
    rows = lax.scatter(rows, index, values, dnums, indices_are_sorted=False,
                       unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)
    if srows is not None:
      srows = lax.scatter(srows, scale_index, scales, scale_dnums, indices_are_sorted=False,
                          unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)
    return rows, srows

  (k_rows, k_scale_rows), (v_rows, v_scale_rows) = put(k_rows, k, k_scale_rows), put(
    v_rows, v, v_scale_rows)
  return k_rows, v_rows, k_scale_rows, v_scale_rows


def write_kv_layer(
  k_pages: jax.Array, v_pages: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
  k_scales=None, v_scales=None,
):
  """Scatters new tokens' K/V into their slots of one layer of all-layer pages.

  Indexes the 5-D pages directly (no reshape, so no view sits between this write and
  the reads after it: see `write_kv_rows` for the row-view form the xla step uses).

  Args:
      k_pages, v_pages: `[L, Hkv, N, bs, D]`.
      layer: layer index (int or int32 scalar, may be traced).
      k, v: `[T, Hkv, D]` for T new tokens.
      slot_mapping: `int32[T]`, `block * bs + offset`; `< 0` is padding (not written).
          Slots must be distinct (duplicates write in unspecified order).
      k_scales, v_scales: `[L, Hkv, N, bs]` float32 for quantized pages, else None.

  Returns:
      The updated `(k_pages, v_pages, k_scales, v_scales)` (scales None when not
      quantized); in place when the caller donates them.
  """
  _, hkv, n, bs, _ = k_pages.shape
  slots = slot_mapping.astype(jnp.int32)  # [T]
  block = _drop_padding(jnp.where(slots < 0, -1, slots // bs), n)  # [T]
  heads = jnp.arange(hkv, dtype=jnp.int32)
  layer_ix = jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (slots.shape[0], hkv))
  index = jnp.stack([layer_ix, jnp.broadcast_to(heads, layer_ix.shape),
                     jnp.broadcast_to(block[:, None], layer_ix.shape),
                     jnp.broadcast_to((slots % bs)[:, None], layer_ix.shape)], axis=-1)
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(0, 1, 2, 3),
                                      scatter_dims_to_operand_dims=(0, 1, 2, 3))
  scale_dnums = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0, 1, 2, 3),
                                            scatter_dims_to_operand_dims=(0, 1, 2, 3))

  def put(pages, x, scales):  # x [T, Hkv, D]
    values, new_scales = _quantize_for(pages, x, scales is not None)
    pages = lax.scatter(pages, index, values, dnums, unique_indices=True,
                        mode=lax.GatherScatterMode.FILL_OR_DROP)
    if scales is not None:
      scales = lax.scatter(scales, index, new_scales, scale_dnums, unique_indices=True,
                           mode=lax.GatherScatterMode.FILL_OR_DROP)
    return pages, scales

  (k_pages, k_scales), (v_pages, v_scales) = put(k_pages, k, k_scales), put(v_pages, v, v_scales)
  return k_pages, v_pages, k_scales, v_scales


def _gather_blocks(pages: jax.Array, ids: jax.Array) -> jax.Array:
  # pages [L, Hkv, N, bs, D] (or scales [L, Hkv, N, bs]), ids int32[n] -> [L, Hkv, n, ...];
  # padding reads block 0.
  return pages[:, :, jnp.maximum(ids, 0)]


def _scatter_blocks(pages: jax.Array, ids: jax.Array, blocks: jax.Array) -> jax.Array:
  # Writes blocks [L, Hkv, n, bs, D] to block ids; padding ids (< 0) are dropped.
  ids = _drop_padding(ids, pages.shape[2])
  return pages.at[:, :, ids].set(blocks.astype(pages.dtype), mode="drop")


def copy_kv_blocks(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
  """Copies blocks `src[i] -> dst[i]` in every layer, K and V (copy-on-write ops).

  All reads happen before all writes. Entries where `src < 0` or `dst < 0` are padding
  and ignored. Destinations must be distinct.

  Args:
      cache: the cache.
      src, dst: `int32[n]` block ids.

  Returns:
      The updated cache.
  """
  valid = (src >= 0) & (dst >= 0)
  dst = jnp.where(valid, dst, -1)
  # Every array of the cache (pages and, when quantized, scales) has blocks on axis 2.
  return jax.tree.map(lambda x: _scatter_blocks(x, dst, _gather_blocks(x, src)), cache)


# ----------------------------------------------------------------------------------
# Host pool for swapped-out blocks.


def _zeros(shape, dtype, sharding) -> jax.Array:
  """Zeros with `sharding`, each device (or host memory) holding its shard, in buffers
  XLA owns: made by a jitted program (every process runs it when the sharding spans
  processes). One exception: a single device's pinned_host array is a transfer of numpy
  zeros, since a jit-made one trips XLA:CPU's memory-kind check when it is donated to the
  swap-out program later."""
  if sharding.memory_kind == "pinned_host" and isinstance(sharding, SingleDeviceSharding):
    return jax.device_put(np.zeros(shape, dtype), sharding)
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _host_sharding(cache: KVCache) -> jax.sharding.Sharding | None:
  """The device pages' sharding in pinned host memory (each device's shard in its own
  host's memory), or None when the backend lacks that memory kind."""
  device = jax.devices()[0]
  if "pinned_host" in {m.kind for m in device.addressable_memories()}:
    return cache.k_pages.sharding.with_memory_kind("pinned_host")
  return None


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The same devices and memory, every value whole on each (for block-id vectors)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(),
                                      memory_kind=sharding.memory_kind)
  return sharding


@flax.struct.dataclass
class HostKVPool(_Blocks):
  """Swapped-out K/V blocks in host memory.

  Attributes:
      k_blocks: `[num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]` in the
          pool's storage dtype: the device pool's (bits copied as they are), or int8 /
          uint8 (fp8 bits) for a quantized swap of an unquantized device pool.
      v_blocks: same shape as `k_blocks`.
      k_scales, v_scales: `[num_layers, num_kv_heads, num_host_blocks, block_size]`
          float32 when the blocks are quantized, else None.
      memory_kind: "pinned_host" (JAX arrays in pinned host memory) or "numpy"
          (numpy arrays; used when the backend lacks the pinned_host memory kind).
  """

  k_blocks: jax.Array | np.ndarray  # [L, Hkv, M, bs, D]
  v_blocks: jax.Array | np.ndarray  # [L, Hkv, M, bs, D]
  k_scales: jax.Array | np.ndarray | None = None  # [L, Hkv, M, bs] f32 (quantized only)
  v_scales: jax.Array | np.ndarray | None = None  # [L, Hkv, M, bs]
  memory_kind: str = flax.struct.field(pytree_node=False, default="pinned_host")

  @property
  def num_blocks(self) -> int:
    return self.k_blocks.shape[2]



def init_host_pool(
  cache: KVCache, num_host_blocks: int, *, memory_kind: str | None = None, dtype=None
) -> HostKVPool:
  """Allocates a zero-filled host pool shaped like `cache` with `num_host_blocks` blocks.

  Args:
      cache: the device cache whose blocks will be swapped (gives shapes and dtype).
      num_host_blocks: number of host blocks, > 0.
      memory_kind: "pinned_host", "numpy", or None for pinned_host when available.
      dtype: None (blocks kept as the device stores them), or int8 / float8_e4m3fn to
          store the blocks of an unquantized device pool quantized (`quantize_kv` on
          swap-out, on the device before the copy; dequantized on swap-in). A quantized
          device pool is always swapped as it is (dtype None or its own dtype).

  Returns:
      A `HostKVPool`.
  """
  if not isinstance(num_host_blocks, int) or num_host_blocks <= 0:
    raise ValueError(f"num_host_blocks must be a positive int, got {num_host_blocks!r}")
  if memory_kind not in (None, "pinned_host", "numpy"):
    raise ValueError(f"memory_kind must be None, 'pinned_host' or 'numpy', got {memory_kind!r}")
  storage = cache.k_pages.dtype
  if dtype is not None:
    dtype = jnp.dtype(dtype)
    if dtype not in QMAX:
      raise ValueError(f"host pool dtype must be None, int8 or float8_e4m3fn, got {dtype}")
    if cache.quantized and dtype != cache.dtype:
      raise ValueError(f"a {cache.dtype} device pool swaps as {cache.dtype}, not {dtype}")
    if not cache.quantized:  # a quantized pool's blocks are copied bit for bit, as stored
      storage = _BIT_STORAGE.get(dtype, dtype)  # numpy-friendly: fp8 as uint8 bits
  sharding = _host_sharding(cache)
  if memory_kind == "pinned_host" and sharding is None:
    raise ValueError(f"backend {jax.default_backend()!r} has no pinned_host memory kind")
  if memory_kind is None:
    memory_kind = "numpy" if sharding is None else "pinned_host"
  shape = (cache.num_layers, cache.num_kv_heads, num_host_blocks, cache.block_size, cache.head_dim)
  shapes = [(shape, storage), (shape, storage)]  # the storage dtype: bits
  if cache.quantized or dtype is not None:
    shapes += [(shape[:-1], np.float32), (shape[:-1], np.float32)]
  if memory_kind == "pinned_host":
    arrays = [_zeros(s, d, sharding) for s, d in shapes]
  else:
    arrays = [np.zeros(s, d) for s, d in shapes]
  return HostKVPool(*arrays, memory_kind=memory_kind)


def _blocks_for_host(cache: KVCache, ids: jax.Array, host_dtype) -> tuple:
  """Device blocks `ids` in the host pool's form: (k, v, k_scales | None, v_scales | None)."""
  k, v = _gather_blocks(cache.k_pages, ids), _gather_blocks(cache.v_pages, ids)
  if cache.quantized:
    return k, v, _gather_blocks(cache.k_scales, ids), _gather_blocks(cache.v_scales, ids)
  if host_dtype == cache.k_pages.dtype:
    return k, v, None, None
  logical = _LOGICAL.get(host_dtype, host_dtype)  # quantized swap: quantize before the copy
  (kq, ks), (vq, vs) = (quantize_kv(from_storage(x), logical) for x in (k, v))
  return to_storage(kq, host_dtype), to_storage(vq, host_dtype), ks, vs


def _blocks_for_device(cache: KVCache, blocks: tuple) -> tuple:
  """Host-form blocks (on the device) in the cache's form: (k, v, k_scales, v_scales)."""
  k, v, ks, vs = blocks
  if cache.quantized or ks is None:
    return blocks
  # quantized swap of an unquantized pool: dequantize into the pool's storage dtype
  return (to_storage(dequantize_kv(from_storage(k), ks), cache.k_pages.dtype),
          to_storage(dequantize_kv(from_storage(v), vs), cache.v_pages.dtype), None, None)


def _scatter_all(arrays: tuple, ids: jax.Array, blocks: tuple) -> tuple:
  return tuple(None if a is None else _scatter_blocks(a, ids, b) for a, b in zip(arrays, blocks))


# ----------------------------------------------------------------------------------
# Jitted, donated public entries.


def _block_ids(name: str, ids, limit: int, size: int) -> np.ndarray:
  # Host-side check + padding with -1 to `size` entries.
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  bad = ids[(ids >= limit)]
  if bad.size:
    raise ValueError(f"{name} has block ids {bad.tolist()} >= number of blocks {limit}")
  return np.pad(ids, (0, size - ids.size), constant_values=-1).astype(np.int32)


def _pair_ids(a_name, a, a_limit, b_name, b, b_limit) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"{a_name} and {b_name} must have the same length, got {a.size} and {b.size}")
  size = next_power_of_two(a.size)
  return _block_ids(a_name, a, a_limit, size), _block_ids(b_name, b, b_limit, size)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_kv_jit(cache, layer, k, v, slot_mapping):
  _TRACES["write_kv"] += 1
  k_pages, v_pages, k_scales, v_scales = write_kv_layer(
    cache.k_pages, cache.v_pages, layer, k, v, slot_mapping, cache.k_scales, cache.v_scales)
  return cache.replace(k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales)


def write_kv(cache: KVCache, layer, k: jax.Array, v: jax.Array, slot_mapping) -> KVCache:
  """Writes new tokens' K/V into one layer; the input cache is donated (in place).

  Args:
      cache: the cache (deleted by this call).
      layer: layer index in `[0, num_layers)`.
      k, v: `[T, num_kv_heads, head_dim]`.
      slot_mapping: `int32[T]` slots; `< 0` is padding, never written.

  Returns:
      The updated cache.
  """
  expect = (cache.num_kv_heads, cache.head_dim)
  if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != expect:
    raise ValueError(f"k, v must be [T, {expect[0]}, {expect[1]}], got {k.shape} and {v.shape}")
  if np.shape(slot_mapping) != k.shape[:1]:
    raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {np.shape(slot_mapping)}")
  if isinstance(layer, int) and not 0 <= layer < cache.num_layers:
    raise ValueError(f"layer {layer} out of range [0, {cache.num_layers})")
  return _write_kv_jit(cache, jnp.int32(layer), k, v, jnp.asarray(slot_mapping, jnp.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks_jit(cache, src, dst):
  _TRACES["copy_blocks"] += 1
  return copy_kv_blocks(cache, src, dst)


def copy_blocks(cache: KVCache, src, dst) -> KVCache:
  """Executes copy-on-write block copies `src[i] -> dst[i]` in all layers, in place.

  Args:
      cache: the cache (deleted by this call).
      src, dst: host int sequences of equal length; entries `< 0` are padding.
          Padded to the next power of two so few programs compile.

  Returns:
      The updated cache.
  """
  src, dst = _pair_ids("src", src, cache.num_blocks, "dst", dst, cache.num_blocks)
  return _copy_blocks_jit(cache, src, dst)


@functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("host_sharding",))
def _swap_out_jit(cache, pool, dev_ids, host_ids, *, host_sharding):
  _TRACES["swap_out_blocks"] += 1
  host_ids = jnp.where(dev_ids < 0, -1, host_ids)
  blocks = _blocks_for_host(cache, dev_ids, pool.k_blocks.dtype)
  # device -> pinned host; sharded pools: each device's shard to its own host memory
  moved = jax.device_put(blocks, host_sharding)
  k, v, ks, vs = _scatter_all((pool.k_blocks, pool.v_blocks, pool.k_scales, pool.v_scales),
                              host_ids, moved)
  return pool.replace(k_blocks=k, v_blocks=v, k_scales=ks, v_scales=vs)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("device", "host"))
def _swap_in_jit(cache, src, src_ids, dev_ids, *, device, host):
  # src: (k, v, k_scales, v_scales) [L, Hkv, M, bs(, D)]: the pinned host pool's arrays
  # (host: their sharding), or numpy blocks (host None: transferred to the device on call).
  # device: the pages' sharding.
  _TRACES["swap_in_blocks"] += 1
  if host is not None:  # gather in host memory: operands of a gather share one memory space
    src_ids = jax.device_put(src_ids, _replicated(host))
  blocks = tuple(None if x is None else _gather_blocks(x, src_ids) for x in src)
  blocks = _blocks_for_device(cache, jax.device_put(blocks, device))  # host -> device
  k, v, ks, vs = _scatter_all((cache.k_pages, cache.v_pages, cache.k_scales, cache.v_scales),
                              dev_ids, blocks)
  return cache.replace(k_pages=k, v_pages=v, k_scales=ks, v_scales=vs)


@functools.partial(jax.jit, static_argnames=("host_dtype",))
def _gather_for_host_jit(cache, ids, *, host_dtype):
  _TRACES["gather_blocks"] += 1
  return _blocks_for_host(cache, ids, host_dtype)


def _host_arrays(pool: HostKVPool) -> tuple:
  return pool.k_blocks, pool.v_blocks, pool.k_scales, pool.v_scales


def swap_out_blocks(cache: KVCache, host_pool: HostKVPool, dev_ids, host_ids) -> HostKVPool:
  """Copies device blocks `dev_ids[i]` to host blocks `host_ids[i]`, all layers.

  The cache is unchanged (its blocks are freed by the block manager, not here); the
  pool is donated (pinned_host) or updated in place (numpy). A quantized host pool of
  an unquantized cache stores the blocks quantized (on the device, before the copy).
  The pinned_host copy is dispatched asynchronously: the call returns before the copy
  lands, and JAX orders it before any later use of either pool.

  Args:
      cache: the device cache.
      host_pool: the host pool.
      dev_ids, host_ids: host int sequences of equal length; entries `< 0` are padding.

  Returns:
      The updated host pool.
  """
  dev_ids, host_ids = _pair_ids(
    "dev_ids", dev_ids, cache.num_blocks, "host_ids", host_ids, host_pool.num_blocks
  )
  if host_pool.memory_kind == "pinned_host":
    return _swap_out_jit(cache, host_pool, dev_ids, host_ids,
                         host_sharding=host_pool.k_blocks.sharding)
  blocks = jax.device_get(_gather_for_host_jit(cache, dev_ids,
                                               host_dtype=host_pool.k_blocks.dtype))
  keep = (dev_ids >= 0) & (host_ids >= 0)
  for dst, src in zip(_host_arrays(host_pool), blocks):
    if dst is not None:
      dst[:, :, host_ids[keep]] = src[:, :, keep]
  return host_pool


def swap_in_blocks(cache: KVCache, host_pool: HostKVPool, host_ids, dev_ids) -> KVCache:
  """Copies host blocks `host_ids[i]` into device blocks `dev_ids[i]`, all layers.

  Blocks a quantized host pool holds for an unquantized cache are dequantized on the
  device after the copy. Dispatched asynchronously like `swap_out_blocks`.

  Args:
      cache: the device cache (deleted by this call).
      host_pool: the host pool (unchanged).
      host_ids, dev_ids: host int sequences of equal length; entries `< 0` are padding.

  Returns:
      The updated cache.
  """
  host_ids, dev_ids = _pair_ids(
    "host_ids", host_ids, host_pool.num_blocks, "dev_ids", dev_ids, cache.num_blocks
  )
  dev_ids = np.where(host_ids < 0, -1, dev_ids).astype(np.int32)
  device = cache.k_pages.sharding.with_memory_kind("device")
  if host_pool.memory_kind == "pinned_host":
    return _swap_in_jit(cache, _host_arrays(host_pool), host_ids, dev_ids, device=device,
                        host=host_pool.k_blocks.sharding)
  # numpy pool: send only the requested blocks, then index them 0..n-1 on device.
  idx = np.maximum(host_ids, 0)
  return _swap_in_jit(
    cache,
    tuple(None if x is None else x[:, :, idx] for x in _host_arrays(host_pool)),
    np.arange(idx.size, dtype=np.int32),
    dev_ids,
    device=device,
    host=None,
  )
