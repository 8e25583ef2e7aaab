"""Tests of the Pallas paged-attention decode kernel.

On CPU the kernel runs in Pallas interpret mode, so every case compiles an interpreter
program (~2-4 s): the grid below is a chosen list that covers each page size, head_dim,
GQA ratio, dtype and split count rather than their full cross. The CUDA lowering,
which is cheap, is checked over the full cross. Quantized (int8 / float8_e4m3fn) pages
have their own section at the end.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.runner.kv_cache import dequantize_kv
from quantized_pages import QUANT_DTYPES, QUANT_ERROR, quantize_case, quantized_shapes
from pallas_kernels import paged_attention as pa

# Run the compiled kernel where a GPU is present, the interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_case(seed, *, page_size, head_dim, ratio, num_kv_heads, dtype, pages_per_seq):
  """A batch of 5 ragged sequences over a shuffled page pool.

  Lengths are 0, 1, page_size + 3, full and 2 * page_size + 5; the last sequence
  shares its first two (full) pages with the fourth, as after a fork. Table entries
  past a sequence's last page are padding (-1 or a huge id), and every page slot that
  no sequence reads holds NaN.

  Returns:
    (q, k_pages, v_pages, block_tables, lengths, k_clean, v_clean): the poisoned
    inputs, and the pages with NaN replaced by 0 for the reference.
  """
  rng = np.random.default_rng(seed)
  lengths = np.array(
      [0, 1, page_size + 3, pages_per_seq * page_size, 2 * page_size + 5], np.int32)
  batch = len(lengths)
  num_pages = batch * pages_per_seq + 3
  block_tables = rng.permutation(num_pages)[:batch * pages_per_seq].reshape(
      batch, pages_per_seq).astype(np.int32)
  block_tables[4, :2] = block_tables[3, :2]
  used = np.zeros((num_pages, page_size), bool)
  for b, length in enumerate(lengths):
    pages_used = -(-length // page_size)
    block_tables[b, pages_used:] = -1 if b % 2 else np.iinfo(np.int32).max
    positions = np.arange(length)
    used[block_tables[b, positions // page_size], positions % page_size] = True

  num_heads = ratio * num_kv_heads
  q = rng.standard_normal((batch, num_heads, head_dim))
  pages_shape = (num_kv_heads, num_pages, page_size, head_dim)
  k_clean, v_clean = rng.standard_normal(pages_shape), rng.standard_normal(pages_shape)
  k, v = k_clean.copy(), v_clean.copy()
  k[:, ~used], v[:, ~used] = np.nan, np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(block_tables),
          jnp.asarray(lengths), cast(k_clean), cast(v_clean))


# page_size, head_dim, gqa ratio, num_kv_heads, dtype, k_splits,
# pages_per_compute_block, pages_per_seq, sm_scale
CASES = [
    # MHA; the default 8 pages per block exceed the table: one padded block.
    (8, 64, 1, 2, jnp.float32, 1, None, 4, None),
    (8, 128, 4, 1, jnp.bfloat16, 2, 2, 5, None),
    # 3 splits over 5 pages in blocks of 2: uneven, last split mostly padding.
    (8, 64, 8, 1, jnp.float32, 3, 2, 5, 0.3),
    # One page per block: many loop steps, two GQA groups.
    (16, 64, 4, 2, jnp.float32, 1, 1, 4, None),
    (16, 128, 8, 1, jnp.bfloat16, 1, None, 3, None),
    (16, 64, 1, 1, jnp.bfloat16, 2, 1, 4, 0.3),
    (32, 128, 1, 1, jnp.float32, 1, None, 3, None),
    (32, 64, 4, 1, jnp.bfloat16, 1, 1, 4, None),
    # More splits than pages: whole splits are empty.
    (32, 64, 8, 2, jnp.float32, 5, 1, 4, None),
]


def _assert_matches(out, expected, q, dtype):
  """The kernel's output: q's shape and dtype, finite, zeros for length 0 (row 0), and
  the reference's values within the dtype's tolerance."""
  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.isfinite(np.asarray(out, np.float32)).all(), "NaN of an unused slot leaked"
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # length 0
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(expected, np.float32),
                             atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize(
    "page_size,head_dim,ratio,num_kv_heads,dtype,k_splits,ppcb,pages_per_seq,sm_scale",
    CASES,
    ids=[f"bs{c[0]}-d{c[1]}-gqa{c[2]}x{c[3]}-{jnp.dtype(c[4]).name}-split{c[5]}"
         f"-ppcb{c[6]}" for c in CASES],
)
def test_kernel_matches_reference(page_size, head_dim, ratio, num_kv_heads, dtype,
                                  k_splits, ppcb, pages_per_seq, sm_scale):
  q, k, v, block_tables, lengths, k_clean, v_clean = make_case(
      0, page_size=page_size, head_dim=head_dim, ratio=ratio,
      num_kv_heads=num_kv_heads, dtype=dtype, pages_per_seq=pages_per_seq)
  out = pa.paged_attention(q, k, v, block_tables, lengths, sm_scale=sm_scale,
                           pages_per_compute_block=ppcb, k_splits=k_splits,
                           interpret=INTERPRET)
  expected = pa.paged_attention_reference(q, k_clean, v_clean, block_tables, lengths,
                                          sm_scale=sm_scale)
  _assert_matches(out, expected, q, dtype)


def test_reference_matches_dense_attention_per_sequence():
  """The reference (fed NaN-poisoned pages) equals softmax attention per sequence."""
  q, k, v, block_tables, lengths, k_clean, v_clean = make_case(
      1, page_size=4, head_dim=8, ratio=2, num_kv_heads=2, dtype=jnp.float32,
      pages_per_seq=4)
  sm_scale = 0.7
  out = np.asarray(pa.paged_attention_reference(q, k, v, block_tables, lengths,
                                                sm_scale=sm_scale))
  q, k_clean, v_clean = map(np.asarray, (q, k_clean, v_clean))
  page_size = k_clean.shape[2]
  for b, length in enumerate(np.asarray(lengths)):
    positions = np.arange(length)
    pages = np.asarray(block_tables)[b, positions // page_size]
    for h in range(q.shape[1]):
      kv_head = h // 2
      keys = k_clean[kv_head, pages, positions % page_size]  # [length, D]
      values = v_clean[kv_head, pages, positions % page_size]
      if length == 0:
        np.testing.assert_array_equal(out[b, h], 0.0)
        continue
      logits = keys @ q[b, h] * sm_scale
      weights = np.exp(logits - logits.max())
      np.testing.assert_allclose(out[b, h], weights @ values / weights.sum(),
                                 atol=1e-5, rtol=0)


def _shapes(batch=4, num_heads=8, head_dim=64, num_kv_heads=2, num_pages=16,
            page_size=16, pages_per_seq=5, dtype=jnp.float32):
  pages = jax.ShapeDtypeStruct((num_kv_heads, num_pages, page_size, head_dim), dtype)
  return dict(
      q=jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype),
      k_pages=pages,
      v_pages=pages,
      block_tables=jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32),
      lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
  )


def _lower_for_cuda(shapes, **kwargs):
  f = functools.partial(pa.paged_attention, **kwargs)
  return jax.jit(f).trace(*shapes.values()).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_lowers_for_cuda(page_size, head_dim, dtype):
  """The Triton lowering (no GPU needed) accepts every shape of the grid."""
  for ratio in (1, 4, 8):
    for k_splits in (1, 2):
      shapes = _shapes(num_heads=2 * ratio, head_dim=head_dim, page_size=page_size,
                       dtype=dtype)
      hlo = _lower_for_cuda(shapes, k_splits=k_splits).as_text()
      assert "__gpu$xla.gpu.triton" in hlo


def test_triton_lowering_rejects_non_power_of_two_tiles():
  """Without the entry's checks such a shape fails deep in the Triton lowering."""
  q = jax.ShapeDtypeStruct((2, 2, 16, 48), jnp.float32)  # [B, Hkv, Gp, D=48]
  pages = jax.ShapeDtypeStruct((2, 8, 16, 48), jnp.float32)
  f = functools.partial(pa._paged_attention_call, sm_scale=1.0,
                        pages_per_compute_block=1, k_splits=1, num_warps=4,
                        num_stages=2, interpret=False)
  args = (q, pages, pages, jax.ShapeDtypeStruct((2, 4), jnp.int32),
          jax.ShapeDtypeStruct((2,), jnp.int32))
  with pytest.raises(Exception, match="power of 2"):
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("overrides,kwargs,match", [
    (dict(head_dim=48), {}, r"head_dim must be a power of two >= 16 .* got 48"),
    (dict(head_dim=8), {}, r"head_dim must be a power of two >= 16 .* got 8"),
    (dict(page_size=12), {}, r"page_size must be a power of two .* got 12"),
    (dict(page_size=8), dict(pages_per_compute_block=3),
     r"pages_per_compute_block must be a power of two, got 3"),
    (dict(page_size=8), dict(pages_per_compute_block=1), r"8 \* 1 = 8 keys"),
    ({}, dict(k_splits=0), r"k_splits must be >= 1, got 0"),
])
def test_untileable_shapes_raise_value_error(overrides, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _lower_for_cuda(_shapes(**overrides), **kwargs)


def _with(name, shape, dtype=None):
  """_shapes() with one argument replaced."""
  shapes = _shapes()
  shapes[name] = jax.ShapeDtypeStruct(shape, dtype or shapes[name].dtype)
  return shapes


@pytest.mark.parametrize("shapes,match", [
    (_with("q", (4, 64)), r"q must be \[batch, num_heads, head_dim\], got shape"),
    (_with("k_pages", (16, 16, 64)), r"k_pages must be .* got shape \(16, 16, 64\)"),
    (_with("v_pages", (2, 16, 8, 64)),
     r"shapes differ: \(2, 16, 16, 64\) vs \(2, 16, 8, 64\)"),
    (_with("k_pages", (2, 16, 16, 64), jnp.bfloat16),
     r"dtypes differ: float32, bfloat16"),
    (_shapes(dtype=jnp.int32), r"dtype must be float32, bfloat16 or float16"),
    (_with("q", (4, 7, 64)), r"num_heads 7 is not a multiple of num_kv_heads 2"),
    (_with("q", (4, 8, 32)), r"head_dim of q \(32\) and pages \(64\) differ"),
    (_with("block_tables", (3, 5)),
     r"block_tables must be \[batch=4, .* got shape \(3, 5\)"),
    (_with("block_tables", (4, 5), jnp.float32),
     r"block_tables must be int32, got float32"),
    (_with("lengths", (5,)), r"lengths must be int32\[4\], got int32\[5\]"),
    (_shapes(num_pages=0), r"page pool is empty: k_pages shape \(2, 0, 16, 64\)"),
])
def test_inconsistent_inputs_raise_value_error(shapes, match):
  with pytest.raises(ValueError, match=match):
    _lower_for_cuda(shapes)


# Quantized pages: int8 / float8_e4m3fn values with one float32 scale per token
# (helpers in tests/quantized_pages.py).


QUANT_CASES = [
    # page_size, head_dim, ratio, num_kv_heads, pages dtype, q dtype, k_splits, ppcb
    # One page per block: many loop steps, two GQA groups.
    (16, 64, 4, 2, jnp.int8, jnp.float32, 1, 1),
    # 3 splits over 5 pages in blocks of 2: uneven, last split mostly padding.
    (8, 64, 8, 1, jnp.float8_e4m3fn, jnp.float32, 3, 2),
    (8, 128, 2, 2, jnp.int8, jnp.bfloat16, 2, None),
]


@pytest.mark.parametrize(
    "page_size,head_dim,ratio,num_kv_heads,pages_dtype,dtype,k_splits,ppcb",
    QUANT_CASES,
    ids=[f"bs{c[0]}-d{c[1]}-gqa{c[2]}x{c[3]}-{jnp.dtype(c[4]).name}"
         f"-q{jnp.dtype(c[5]).name}-split{c[6]}" for c in QUANT_CASES],
)
def test_quantized_kernel_matches_reference(page_size, head_dim, ratio, num_kv_heads,
                                            pages_dtype, dtype, k_splits, ppcb):
  """Against the reference on the same quantized pages; the NaN scales (and NaN or
  garbage values) of unused slots never leak."""
  q, k, v, block_tables, lengths, k_clean, v_clean = make_case(
      0, page_size=page_size, head_dim=head_dim, ratio=ratio,
      num_kv_heads=num_kv_heads, dtype=jnp.float32, pages_per_seq=5)
  q = q.astype(dtype)
  kq, ks, kq_clean, ks_clean = quantize_case(k, k_clean, pages_dtype)
  vq, vs, vq_clean, vs_clean = quantize_case(v, v_clean, pages_dtype)
  out = pa.paged_attention(q, kq, vq, block_tables, lengths, k_scales=ks,
                           v_scales=vs, pages_per_compute_block=ppcb,
                           k_splits=k_splits, interpret=INTERPRET)
  expected = pa.paged_attention_reference(q, kq_clean, vq_clean, block_tables,
                                          lengths, k_scales=ks_clean,
                                          v_scales=vs_clean)
  _assert_matches(out, expected, q, dtype)


@pytest.mark.parametrize("pages_dtype", QUANT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantized_reference_is_reference_on_dequantized_pages(pages_dtype):
  """The quantized reference (fed poisoned pages and scales) is the float32
  reference on the dequantized pages, and close to it on the original pages."""
  q, k, v, block_tables, lengths, k_clean, v_clean = make_case(
      2, page_size=8, head_dim=64, ratio=2, num_kv_heads=2, dtype=jnp.float32,
      pages_per_seq=4)
  kq, ks, kq_clean, ks_clean = quantize_case(k, k_clean, pages_dtype)
  vq, vs, vq_clean, vs_clean = quantize_case(v, v_clean, pages_dtype)
  out = pa.paged_attention_reference(q, kq, vq, block_tables, lengths, k_scales=ks,
                                     v_scales=vs)
  dequantized = pa.paged_attention_reference(
      q, dequantize_kv(kq_clean, ks_clean), dequantize_kv(vq_clean, vs_clean),
      block_tables, lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dequantized), atol=1e-6,
                             rtol=0)
  exact = pa.paged_attention_reference(q, k_clean, v_clean, block_tables, lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(exact),
                             atol=QUANT_ERROR[pages_dtype], rtol=0)


def _quantized_shapes(pages_dtype, **overrides):
  """_shapes(**overrides) with pages of pages_dtype and their float32 scales."""
  return quantized_shapes(_shapes(**overrides), pages_dtype)


def _lower_quantized_for_cuda(shapes, **kwargs):
  """Lowers paged_attention with shapes' last two, k_scales and v_scales, as the
  keywords."""
  f = lambda q, k, v, tables, lengths, k_scales, v_scales: pa.paged_attention(
      q, k, v, tables, lengths, k_scales=k_scales, v_scales=v_scales, **kwargs)
  return jax.jit(f).trace(*shapes.values()).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pages_dtype", QUANT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantized_lowers_for_cuda(pages_dtype, dtype):
  """The Triton lowering takes int8 / float8_e4m3fn pages, and the pages and scales
  go into the Triton call as they are (no conversion or copy outside it)."""
  for page_size, ratio, k_splits in ((8, 1, 1), (16, 4, 2), (32, 8, 1)):
    shapes = _quantized_shapes(pages_dtype, num_heads=2 * ratio, page_size=page_size,
                               dtype=dtype)
    hlo = _lower_quantized_for_cuda(shapes, k_splits=k_splits).as_text()
    [call] = [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]
    # k_pages, v_pages, k_scales, v_scales: parameters of the enclosing function (the
    # jitted entry's), not values computed from them; q before them is regrouped.
    assert re.search(r"triton\(%\w+, (%arg\d+, ){4}", call), call[:200]


def _with_quantized(name, shape=None, dtype=None, pages_dtype=jnp.int8):
  """_quantized_shapes() with one argument replaced (shape None: removed)."""
  shapes = _quantized_shapes(pages_dtype)
  shapes[name] = None if shape is None else jax.ShapeDtypeStruct(
      shape, dtype or shapes[name].dtype)
  return shapes


@pytest.mark.parametrize("shapes,match", [
    (_with_quantized("k_scales"),
     r"int8 pages \(2, 16, 16, 64\) need k_scales float32\[2, 16, 16\] .* got None"),
    (_with_quantized("v_scales", pages_dtype=jnp.float8_e4m3fn),
     r"float8_e4m3fn pages .* need v_scales float32\[2, 16, 16\] .* got None"),
    (_with_quantized("k_scales", (2, 16, 16, 1)),
     r"need k_scales float32\[2, 16, 16\] .* got float32\[2, 16, 16, 1\]"),
    (_with_quantized("v_scales", (2, 16, 8)), r"got float32\[2, 16, 8\]"),
    (_with_quantized("k_scales", (2, 16, 16), jnp.bfloat16),
     r"need k_scales float32\[2, 16, 16\] .* got bfloat16\[2, 16, 16\]"),
    (dict(_shapes(), k_scales=jax.ShapeDtypeStruct((2, 16, 16), jnp.float32),
          v_scales=None),
     r"k_scales / v_scales are only for int8 or float8_e4m3fn pages, got float32"
     r" pages with k_scales float32\[2, 16, 16\], v_scales None"),
    (_with_quantized("v_pages", (2, 16, 16, 64), jnp.float8_e4m3fn),
     r"dtypes differ: float32, int8, float8_e4m3fn"),
    (_with_quantized("q", (4, 8, 64), jnp.int8),
     r"dtype must be float32, bfloat16 or float16, got int8"),
])
def test_quantized_inconsistent_inputs_raise_value_error(shapes, match):
  with pytest.raises(ValueError, match=match):
    _lower_quantized_for_cuda(shapes)
