"""attention_impl="cpu": the native XLA:CPU kernel (pagedjax/runner/cpu_attention.cc).

The kernel is compared with the dense reference on fresh random shapes and contents
(hypothesis: batch, heads, head_dim, block size, decode lengths with 0 / 1 / page
boundaries, prefill tiles of 1 / 3 / 16 queries after random cached contexts, NaN in
every unused slot, junk table entries), and the engine's "auto" choice and the
no-compiler path are checked. Rectangular and ragged cases with the xla path live in
test_attention.py, quantized pools in test_kv_quantization.py, engine runs everywhere
(`LLM()` on CPU uses it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedjax import LLM
from pagedjax.entrypoints.llm import resolve_attention_impl
from pagedjax.runner import attention, cpu_attention, kv_cache
from test_attention import _assert_close, _paged_case


@st.composite
def _cases(draw):
  hkv = draw(st.sampled_from([1, 2, 4]))
  g = draw(st.sampled_from([1, 2, 4, 8]))
  d = draw(st.sampled_from([16, 32, 64, 40]))  # 40: no compiled-in head_dim
  bs = draw(st.sampled_from([8, 16]))  # 8: the generic block size
  pages = draw(st.integers(1, 5))
  edge = st.sampled_from([0, 1, bs - 1, bs, bs + 1, pages * bs])
  lengths = draw(st.lists(st.one_of(edge, st.integers(0, pages * bs)), min_size=1, max_size=9))
  lengths = [min(x, pages * bs) for x in lengths]
  return hkv, g, d, bs, pages, lengths, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_cpu_decode_matches_dense_reference_on_random_cases(case):
  hkv, g, d, bs, pages, lengths, seed = case
  kp, vp, tables, k, v = _paged_case(seed, lengths, bs=bs, pages_per_seq=pages, hkv=hkv, d=d,
                                     dtype=jnp.float32, share=len(lengths) > 1)
  q = jnp.asarray(np.random.default_rng(seed).standard_normal((len(lengths), hkv * g, d)),
                  jnp.float32)
  lens = jnp.asarray(lengths, jnp.int32)
  got = attention.paged_decode_attention(q, kp, vp, tables, lens, sm_scale=d**-0.5, impl="cpu")
  want = attention.decode_attention_reference(q, k, v, lens, sm_scale=d**-0.5)
  _assert_close(got, want, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got)[np.asarray(lengths) == 0], 0.0)


@st.composite
def _prefill_cases(draw):
  hkv, g, d, bs, pages, _, seed = draw(_cases())
  b = draw(st.integers(1, 4))
  t = draw(st.sampled_from([1, 3, 16]))
  qlen = [draw(st.integers(0, min(t, pages * bs))) for _ in range(b)]  # fits the table
  ctx = [draw(st.integers(0, pages * bs - q)) for q in qlen]
  return hkv, g, d, bs, pages, t, ctx, qlen, seed


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_prefill_cases())
def test_cpu_prefill_matches_dense_reference_on_random_cases(case):
  """Tiles of T queries, causal within the tile, after 0 .. P * bs - T cached tokens;
  padded query rows return zeros."""
  hkv, g, d, bs, pages, t, ctx, qlen, seed = case
  total = np.add(ctx, qlen)
  kp, vp, tables, k, v = _paged_case(seed, total, bs=bs, pages_per_seq=pages, hkv=hkv, d=d,
                                     dtype=jnp.float32, share=len(total) > 1)
  q = jnp.asarray(np.random.default_rng(seed).standard_normal((len(total), t, hkv * g, d)),
                  jnp.float32)
  ctx, qlen = jnp.asarray(ctx, jnp.int32), jnp.asarray(qlen, jnp.int32)
  got = attention.paged_prefill_attention(q, kp, vp, tables, ctx, qlen, sm_scale=0.3,
                                          impl="cpu")
  want = attention.prefill_attention_reference(q, k, v, ctx, qlen, sm_scale=0.3)
  _assert_close(got, want, jnp.float32)
  pad = np.arange(t)[None] >= np.asarray(qlen)[:, None]
  np.testing.assert_array_equal(np.asarray(got)[pad], 0.0)


def test_traced_layer_and_a_jitted_caller():
  """The layer may be traced; the kernel reads exactly that layer (others are NaN)."""
  lengths = [17, 3, 32]
  kp, vp, tables, k, v = _paged_case(3, lengths, bs=16, pages_per_seq=2, hkv=2, d=32,
                                     dtype=jnp.float32)
  nan = jnp.full_like(kp, jnp.nan)
  q = jnp.asarray(np.random.default_rng(4).standard_normal((3, 8, 32)), jnp.float32)
  lens = jnp.asarray(lengths, jnp.int32)
  f = jax.jit(lambda q, kp, vp, layer: attention.paged_decode_attention(
    q, kp, vp, tables, lens, sm_scale=0.2, impl="cpu", layer=layer))
  for layer in (0, 2):
    pools = [nan, nan, nan]
    pools[layer] = kp
    vpools = [nan, nan, nan]
    vpools[layer] = vp
    got = f(q, jnp.stack(pools), jnp.stack(vpools), jnp.int32(layer))
    _assert_close(got, attention.decode_attention_reference(q, k, v, lens, sm_scale=0.2),
                  jnp.float32)


def test_auto_picks_the_native_kernel_on_cpu():
  assert jax.default_backend() == "cpu" and cpu_attention.available()
  assert resolve_attention_impl("auto") == "cpu"
  assert LLM(num_blocks=8).attention_impl == "cpu"


def test_without_a_compiler_auto_falls_back_and_cpu_says_why(monkeypatch, tmp_path):
  monkeypatch.setenv("PAGEDJAX_CACHE_DIR", str(tmp_path))  # nothing built there yet
  monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
  for fn in (cpu_attention.library_path, cpu_attention.available):
    fn.cache_clear()
  try:
    with pytest.raises(cpu_attention.BuildError, match="C\\+\\+20 compiler"):
      cpu_attention.library_path()
    assert not cpu_attention.available()
    assert resolve_attention_impl("auto") == "xla"
    with pytest.raises(cpu_attention.BuildError):
      resolve_attention_impl("cpu")
  finally:
    monkeypatch.undo()
    for fn in (cpu_attention.library_path, cpu_attention.available):
      fn.cache_clear()
  assert cpu_attention.available()


def test_pools_the_kernel_cannot_read_are_refused():
  q = jnp.zeros((1, 1, 2, 16))
  geometry = kv_cache.PoolGeometry(num_layers=1, num_kv_heads=1, num_blocks=8, block_size=8,
                                   head_dim=16)
  tables, pos = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
  rows = jnp.zeros((8, 8 * 16), jnp.int32)
  with pytest.raises(ValueError, match="int32"):
    cpu_attention.tile_attention_rows(q, rows, rows, tables, pos, 0, sm_scale=0.1,
                                      geometry=geometry)
  codes = jnp.zeros((8, 8 * 16), jnp.int8)
  with pytest.raises(ValueError, match="scales"):
    cpu_attention.tile_attention_rows(q, codes, codes, tables, pos, 0, sm_scale=0.1,
                                      geometry=geometry)
