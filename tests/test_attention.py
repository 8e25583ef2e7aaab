"""Tests for pagedjax.runner.attention: paged decode/prefill vs the dense references.

Every case poisons every page slot that no sequence uses with NaN and fills padded
block-table entries with junk (-1, out-of-range ids, ids of other sequences' pages), so
an output that reads padding as data fails the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.runner import attention, kv_cache
from pagedjax.runner.model_runner import ModelRunner

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _paged_case(seed, lengths, *, bs, pages_per_seq, hkv, d, dtype, share=False):
  """Random pages + block tables for sequences of the given total lengths.

  Returns (k_pages, v_pages, block_tables, k, v): pages [Hkv, N, bs, D] with NaN in every
  unused slot; k, v [B, S, Hkv, D] the same data made contiguous (zeros past length).
  """
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  needed = -(-lengths // bs)
  assert needed.max() <= pages_per_seq
  n = int(needed.sum()) + 3  # a few pages nobody uses
  perm = iter(rng.permutation(n))
  tables = np.zeros((len(lengths), pages_per_seq), np.int32)
  for b, need in enumerate(needed):
    tables[b, :need] = [next(perm) for _ in range(need)]
    junk = rng.choice([-1, n + 7, int(tables[0, 0]), 0], size=pages_per_seq - need)
    tables[b, need:] = junk
  if share:  # sequence 1 starts with sequence 0's full pages (a shared prefix)
    k_shared = min(lengths[0] // bs, needed[1])
    tables[1, :k_shared] = tables[0, :k_shared]
  pages = rng.standard_normal((2, hkv, n, bs, d)).astype(np.float32)
  pages = np.array(jnp.asarray(pages, dtype).astype(jnp.float32))  # round to dtype
  used = np.zeros((n, bs), bool)
  s = pages_per_seq * bs
  contiguous = np.zeros((2, len(lengths), s, hkv, d), np.float32)
  for b, length in enumerate(lengths):
    pos = np.arange(length)
    page, off = tables[b, pos // bs], pos % bs
    used[page, off] = True
    contiguous[:, b, :length] = pages[:, :, page, off].transpose(0, 2, 1, 3)
  pages[:, :, ~used] = np.nan
  as_jnp = functools.partial(jnp.asarray, dtype=dtype)
  return (
    as_jnp(pages[0]),
    as_jnp(pages[1]),
    jnp.asarray(tables),
    as_jnp(contiguous[0]),
    as_jnp(contiguous[1]),
  )


def _assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype])


def _decode_case(seed, dtype, h, hkv, *, lengths=(33, 50, 0, 1, 7, 16), bs=8, d=32, share=True):
  kp, vp, tables, k, v = _paged_case(
    seed, lengths, bs=bs, pages_per_seq=7, hkv=hkv, d=d, dtype=dtype, share=share
  )
  q = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((len(lengths), h, d)), dtype)
  return q, kp, vp, tables, jnp.asarray(lengths, jnp.int32), k, v


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)])  # MHA, GQA, MQA
def test_decode_matches_reference(dtype, h, hkv, impl):
  q, kp, vp, tables, lengths, k, v = _decode_case(0, dtype, h, hkv)
  scale = 0.3  # explicit, not 1/sqrt(d)
  got = attention.paged_decode_attention(q, kp, vp, tables, lengths, sm_scale=scale, impl=impl)
  want = attention.decode_attention_reference(q, k, v, lengths, sm_scale=scale)
  assert got.shape == q.shape and got.dtype == q.dtype
  _assert_close(got, want, dtype)
  np.testing.assert_array_equal(np.asarray(got[2], np.float32), 0.0)  # length 0


@pytest.mark.parametrize("pages_per_step", [1, 3])  # several scan steps, last one partial
def test_xla_online_softmax_across_scan_steps(pages_per_step):
  q, kp, vp, tables, lengths, k, v = _decode_case(1, jnp.float32, 4, 2)
  geometry = kv_cache.PoolGeometry.of(kp[None])

  @jax.jit
  def f(q, kp, vp, tables, q_pos):
    return attention._attention_tiles(q, kv_cache.to_rows(kp), kv_cache.to_rows(vp), tables, q_pos,
                                      0, 0.25, geometry, pages_per_step=pages_per_step)

  got = f(q[:, None], kp, vp, tables, (lengths - 1)[:, None])[:, 0]
  want = attention.decode_attention_reference(q, k, v, lengths, sm_scale=0.25)
  _assert_close(got, want, jnp.float32)


def _prefill_case(
  seed, dtype, h, hkv, *, context_lens=(16, 9, 0, 5), query_lens=(3, 1, 6, 0), t=6, bs=8, d=32
):
  total = np.add(context_lens, query_lens)
  kp, vp, tables, k, v = _paged_case(
    seed, total, bs=bs, pages_per_seq=4, hkv=hkv, d=d, dtype=dtype, share=True
  )
  q = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((len(total), t, h, d)), dtype)
  return (
    q,
    kp,
    vp,
    tables,
    jnp.asarray(context_lens, jnp.int32),
    jnp.asarray(query_lens, jnp.int32),
    k,
    v,
  )


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)])
def test_prefill_matches_reference(dtype, h, hkv, impl):
  q, kp, vp, tables, ctx, qlen, k, v = _prefill_case(2, dtype, h, hkv)
  got = attention.paged_prefill_attention(q, kp, vp, tables, ctx, qlen, sm_scale=0.2,
                                          impl=impl)
  want = attention.prefill_attention_reference(q, k, v, ctx, qlen, sm_scale=0.2)
  assert got.shape == q.shape and got.dtype == q.dtype
  _assert_close(got, want, dtype)
  np.testing.assert_array_equal(np.asarray(got[3], np.float32), 0.0)  # query_lens 0
  np.testing.assert_array_equal(np.asarray(got[0, 3:], np.float32), 0.0)  # padded rows


def test_prefill_last_row_equals_decode():
  q, kp, vp, tables, ctx, qlen, _, _ = _prefill_case(3, jnp.float32, 4, 2, query_lens=(3, 1, 6, 2))
  pre = attention.paged_prefill_attention(q, kp, vp, tables, ctx, qlen, sm_scale=0.2)
  last = qlen - 1
  dec = attention.paged_decode_attention(
    q[jnp.arange(4), last], kp, vp, tables, ctx + qlen, sm_scale=0.2
  )
  np.testing.assert_allclose(np.asarray(pre[jnp.arange(4), last]), np.asarray(dec), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_of_stacked_pages(dtype):
  """layer= reads exactly that layer of [L, Hkv, N, bs, D] pools (the others are NaN)."""
  q, kp, vp, tables, ctx, qlen, k, v = _prefill_case(7, dtype, 4, 2)
  nan = jnp.full_like(kp, jnp.nan)
  k_all, v_all = jnp.stack([nan, kp, nan]), jnp.stack([nan, vp, nan])
  want = attention.prefill_attention_reference(q, k, v, ctx, qlen, sm_scale=0.2)
  for impl in ("xla", "cpu"):
    f = jax.jit(functools.partial(attention.paged_prefill_attention, sm_scale=0.2, impl=impl))
    got = f(q, k_all, v_all, tables, ctx, qlen, layer=jnp.int32(1))  # traced layer
    _assert_close(got, want, dtype)
  lengths = ctx + qlen
  for impl in ("xla", "cpu"):
    got = attention.paged_decode_attention(
      q[:, 0], k_all, v_all, tables, lengths, sm_scale=0.2, layer=jnp.int32(1), impl=impl
    )
    _assert_close(
      got, attention.decode_attention_reference(q[:, 0], k, v, lengths, sm_scale=0.2), dtype
    )
  with pytest.raises(ValueError, match="layer 3"):
    attention.paged_decode_attention(q[:, 0], k_all, v_all, tables, lengths, sm_scale=0.2, layer=3)
  with pytest.raises(ValueError, match="layer given"):
    attention.paged_decode_attention(q[:, 0], kp, vp, tables, lengths, sm_scale=0.2, layer=0)


def test_dispatch_validates():
  q, kp, vp, tables, lengths, _, _ = _decode_case(4, jnp.float32, 4, 2)
  with pytest.raises(ValueError, match="'triton'"):
    attention.paged_decode_attention(q, kp, vp, tables, lengths, sm_scale=0.1, impl="triton")
  with pytest.raises(ValueError, match="not a multiple"):
    attention.paged_decode_attention(q[:, :3], kp, vp, tables, lengths, sm_scale=0.1)
  with pytest.raises(ValueError, match="sm_scale"):
    attention.paged_decode_attention(q, kp, vp, tables, lengths, sm_scale=-1.0)
  with pytest.raises(ValueError, match="lengths"):
    attention.paged_decode_attention(q, kp, vp, tables, lengths[:2], sm_scale=0.1)


# Pallas kernel in interpret mode: tiny cases (interpretation is slow on CPU).
# The kernel needs power-of-two head_dim >= 16 and page size.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_pallas_interpret_matches_reference(dtype):
  pytest.importorskip("pallas_kernels.paged_attention")
  q, kp, vp, tables, lengths, k, v = _decode_case(5, dtype, 4, 2, lengths=(32, 13, 0, 1), d=16)
  got = attention.paged_decode_attention(
    q, kp, vp, tables, lengths, sm_scale=0.3, impl="pallas_interpret"
  )
  _assert_close(got, attention.decode_attention_reference(q, k, v, lengths, sm_scale=0.3), dtype)


def test_prefill_pallas_interpret_matches_reference():
  pytest.importorskip("pallas_kernels.paged_attention")
  q, kp, vp, tables, ctx, qlen, k, v = _prefill_case(
    6, jnp.float32, 4, 2, t=3, context_lens=(9, 0, 4), query_lens=(3, 2, 0), d=16
  )
  got = attention.paged_prefill_attention(
    q, kp, vp, tables, ctx, qlen, sm_scale=0.2, impl="pallas_interpret"
  )
  want = attention.prefill_attention_reference(q, k, v, ctx, qlen, sm_scale=0.2)
  _assert_close(got, want, jnp.float32)


# ----------------------------------------------------------------------------------
# The ragged (packed) step attention, built from a scheduler-like description by the
# model runner's own metadata builders, against the dense reference per sequence.


class _Seq:  # what the runner reads of a scheduled sequence (tiles / ragged builders)
  def __init__(self, start, q_len):
    self.start, self.token_ids = start, [0] * q_len


def _ragged_case(seed, dtype, h, hkv, seqs, *, bs=8, d=32):
  """seqs: (start, q_len) per sequence. Returns q [T, H, D], 5-D pools, tables, k, v."""
  kv_lens = [a + b for a, b in seqs]
  pages_per_seq = -(-max(max(kv_lens), 1) // bs) + 1
  kp, vp, tables, k, v = _paged_case(seed, kv_lens, bs=bs, pages_per_seq=pages_per_seq, hkv=hkv,
                                     d=d, dtype=dtype, share=len(seqs) > 1)
  t = sum(b for _, b in seqs)
  q = jnp.asarray(np.random.default_rng(seed + 2).standard_normal((t, h, d)), dtype)
  return q, kp[None], vp[None], np.asarray(tables), k, v


def _ragged_reference(q, k, v, seqs, sm_scale):
  outs = []
  for i, (start, n) in enumerate(seqs):
    if n == 0:
      continue
    row = sum(b for _, b in seqs[:i])
    qi = q[row:row + n][None]  # [1, n, H, D]
    outs.append(attention.prefill_attention_reference(
        qi, k[i:i + 1], v[i:i + 1], jnp.asarray([start]), jnp.asarray([n]), sm_scale=sm_scale)[0])
  return jnp.concatenate(outs)


def _metadata(seqs, tables, impl):
  lens = np.asarray([n for _, n in seqs])
  starts = np.asarray([a for a, _ in seqs])
  cu = np.concatenate([[0], np.cumsum(lens)])
  t_cap = int(cu[-1]) + 3  # a few padding rows
  runner = ModelRunner.__new__(ModelRunner)  # only the pure metadata builders are used
  if impl in attention.ROW_IMPLS:
    r_cap = 1 << max(0, (len(seqs) - 1).bit_length())  # >= the decode rows, as in prepare
    # One-token entries are decode rows (they sample, as prepare's decodes do).
    meta, _ = runner._tiles(lens, starts, cu, tables, t_cap, r_cap, lens == 1)
  else:
    meta, _ = runner._ragged(lens, starts, cu, tables)
  return jax.tree.map(jnp.asarray, meta), t_cap


RAGGED_MIX = [  # (tokens already cached, tokens computed now)
    (12, 1), (0, 20), (7, 9), (0, 1), (5, 0), (15, 1), (16, 16), (31, 1), (0, 8), (3, 17)]


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)])
def test_ragged_rows_match_dense_per_sequence(dtype, h, hkv, impl):
  """Decodes, whole prompts, chunks in mid-context, q_len 0, page boundaries, NaN pages."""
  q, kp, vp, tables, k, v = _ragged_case(11, dtype, h, hkv, RAGGED_MIX)
  meta, t_cap = _metadata(RAGGED_MIX, tables, impl)
  qp = jnp.pad(q, ((0, t_cap - q.shape[0]), (0, 0), (0, 0)))  # padding rows stay zero
  geometry = kv_cache.PoolGeometry.of(kp)

  @jax.jit
  def f(q, kp, vp, meta):
    return attention.ragged_paged_attention(q, kv_cache.to_rows(kp), kv_cache.to_rows(vp), meta,
                                            layer=0, sm_scale=0.3, impl=impl, geometry=geometry)

  got = f(qp, kp, vp, meta)
  want = _ragged_reference(q, k, v, RAGGED_MIX, 0.3)
  _assert_close(got[:q.shape[0]], want, dtype)
  np.testing.assert_array_equal(np.asarray(got[q.shape[0]:], np.float32), 0.0)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_ragged_rows_single_decode_and_single_chunk(impl):
  for mix in ([(0, 1)], [(40, 1)], [(0, 16)], [(8, 33)]):
    q, kp, vp, tables, k, v = _ragged_case(12, jnp.float32, 8, 2, mix)
    meta, t_cap = _metadata(mix, tables, impl)
    qp = jnp.pad(q, ((0, t_cap - q.shape[0]), (0, 0), (0, 0)))
    got = attention.ragged_paged_attention(qp, kv_cache.to_rows(kp), kv_cache.to_rows(vp), meta,
                                           layer=0, sm_scale=0.3, impl=impl,
                                           geometry=kv_cache.PoolGeometry.of(kp))
    _assert_close(got[:q.shape[0]], _ragged_reference(q, k, v, mix, 0.3), jnp.float32)
