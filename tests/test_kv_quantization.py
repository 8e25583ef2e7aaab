"""Quantized KV cache (issue 15): int8 / fp8 pages with per-token scales, quantized swap.

The layers, bottom up: `quantize_kv` itself; writes (row view == 5-D pages), copies and
swaps carry the scales; the xla attention path on quantized pages equals attention on
the dequantized pages within 1e-5 and never lets NaN of unused pages or scales leak;
the engine's quantized pools are exact where they must be (swap == recompute, chunked ==
whole prefill, prefix caching on == off, async == sync swap, all for the same KV dtype),
and memory is accounted per block. How far quantized outputs drift from float32 is
measured, not asserted: bench/kv_quantization.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.runner import attention
from pagedjax.runner import kv_cache as kvc

QDTYPES = [jnp.int8, jnp.float8_e4m3fn]
IDS = {jnp.int8: "int8", jnp.float8_e4m3fn: "fp8"}


def _storage(dtype):
  return kvc._BIT_STORAGE.get(jnp.dtype(dtype), jnp.dtype(dtype))


@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_quantize_round_trip_error_is_bounded(dtype):
  x = jax.random.normal(jax.random.key(0), (64, 4, 32)) * jnp.logspace(-3, 2, 64)[:, None, None]
  values, scales = kvc.quantize_kv(x, dtype)
  assert values.dtype == dtype and scales.shape == (64, 4) and scales.dtype == jnp.float32
  err = jnp.abs(kvc.dequantize_kv(values, scales) - x)
  amax = jnp.abs(x).max(-1, keepdims=True)
  # int8: half a step of amax / 127; e4m3: 3 mantissa bits, half an ulp = 1/16 relative,
  # plus the subnormal floor 2^-10 of amax / 448.
  bound = amax / 254 if dtype == jnp.int8 else jnp.abs(x) / 16 + amax / 448 * 2.0**-10
  assert bool(jnp.all(err <= bound * 1.0001 + 1e-12))
  assert bool(jnp.all(jnp.isfinite(values.astype(jnp.float32))))


@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_zero_vectors_get_unit_scale_and_zeros(dtype):
  values, scales = kvc.quantize_kv(jnp.zeros((3, 8)), dtype)
  np.testing.assert_array_equal(np.asarray(scales), 1.0)
  np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)), 0.0)


@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_row_view_write_equals_5d_write_values_and_scales(dtype):
  cache = kvc.init_kv_cache(num_layers=2, num_kv_heads=2, num_blocks=6, block_size=4,
                            head_dim=8, dtype=dtype, bit_storage=True)
  assert cache.quantized and cache.k_scales.shape == (2, 2, 6, 4)
  k = jax.random.normal(jax.random.key(1), (5, 2, 8))
  v = jax.random.normal(jax.random.key(2), (5, 2, 8))
  slots = jnp.array([3, 9, -1, 20, 4], jnp.int32)
  want = kvc.write_kv_layer(cache.k_pages, cache.v_pages, 1, k, v, slots, cache.k_scales,
                            cache.v_scales)
  g = kvc.PoolGeometry.of(cache.k_pages)
  got = kvc.write_kv_rows(kvc.to_rows(cache.k_pages), kvc.to_rows(cache.v_pages), 1, k, v, slots,
                          g, kvc.scale_rows(cache.k_scales), kvc.scale_rows(cache.v_scales))
  got = (kvc.from_rows(got[0], g), kvc.from_rows(got[1], g), kvc.from_scale_rows(got[2], g),
         kvc.from_scale_rows(got[3], g))
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # what was written dequantizes to the inputs (within the rounding), at its slot
  kv_ = kvc.from_storage(want[0])[1, :, 2, 1]  # slot 9 = block 2, offset 1
  np.testing.assert_allclose(np.asarray(kvc.dequantize_kv(kv_, want[2][1, :, 2, 1])),
                             np.asarray(k[1]), atol=float(jnp.abs(k[1]).max()) / 10)
  assert float(jnp.abs(want[2][:, :, :, :]).sum()) > 0 and float(want[2][0].sum()) == 0.0


def test_float_pool_refuses_scales_and_quantized_pool_needs_them():
  cache = kvc.init_kv_cache(num_layers=1, num_kv_heads=1, num_blocks=2, block_size=4, head_dim=8,
                            dtype=jnp.int8)
  k = jnp.ones((1, 1, 8))
  with pytest.raises(ValueError, match="needs its scales"):
    kvc.write_kv_layer(cache.k_pages, cache.v_pages, 0, k, k, jnp.array([0], jnp.int32))


def _paged(dtype, key=0, hkv=2, n=24, bs=8, d=32):
  k = jax.random.normal(jax.random.key(key), (hkv, n, bs, d))
  v = jax.random.normal(jax.random.key(key + 1), (hkv, n, bs, d))
  (kq, ks), (vq, vs) = kvc.quantize_kv(k, dtype), kvc.quantize_kv(v, dtype)
  st = _storage(dtype)
  return (kvc.to_storage(kq, st), ks, kvc.to_storage(vq, st), vs,
          kvc.dequantize_kv(kq, ks), kvc.dequantize_kv(vq, vs))


@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_xla_decode_and_prefill_on_quantized_pages_equal_dequantized(dtype):
  kq, ks, vq, vs, kd, vd = _paged(dtype)
  rng = np.random.RandomState(0)
  tables = jnp.asarray(rng.permutation(24)[:12].reshape(3, 4), jnp.int32)
  q = jax.random.normal(jax.random.key(5), (3, 4, 32))
  lengths = jnp.array([1, 8, 29], jnp.int32)  # one token, a page boundary, mid-page
  want = attention.paged_decode_attention(q, kd, vd, tables, lengths, sm_scale=32**-0.5)
  for impl in ("xla", "cpu"):  # the native kernel decodes the stored codes itself
    got = attention.paged_decode_attention(q, kq, vq, tables, lengths, sm_scale=32**-0.5,
                                           k_scales=ks, v_scales=vs, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  qp = jax.random.normal(jax.random.key(6), (3, 5, 4, 32))
  ctx, qlen = jnp.array([0, 7, 20], jnp.int32), jnp.array([5, 1, 4], jnp.int32)
  got = attention.paged_prefill_attention(qp, kq, vq, tables, ctx, qlen, sm_scale=32**-0.5,
                                          k_scales=ks, v_scales=vs)
  want = attention.paged_prefill_attention(qp, kd, vd, tables, ctx, qlen, sm_scale=32**-0.5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_nan_in_unused_pages_and_scales_never_leaks():
  kq, ks, vq, vs, _, _ = _paged(jnp.int8)
  tables = jnp.array([[0, 1, 2, 3]], jnp.int32)
  q = jnp.ones((1, 4, 32))
  length = jnp.array([11], jnp.int32)  # page 1 holds positions 8..10, the rest unused
  poison = lambda x: x.at[:, 1, 3:].set(jnp.nan).at[:, 2:].set(jnp.nan)  # noqa: E731
  for impl in ("xla", "cpu"):
    clean = attention.paged_decode_attention(q, kq, vq, tables, length, sm_scale=0.2,
                                             k_scales=ks, v_scales=vs, impl=impl)
    got = attention.paged_decode_attention(q, kq, vq, tables, length, sm_scale=0.2,
                                           k_scales=poison(ks), v_scales=poison(vs), impl=impl)
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(clean))


def test_rectangular_entries_check_scales():
  kq, ks, vq, vs, kd, vd = _paged(jnp.int8)
  args = (jnp.ones((1, 4, 32)), kq, vq, jnp.zeros((1, 4), jnp.int32), jnp.array([3], jnp.int32))
  with pytest.raises(ValueError, match="required exactly for int8"):
    attention.paged_decode_attention(*args, sm_scale=0.1)
  with pytest.raises(ValueError, match="k_scales must be float32"):
    attention.paged_decode_attention(*args, sm_scale=0.1, k_scales=ks[..., :4], v_scales=vs)
  with pytest.raises(ValueError, match="required exactly"):
    attention.paged_decode_attention(args[0], kd, vd, *args[3:], sm_scale=0.1, k_scales=ks,
                                     v_scales=vs)


def _filled(dtype, bit_storage=True):
  cache = kvc.init_kv_cache(num_layers=2, num_kv_heads=2, num_blocks=8, block_size=4, head_dim=8,
                            dtype=dtype, bit_storage=bit_storage)
  k = jax.random.normal(jax.random.key(3), (32, 2, 8))
  slots = jnp.arange(32, dtype=jnp.int32)
  for layer in range(2):
    cache = kvc.write_kv(cache, layer, k * (layer + 1), -k, slots)
  return cache


@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_copy_blocks_copies_scales(dtype):
  cache = _filled(dtype)
  before = jax.tree.map(np.asarray, cache)
  cache = kvc.copy_blocks(cache, [1, 2], [5, 6])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(b)[:, :, [5, 6]], a[:, :, [1, 2]])


@pytest.mark.parametrize("memory_kind", ["pinned_host", "numpy"])
@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_swap_of_a_quantized_pool_moves_values_and_scales_exactly(dtype, memory_kind):
  cache = _filled(dtype)
  before = jax.tree.map(np.asarray, cache)
  pool = kvc.init_host_pool(cache, 4, memory_kind=memory_kind)
  assert pool.quantized and pool.k_blocks.dtype == cache.k_pages.dtype
  pool = kvc.swap_out_blocks(cache, pool, [1, 3], [2, 0])
  cache = kvc.swap_in_blocks(cache, pool, [2, 0], [6, 7])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(b)[:, :, [6, 7]], a[:, :, [1, 3]])


@pytest.mark.parametrize("memory_kind", ["pinned_host", "numpy"])
def test_fp8_pool_without_bit_storage_swaps_exactly_with_its_dtype_named(memory_kind):
  cache = _filled(jnp.float8_e4m3fn, bit_storage=False)  # the Pallas impls' storage
  assert cache.k_pages.dtype == jnp.float8_e4m3fn
  before = jax.tree.map(np.asarray, cache)
  pool = kvc.init_host_pool(cache, 4, memory_kind=memory_kind, dtype=jnp.float8_e4m3fn)
  assert pool.k_blocks.dtype == jnp.float8_e4m3fn
  pool = kvc.swap_out_blocks(cache, pool, [1, 3], [2, 0])
  cache = kvc.swap_in_blocks(cache, pool, [2, 0], [6, 7])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(np.asarray(b, np.float32)[:, :, [6, 7]],
                                  np.asarray(a, np.float32)[:, :, [1, 3]])


def test_tiny_vectors_quantize_to_finite_values():
  x = jnp.full((2, 8), 1e-44)  # amax / qmax would be subnormal
  for dtype in QDTYPES:
    values, scales = kvc.quantize_kv(x, dtype)
    back = kvc.dequantize_kv(values, scales)
    assert bool(jnp.all(jnp.isfinite(back))) and float(jnp.abs(back - x).max()) < 1e-37


@pytest.mark.parametrize("memory_kind", ["pinned_host", "numpy"])
@pytest.mark.parametrize("dtype", QDTYPES, ids=IDS.get)
def test_quantized_swap_of_a_float_pool_rounds_like_quantize_kv(dtype, memory_kind):
  cache = _filled(jnp.float32)
  k_before = np.asarray(cache.k_pages)
  pool = kvc.init_host_pool(cache, 4, memory_kind=memory_kind, dtype=dtype)
  assert pool.quantized and pool.bytes_per_block == kvc.block_bytes(2, 2, 4, 8, dtype) == 384
  pool = kvc.swap_out_blocks(cache, pool, [1, 3], [2, 0])
  cache = kvc.swap_in_blocks(cache, pool, [2, 0], [6, 7])
  want = kvc.dequantize_kv(*kvc.quantize_kv(k_before[:, :, [1, 3]], dtype))
  np.testing.assert_array_equal(np.asarray(cache.k_pages)[:, :, [6, 7]], np.asarray(want))
  np.testing.assert_array_equal(np.asarray(cache.k_pages)[:, :, :6], k_before[:, :, :6])
  with pytest.raises(ValueError, match="swaps as"):
    kvc.init_host_pool(_filled(jnp.int8), 4, dtype=jnp.float8_e4m3fn)


# ------------------------------------------------------------------------------ engine
PROMPTS = ["The Python ", "def f(x):\n    return ", "import os\nimport ", "class A:\n    "]
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7, n=2)
# Engine runs compile their own step programs per KV dtype: int8 by default, fp8 too with
# PAGEDJAX_LONG_TESTS=1 (the kernels and the attention tests above cover both always).
ENGINE_DTYPES = ["int8", "fp8"] if os.environ.get("PAGEDJAX_LONG_TESTS") == "1" else ["int8"]


def _run(params=(GREEDY, SEEDED), **kw):
  llm = LLM(**{"num_blocks": 12, "max_num_seqs": 4, **kw})
  outs = []
  for p in params:
    outs += [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, p)]
  return outs, llm.memory_stats()


@pytest.fixture(scope="module", params=ENGINE_DTYPES)
def recompute_run(request):
  # 12 blocks of 16 for 4 sequences of ~60 tokens (4 blocks each): preemption happens.
  return request.param, _run(kv_cache_dtype=request.param, preemption_mode="recompute")


def test_quantized_swap_equals_recompute_and_sync_swap(recompute_run):
  kv_dtype, (want, st) = recompute_run
  assert st["num_preemptions_recompute"] > 0
  got, st_swap = _run(kv_cache_dtype=kv_dtype, preemption_mode="swap")
  assert st_swap["num_preemptions_swap"] > 0 and st_swap["swap_out_bytes"] > 0
  assert got == want
  sync, st_sync = _run(kv_cache_dtype=kv_dtype, preemption_mode="swap", async_swap=False)
  assert sync == want and st_sync["swap_out_bytes"] == st_swap["swap_out_bytes"]


def test_quantized_pool_chunked_prefill_and_prefix_cache_change_no_token(recompute_run):
  kv_dtype, (want, _) = recompute_run
  # A per-token scale depends on that token only: chunk boundaries, and blocks cached by
  # an earlier request (the recompute run had prefix caching on), store the same values.
  got, st = _run(params=(GREEDY,), kv_cache_dtype=kv_dtype, max_num_batched_tokens=16,
                 enable_prefix_caching=False)
  assert st["num_prefill_steps"] > len(PROMPTS) and got == want[:len(PROMPTS)]


@pytest.mark.parametrize("kv_dtype", ENGINE_DTYPES)
def test_pallas_interpret_on_quantized_pages_equals_xla(kv_dtype):
  params = SamplingParams(max_tokens=4, temperature=0.0)
  outs = {}
  for impl in ("xla", "cpu", "pallas_interpret"):
    llm = LLM(num_blocks=16, max_num_seqs=2, attention_impl=impl, kv_cache_dtype=kv_dtype)
    outs[impl] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)]
  assert outs["pallas_interpret"] == outs["xla"] == outs["cpu"]


def test_memory_is_accounted_per_block_with_scales():
  cfg_bytes = {}
  for kv_dtype in ("auto", "bfloat16", "int8", "fp8"):
    llm = LLM(kv_cache_memory_mb=1.0, kv_cache_dtype=kv_dtype, num_host_blocks=0)
    st = llm.memory_stats()
    cfg_bytes[kv_dtype] = st["bytes_per_block"], st["num_blocks"], st["kv_cache_dtype"]
    assert st["bytes_per_block"] == llm.runner.kv.nbytes // llm.runner.kv.num_blocks
  # bundled model: 4 layers x 4 kv heads x 16 tokens x (32 values (+ a float32 scale)) x K, V
  assert cfg_bytes["auto"][:2] == (65536, 16) and cfg_bytes["auto"][2] == "float32"
  assert cfg_bytes["bfloat16"][:2] == (32768, 32)
  assert cfg_bytes["int8"] == (18432, 56, "int8") and cfg_bytes["fp8"][2] == "float8_e4m3fn"


def test_quantized_swap_of_a_float_pool_is_stated():
  llm = LLM(num_blocks=12, max_num_seqs=4, preemption_mode="swap", swap_dtype="int8")
  llm.generate(PROMPTS, GREEDY)
  st = llm.memory_stats()
  assert st["kv_cache_dtype"] == "float32" and st["swap_dtype"] == "int8"
  assert st["num_preemptions_swap"] > 0
  assert st["host_bytes_per_block"] == 18432 and st["bytes_per_block"] == 65536
  assert st["swap_out_bytes"] == st["num_blocks_swapped_out"] * 18432


@pytest.mark.parametrize("kw, match", [
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
    (dict(swap_dtype="bfloat16"), "swap_dtype"),
    (dict(kv_cache_dtype="int8", swap_dtype="fp8"), "swap_dtype"),
])
def test_bad_kv_dtype_options_raise_value_error(kw, match):
  with pytest.raises(ValueError, match=match):
    LLM(num_blocks=4, **kw)


@pytest.mark.parametrize("kw", [dict(kv_cache_dtype="bfloat16"),
                                dict(kv_cache_dtype="float32", dtype="bfloat16")])
def test_pallas_refuses_float_pages_of_another_dtype(kw):
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    LLM(num_blocks=4, attention_impl="pallas_interpret", **kw)


def test_a_failed_synchronous_swap_counts_as_lost_state(monkeypatch):
  llm = LLM(num_blocks=12, max_num_seqs=4, preemption_mode="swap", async_swap=False)
  runner = llm.runner
  real = jax.block_until_ready

  def fail(tree):
    if tree is runner.host_pool:
      raise RuntimeError("injected: the copy failed")
    return real(tree)

  monkeypatch.setattr(jax, "block_until_ready", fail)
  outs = llm.generate(PROMPTS, GREEDY)
  monkeypatch.undo()
  assert any(o.outputs[0].finish_reason == "error" for o in outs)
  assert llm.memory_stats()["num_failed_steps"] > 0
  again = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))
  assert again[0].outputs[0].finish_reason == "length"  # the engine serves on
  st = llm.memory_stats()
  assert st["num_free_blocks"] == st["num_blocks"]


def test_async_swap_must_be_a_bool():
  with pytest.raises(TypeError, match="async_swap"):
    LLM(num_blocks=4, async_swap=1)
