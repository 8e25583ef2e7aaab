"""Quantized pages for the kernel tests: int8 / float8_e4m3fn values with one float32
scale per token (pagedjax.runner.kv_cache.quantize_kv), clean and poisoned."""

import jax
import jax.numpy as jnp

from pagedjax.runner.kv_cache import quantize_kv


QUANT_DTYPES = [jnp.int8, jnp.float8_e4m3fn]
# Max abs error of attention over quantized unit-normal K/V vs the float32 K/V. The
# worst seen over 80 cases (20 seeds x head_dim 8..128, decode and ragged) was 0.030
# for int8 and 0.13 for float8_e4m3fn (3 mantissa bits).
QUANT_ERROR = {jnp.int8: 5e-2, jnp.float8_e4m3fn: 0.25}


def quantize_case(k, k_clean, dtype):
  """k_clean quantized per token with quantize_kv, and the same poisoned.

  Every slot that k marks unused (NaN) gets a NaN scale, and in the poisoned values
  NaN (float8) or -128 (int8: a value quantize_kv never writes).

  Returns:
    (values, scales, clean_values, clean_scales).
  """
  clean_values, clean_scales = quantize_kv(k_clean, dtype)
  unused = jnp.isnan(k[..., 0])  # [..., page_size] slots no query reads
  garbage = jnp.nan if dtype == jnp.float8_e4m3fn else -128
  values = jnp.where(unused[..., None], jnp.asarray(garbage, dtype), clean_values)
  scales = jnp.where(unused, jnp.nan, clean_scales)
  return values, scales, clean_values, clean_scales


def quantized_shapes(shapes: dict, pages_dtype) -> dict:
  """Abstract kernel arguments `shapes` with k/v pages of pages_dtype and their float32
  scales (k_scales, v_scales: the pages' shape without head_dim)."""
  pages = jax.ShapeDtypeStruct(shapes["k_pages"].shape, pages_dtype)
  scales = jax.ShapeDtypeStruct(pages.shape[:-1], jnp.float32)
  return dict(shapes, k_pages=pages, v_pages=pages, k_scales=scales, v_scales=scales)
