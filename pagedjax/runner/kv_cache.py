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
_BIT_STORAGE = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}
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


@flax.struct.dataclass
class KVCache:
  """K and V pages of every layer.

  Attributes:
      k_pages: `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]` keys.
      v_pages: `[num_layers, num_kv_heads, num_blocks, block_size, head_dim]` values.
        float32 or bfloat16, or uint16 holding bfloat16 bits (`init_kv_cache(bit_storage=)`).
  """

  k_pages: jax.Array  # [L, Hkv, N, bs, D]
  v_pages: jax.Array  # [L, Hkv, N, bs, D]

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

  @property
  def nbytes(self) -> int:
    return self.k_pages.nbytes + self.v_pages.nbytes


def init_kv_cache(
  *,
  num_layers: int,
  num_kv_heads: int,
  num_blocks: int,
  block_size: int,
  head_dim: int,
  dtype=jnp.float32,
  bit_storage: bool = False,
) -> KVCache:
  """Allocates a zero-filled cache.

  Args:
      num_layers, num_kv_heads, num_blocks, block_size, head_dim: positive sizes.
      dtype: float32 or bfloat16.
      bit_storage: store bfloat16 as uint16 bit patterns (what the xla step uses on
        CPU; see `to_storage`). No effect on float32.

  Returns:
      A `KVCache` with both page arrays `[num_layers, num_kv_heads, num_blocks,
      block_size, head_dim]`.
  """
  shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
  if any(not isinstance(s, int) or s <= 0 for s in shape):
    raise ValueError(
      f"cache sizes must be positive ints, got (num_layers, num_kv_heads, "
      f"num_blocks, block_size, head_dim)={shape}"
    )
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
  if bit_storage:
    dtype = _BIT_STORAGE.get(dtype, dtype)
  # Committed to the default device: the arrays that come back from the swap entries
  # are committed, and jit keys its compiled programs on commitment, so an uncommitted
  # initial cache would compile every step program a second time after the first swap.
  device = jax.devices()[0]
  zeros = lambda: jax.device_put(jnp.zeros(shape, dtype), device)  # noqa: E731
  return KVCache(k_pages=zeros(), v_pages=zeros())


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


def write_kv_rows(k_rows: jax.Array, v_rows: jax.Array, layer, k: jax.Array, v: jax.Array,
                  slot_mapping: jax.Array, geometry: PoolGeometry) -> tuple[jax.Array, jax.Array]:
  """Scatters new tokens' K/V into their slots of one layer, on the row view.

  Args:
      k_rows, v_rows: `[L * Hkv * N, bs * D]` (`to_rows`).
      layer: layer index (int or int32 scalar, may be traced).
      k, v: `[T, Hkv, D]` for T new tokens.
      slot_mapping: `int32[T]`, `block * bs + offset`; `< 0` is padding (not written).
          Slots must be distinct.
      geometry: the pool's sizes.

  Returns:
      The updated `(k_rows, v_rows)`; in place when the caller donates them.
  """
  hkv, n, bs, d = geometry.num_kv_heads, geometry.num_blocks, geometry.block_size, geometry.head_dim
  slots = slot_mapping.astype(jnp.int32)  # [T]
  heads = (jnp.asarray(layer, jnp.int32) * hkv + jnp.arange(hkv, dtype=jnp.int32)) * n
  row = heads[None, :] + slots[:, None] // bs  # [T, Hkv]
  row = jnp.where(slots[:, None] < 0, k_rows.shape[0], row)  # padding: out of range
  col = jnp.broadcast_to((slots % bs * d)[:, None], row.shape)
  index = jnp.stack([row, col], axis=-1)  # [T, Hkv, 2]: (row, first column) of each write
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(0,),
                                      scatter_dims_to_operand_dims=(0, 1))

  def put(rows, x):
    return lax.scatter(rows, index, to_storage(x, rows.dtype), dnums, indices_are_sorted=False,
                       unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)

  return put(k_rows, k), put(v_rows, v)


def write_kv_layer(
  k_pages: jax.Array, v_pages: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Scatters new tokens' K/V into their slots of one layer of all-layer pages.

  Indexes the 5-D pages directly (no reshape, so no view sits between this write and
  the reads after it: see `write_kv_rows` for the row-view form the xla step uses).

  Args:
      k_pages, v_pages: `[L, Hkv, N, bs, D]`.
      layer: layer index (int or int32 scalar, may be traced).
      k, v: `[T, Hkv, D]` for T new tokens.
      slot_mapping: `int32[T]`, `block * bs + offset`; `< 0` is padding (not written).
          Slots must be distinct (duplicates write in unspecified order).

  Returns:
      The updated `(k_pages, v_pages)`; in place when the caller donates them.
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

  def put(pages, x):  # x [T, Hkv, D]
    return lax.scatter(pages, index, to_storage(x, pages.dtype), dnums, unique_indices=True,
                       mode=lax.GatherScatterMode.FILL_OR_DROP)

  return put(k_pages, k), put(v_pages, v)


def _gather_blocks(pages: jax.Array, ids: jax.Array) -> jax.Array:
  # pages [L, Hkv, N, bs, D], ids int32[n] -> [L, Hkv, n, bs, D]; padding reads block 0.
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
  return cache.replace(
    k_pages=_scatter_blocks(cache.k_pages, dst, _gather_blocks(cache.k_pages, src)),
    v_pages=_scatter_blocks(cache.v_pages, dst, _gather_blocks(cache.v_pages, src)),
  )


# ----------------------------------------------------------------------------------
# Host pool for swapped-out blocks.


def _host_sharding() -> SingleDeviceSharding | None:
  device = jax.devices()[0]
  if "pinned_host" in {m.kind for m in device.addressable_memories()}:
    return SingleDeviceSharding(device, memory_kind="pinned_host")
  return None


@flax.struct.dataclass
class HostKVPool:
  """Swapped-out K/V blocks in host memory.

  Attributes:
      k_blocks: `[num_layers, num_kv_heads, num_host_blocks, block_size, head_dim]`.
      v_blocks: same shape as `k_blocks`.
      memory_kind: "pinned_host" (JAX arrays in pinned host memory) or "numpy"
          (numpy arrays; used when the backend lacks the pinned_host memory kind).
  """

  k_blocks: jax.Array | np.ndarray  # [L, Hkv, M, bs, D]
  v_blocks: jax.Array | np.ndarray  # [L, Hkv, M, bs, D]
  memory_kind: str = flax.struct.field(pytree_node=False, default="pinned_host")

  @property
  def num_blocks(self) -> int:
    return self.k_blocks.shape[2]


def init_host_pool(
  cache: KVCache, num_host_blocks: int, *, memory_kind: str | None = None
) -> HostKVPool:
  """Allocates a zero-filled host pool shaped like `cache` with `num_host_blocks` blocks.

  Args:
      cache: the device cache whose blocks will be swapped (gives shapes and dtype).
      num_host_blocks: number of host blocks, > 0.
      memory_kind: "pinned_host", "numpy", or None for pinned_host when available.

  Returns:
      A `HostKVPool`.
  """
  if not isinstance(num_host_blocks, int) or num_host_blocks <= 0:
    raise ValueError(f"num_host_blocks must be a positive int, got {num_host_blocks!r}")
  if memory_kind not in (None, "pinned_host", "numpy"):
    raise ValueError(f"memory_kind must be None, 'pinned_host' or 'numpy', got {memory_kind!r}")
  sharding = _host_sharding()
  if memory_kind == "pinned_host" and sharding is None:
    raise ValueError(f"backend {jax.default_backend()!r} has no pinned_host memory kind")
  if memory_kind is None:
    memory_kind = "numpy" if sharding is None else "pinned_host"
  shape = (cache.num_layers, cache.num_kv_heads, num_host_blocks, cache.block_size, cache.head_dim)
  zeros = np.zeros(shape, cache.k_pages.dtype)  # the storage dtype: swaps copy bits
  if memory_kind == "numpy":
    return HostKVPool(zeros, zeros.copy(), memory_kind="numpy")
  return HostKVPool(
    jax.device_put(zeros, sharding), jax.device_put(zeros, sharding), memory_kind="pinned_host"
  )


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
  k_pages, v_pages = write_kv_layer(cache.k_pages, cache.v_pages, layer, k, v, slot_mapping)
  return cache.replace(k_pages=k_pages, v_pages=v_pages)


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


@functools.partial(jax.jit, donate_argnums=(1,))
def _swap_out_jit(cache, pool, dev_ids, host_ids):
  _TRACES["swap_out_blocks"] += 1
  host_ids = jnp.where(dev_ids < 0, -1, host_ids)
  host = _host_sharding()

  def out(pages, blocks):
    moved = jax.device_put(_gather_blocks(pages, dev_ids), host)  # device -> pinned host
    return _scatter_blocks(blocks, host_ids, moved)

  return pool.replace(
    k_blocks=out(cache.k_pages, pool.k_blocks), v_blocks=out(cache.v_pages, pool.v_blocks)
  )


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("src_on_host",))
def _swap_in_jit(cache, k_src, v_src, src_ids, dev_ids, *, src_on_host):
  # k_src/v_src [L, Hkv, M, bs, D]: the pinned host pool (src_on_host), or numpy blocks
  # (transferred to the device on call).
  _TRACES["swap_in_blocks"] += 1
  device = SingleDeviceSharding(jax.devices()[0], memory_kind="device")
  if src_on_host:  # gather in host memory: operands of a gather share one memory space
    src_ids = jax.device_put(src_ids, _host_sharding())

  def into(pages, src):
    blocks = jax.device_put(_gather_blocks(src, src_ids), device)  # host -> device
    return _scatter_blocks(pages, dev_ids, blocks)

  return cache.replace(k_pages=into(cache.k_pages, k_src), v_pages=into(cache.v_pages, v_src))


@jax.jit
def _gather_both_jit(k, v, ids):
  _TRACES["gather_blocks"] += 1
  return _gather_blocks(k, ids), _gather_blocks(v, ids)


def swap_out_blocks(cache: KVCache, host_pool: HostKVPool, dev_ids, host_ids) -> HostKVPool:
  """Copies device blocks `dev_ids[i]` to host blocks `host_ids[i]`, all layers.

  The cache is unchanged (its blocks are freed by the block manager, not here); the
  pool is donated (pinned_host) or updated in place (numpy).

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
    return _swap_out_jit(cache, host_pool, dev_ids, host_ids)
  k, v = jax.device_get(_gather_both_jit(cache.k_pages, cache.v_pages, dev_ids))
  keep = (dev_ids >= 0) & (host_ids >= 0)
  host_pool.k_blocks[:, :, host_ids[keep]] = k[:, :, keep]
  host_pool.v_blocks[:, :, host_ids[keep]] = v[:, :, keep]
  return host_pool


def swap_in_blocks(cache: KVCache, host_pool: HostKVPool, host_ids, dev_ids) -> KVCache:
  """Copies host blocks `host_ids[i]` into device blocks `dev_ids[i]`, all layers.

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
  if host_pool.memory_kind == "pinned_host":
    return _swap_in_jit(
      cache, host_pool.k_blocks, host_pool.v_blocks, host_ids, dev_ids, src_on_host=True
    )
  # numpy pool: send only the requested blocks, then index them 0..n-1 on device.
  idx = np.maximum(host_ids, 0)
  return _swap_in_jit(
    cache,
    host_pool.k_blocks[:, :, idx],
    host_pool.v_blocks[:, :, idx],
    np.arange(idx.size, dtype=np.int32),
    dev_ids,
    src_on_host=False,
  )
