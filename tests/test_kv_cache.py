"""Tests for pagedjax.runner.kv_cache: every op against numpy, donation, padding, bucketing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.runner import kv_cache as kc

L, HKV, N, BS, D = 2, 2, 8, 4, 8


def _random_cache(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shape = (L, HKV, N, BS, D)
  cache = kc.KVCache(
    jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype)
  )
  return (cache, *_np(cache))


def _np(cache):
  # Copies: a live zero-copy numpy view of a buffer would make XLA refuse its donation.
  return (
    np.array(cache.k_pages, np.float32, copy=True),
    np.array(cache.v_pages, np.float32, copy=True),
  )


def test_init_kv_cache_shapes_and_validation():
  cache = kc.init_kv_cache(
    num_layers=L, num_kv_heads=HKV, num_blocks=N, block_size=BS, head_dim=D, dtype=jnp.bfloat16
  )
  assert cache.k_pages.shape == cache.v_pages.shape == (L, HKV, N, BS, D)
  assert cache.dtype == jnp.bfloat16 and cache.block_size == BS and cache.num_blocks == N
  assert not np.any(np.asarray(cache.k_pages, np.float32))
  with pytest.raises(ValueError, match="num_blocks"):
    kc.init_kv_cache(num_layers=L, num_kv_heads=HKV, num_blocks=0, block_size=BS, head_dim=D)
  with pytest.raises(ValueError, match="int16"):
    kc.init_kv_cache(
      num_layers=L, num_kv_heads=HKV, num_blocks=N, block_size=BS, head_dim=D, dtype=jnp.int16
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_matches_numpy_and_skips_padding(dtype):
  cache, k_np, v_np = _random_cache(1, dtype)
  rng = np.random.default_rng(2)
  slots = np.array([5, -1, 17, 30, -7, 0], np.int32)
  k_new = rng.standard_normal((6, HKV, D)).astype(np.float32)
  v_new = rng.standard_normal((6, HKV, D)).astype(np.float32)
  old = cache.k_pages
  cache = kc.write_kv(cache, 1, jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype), slots)
  assert old.is_deleted()  # donated: updated in place
  want_k, want_v = k_np.copy(), v_np.copy()
  for t, s in enumerate(slots):
    if s >= 0:  # padding slots (< 0) are never written, in particular not slot N*BS-1
      want_k[1, :, s // BS, s % BS] = np.asarray(jnp.asarray(k_new[t], dtype), np.float32)
      want_v[1, :, s // BS, s % BS] = np.asarray(jnp.asarray(v_new[t], dtype), np.float32)
  got_k, got_v = _np(cache)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("dtype, bits", [(jnp.float32, False), (jnp.bfloat16, False),
                                         (jnp.bfloat16, True)])
def test_row_view_write_equals_the_5d_write(dtype, bits):
  """write_kv_rows (the xla step's write, on the row view, optionally on uint16 bit
  storage) writes exactly what write_kv_layer writes on the 5-D pages."""
  cache, _, _ = _random_cache(3, dtype)
  rng = np.random.default_rng(4)
  slots = jnp.asarray([5, -1, 17, 30, -7, 0], jnp.int32)
  k_new = jnp.asarray(rng.standard_normal((6, HKV, D)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((6, HKV, D)), jnp.float32)
  want_k, want_v, _, _ = jax.jit(kc.write_kv_layer)(cache.k_pages, cache.v_pages, 1, k_new, v_new,
                                                    slots)
  k, v = cache.k_pages, cache.v_pages
  if bits:
    k, v = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k, v))
  geometry = kc.PoolGeometry.of(k)

  @jax.jit
  def rows_write(k, v):
    kr, vr, _, _ = kc.write_kv_rows(kc.to_rows(k), kc.to_rows(v), 1, k_new, v_new, slots,
                                    geometry)
    return kc.from_rows(kr, geometry), kc.from_rows(vr, geometry)

  got_k, got_v = (kc.from_storage(x) for x in rows_write(k, v))
  assert got_k.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
  np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))


def test_bit_storage_cache_reports_its_logical_dtype():
  cache = kc.init_kv_cache(num_layers=L, num_kv_heads=HKV, num_blocks=N, block_size=BS,
                           head_dim=D, dtype=jnp.bfloat16, bit_storage=True)
  assert cache.k_pages.dtype == jnp.uint16 and cache.dtype == jnp.bfloat16
  f32 = kc.init_kv_cache(num_layers=L, num_kv_heads=HKV, num_blocks=N, block_size=BS,
                         head_dim=D, bit_storage=True)
  assert f32.k_pages.dtype == jnp.float32
  x = jnp.asarray([1.5, -2.25, 3e38], jnp.float32)
  stored = kc.to_storage(x, jnp.uint16)
  assert stored.dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(kc.from_storage(stored), np.float32),
                                np.asarray(x.astype(jnp.bfloat16), np.float32))


def test_write_kv_rejects_bad_shapes():
  cache, _, _ = _random_cache()
  with pytest.raises(ValueError, match="k, v must be"):
    kc.write_kv(cache, 0, jnp.ones((2, HKV + 1, D)), jnp.ones((2, HKV + 1, D)), [0, 1])
  with pytest.raises(ValueError, match="layer 5"):
    kc.write_kv(cache, 5, jnp.ones((2, HKV, D)), jnp.ones((2, HKV, D)), [0, 1])


def test_copy_blocks_all_layers_with_padding_and_donation():
  cache, k_np, v_np = _random_cache(4)
  old = cache.v_pages
  src, dst = [3, -1, 6, 2], [1, 4, -1, 7]  # entries with a negative side are padding
  cache = kc.copy_blocks(cache, src, dst)
  assert old.is_deleted()
  want_k, want_v = k_np.copy(), v_np.copy()
  for s, d in [(3, 1), (2, 7)]:
    want_k[:, :, d], want_v[:, :, d] = k_np[:, :, s], v_np[:, :, s]
  got_k, got_v = _np(cache)
  np.testing.assert_array_equal(got_k, want_k)
  np.testing.assert_array_equal(got_v, want_v)


def test_copy_blocks_reads_before_writes():
  cache, k_np, _ = _random_cache(5)
  cache = kc.copy_blocks(cache, [0, 1], [1, 2])  # block 2 gets the *old* block 1
  got_k, _ = _np(cache)
  np.testing.assert_array_equal(got_k[:, :, 1], k_np[:, :, 0])
  np.testing.assert_array_equal(got_k[:, :, 2], k_np[:, :, 1])


def test_copy_blocks_validates():
  cache, _, _ = _random_cache()
  with pytest.raises(ValueError, match="same length"):
    kc.copy_blocks(cache, [1, 2], [3])
  with pytest.raises(ValueError, match=r"\[8\]"):
    kc.copy_blocks(cache, [8], [3])


def test_copy_blocks_bucketing_bounds_compiles():
  cache, _, _ = _random_cache(6)
  before = kc.trace_counts().get("copy_blocks", 0)
  for n in range(1, 9):  # 8 different op counts -> buckets 1, 2, 4, 8
    ids = list(range(n))
    cache = kc.copy_blocks(cache, ids[::-1], ids)
  assert kc.trace_counts()["copy_blocks"] - before <= 4


@pytest.mark.parametrize("memory_kind", ["pinned_host", "numpy"])
def test_swap_out_then_in_round_trips_exactly(memory_kind):
  cache, k_np, v_np = _random_cache(7, jnp.bfloat16)
  pool = kc.init_host_pool(cache, 5, memory_kind=memory_kind)
  assert pool.memory_kind == memory_kind
  if memory_kind == "pinned_host":
    assert pool.k_blocks.sharding.memory_kind == "pinned_host"
  pool = kc.swap_out_blocks(cache, pool, [6, 2, -1], [0, 4, 1])
  host_k = np.array(pool.k_blocks, np.float32, copy=True)
  np.testing.assert_array_equal(host_k[:, :, [0, 4]], k_np[:, :, [6, 2]])
  assert not np.any(host_k[:, :, [1, 2, 3]])  # padding entry wrote nothing
  # Blocks 6 and 2 are reused on device, then the swapped data comes back elsewhere.
  cache = kc.copy_blocks(cache, [0, 0], [6, 2])
  old = cache.k_pages
  cache = kc.swap_in_blocks(cache, pool, [4, 0, -1], [3, 5, 1])
  assert old.is_deleted()
  got_k, got_v = _np(cache)
  np.testing.assert_array_equal(got_k[:, :, [5, 3]], k_np[:, :, [6, 2]])
  np.testing.assert_array_equal(got_v[:, :, [5, 3]], v_np[:, :, [6, 2]])
  np.testing.assert_array_equal(got_k[:, :, 1], k_np[:, :, 1])  # padding: untouched


def test_pinned_host_pool_is_donated():
  cache, _, _ = _random_cache(8)
  pool = kc.init_host_pool(cache, 4)
  assert pool.memory_kind == "pinned_host"  # the CPU backend offers pinned_host
  old = pool.v_blocks
  kc.swap_out_blocks(cache, pool, [1], [2])
  assert old.is_deleted()


def test_swap_validates_ids():
  cache, _, _ = _random_cache()
  pool = kc.init_host_pool(cache, 2)
  with pytest.raises(ValueError, match="host_ids"):
    kc.swap_out_blocks(cache, pool, [1], [2])
  with pytest.raises(ValueError, match="num_host_blocks"):
    kc.init_host_pool(cache, 0)
