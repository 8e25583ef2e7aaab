"""Paged attention: the ragged (packed) step attention, decode and prefill, dense references.

`ragged_paged_attention`: one packed batch of query tokens, decodes and prefill chunks
of many sequences back to back, each token attending causally over its sequence's
paged K/V (already written, this step's tokens included). This is what the engine's
step calls. `paged_decode_attention` (one query per sequence) and
`paged_prefill_attention` (T queries per sequence) are the same computation in
rectangular form, kept as public entries for tests and benchmarks.

Implementations (`impl=`):

* "xla" (the CPU default): pure jnp/lax over *tiles*. A decode is a tile of one query;
  a prefill chunk is cut into tiles of `TILE_SIZE` consecutive queries of one sequence.
  All tiles of one kind run as one batch through `_attention_tiles`: a loop over chunks
  of block-table columns, each step gathering the chunk's pages of every (kv head,
  tile) with one row gather and folding them into an online softmax in float32. The
  host builds the tiles (`AttentionMetadata`); the output is scattered back to the
  packed token order.
  The pool is read through its row view `[L * Hkv * N, bs * D]` (`kv_cache.to_rows`):
  one page of one head is one contiguous row, and XLA:CPU gathers whole rows 4-10x
  faster than multi-dimensional slices of the 5-D array. Inside the step, writes and
  reads use that same view, so that no bitcast sits between a write and a read (on
  XLA:CPU a one-token write becomes a dynamic-update-slice, and a bitcast consumer made
  XLA duplicate it with a copy of the whole pool per layer: the old 0.5 s/token at
  4096 blocks).
  Chunking keeps every temporary small whatever the context: materialising a whole
  gathered context costs more in fresh-memory page faults than the attention itself.
* "cpu" (the CPU default where a C++ compiler exists): the same tiles (decodes and
  prefill tiles) and metadata, each batch of tiles one call of a native XLA:CPU kernel
  (pagedjax/runner/cpu_attention.cc, an XLA FFI custom call): one pass per (tile, kv head)
  over its pages, read in place from the row view. The xla loop was ~900 small kernels
  per layer, and XLA:CPU's cost per kernel was most of a decode step.
* "pallas" / "pallas_interpret": the Pallas kernels (GPU, or interpreted on CPU for
  tests): `pallas_kernels/ragged_paged_attention.py` for the ragged step (one launch,
  the layer picked inside the kernel, so no layer of the pool is sliced out), and
  `pallas_kernels/paged_attention.py` for `paged_decode_attention`.

Masking: every key position after the query's position is removed with `where` on the
scores *and* on V before any matmul, so stale or NaN data in unused pages can never
reach the output (0 * NaN would). Block-table entries past a sequence's last page may
hold any value; they are clamped into range before the gather. A query with nothing to
attend to returns zeros.

The dense references (`decode_attention_reference`, `prefill_attention_reference`)
compute the same thing on contiguous K/V `[B, S, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from pagedjax.runner import cpu_attention
from pagedjax.runner import kv_cache as kvc

IMPLS = ("xla", "cpu", "pallas", "pallas_interpret")
# Implementations that read the pools through their row view (kv_cache.to_rows).
ROW_IMPLS = ("xla", "cpu")
# Target size of one gathered K (or V) chunk in the xla path: small enough to stay in
# cache and to be reused across loop steps, large enough to amortise the loop overhead.
_CHUNK_BYTES = 1 << 20
# Queries per prefill tile in the xla path (a chunk of q_len tokens takes
# ceil(q_len / TILE_SIZE) tiles; each tile gathers its sequence's pages once).
TILE_SIZE = 16
# Groups of rows (decode rows, prefill tiles) that loop separately, each to its own
# longest context (the host sorts rows by context). Row counts are powers of two.
_ROW_GROUPS = 4
# Per kind of row: (most row groups, gathered chunk bytes, most pages per chunk). Decode
# rows do little work per gathered key (one query per head), and a chunk's pages past a
# row's context are gathered for nothing: at short contexts that waste was most of a
# decode step's attention. So decode rows loop in more groups, over smaller chunks of at
# most 8 pages (measured, 4 layers, contexts log-normal: 64 rows at mean context 62
# 12.2 -> 6.1 ms, at 253 19.3 -> 15.6 ms; 8 rows at 40 9.8 -> 1.1 ms; 1 row at 62 1.5 ->
# 0.23 ms). Prefill tiles: at most 4 pages (64 keys at block size 16) per chunk. A few
# tiles (one prompt) made chunks of up to the whole table (512 keys) whose keys past the
# tiles' causal reach were all computed and masked: 4-layer attention of one 256-token
# prompt 28 -> 5 ms, of a 256-token chunk after 256 cached tokens 24 -> 13 ms; steps of
# many tiles already had small chunks (the byte cap) and measured the same (noise).
_DECODE = (8, 1 << 17, 8)
_TILES = (_ROW_GROUPS, _CHUNK_BYTES, 4)


@flax.struct.dataclass
class AttentionMetadata:
  """Where each packed query token sits, for `ragged_paged_attention`.

  The xla path reads the tile fields, the Pallas path the ragged fields; the others are
  None. Padding: token index >= T (dropped), position -1, table entries any value.

  Attributes:
    decode_token_index: i32[Sd] packed row of each one-token query.
    decode_block_tables: i32[Sd, P] its sequence's pages.
    decode_positions: i32[Sd] its position (-1: padding).
    tile_token_index: i32[Np, Tq] packed rows of each prefill tile's queries.
    tile_block_tables: i32[Np, P] the tile's sequence's pages.
    tile_positions: i32[Np, Tq] query positions (-1: padding).
    cu_q_lens: i32[S + 1] cumulative query lengths of the packed sequences.
    kv_lens: i32[S] context length of each sequence, this step's tokens included.
    block_tables: i32[S, P] pages of each sequence.
    num_seqs: i32[1] sequences in use (the rest is padding).
  """

  decode_token_index: jax.Array | None = None  # [Sd]
  decode_block_tables: jax.Array | None = None  # [Sd, P]
  decode_positions: jax.Array | None = None  # [Sd]
  tile_token_index: jax.Array | None = None  # [Np, Tq]
  tile_block_tables: jax.Array | None = None  # [Np, P]
  tile_positions: jax.Array | None = None  # [Np, Tq]
  cu_q_lens: jax.Array | None = None  # [S + 1]
  kv_lens: jax.Array | None = None  # [S]
  block_tables: jax.Array | None = None  # [S, P]
  num_seqs: jax.Array | None = None  # [1]


def ragged_paged_attention(q, k, v, meta: AttentionMetadata, *, layer, sm_scale: float,
                           impl: str, geometry: kvc.PoolGeometry, k_scales=None, v_scales=None):
  """Causal attention of a packed batch of query tokens over their sequences' pages.

  Args:
    q: `[T, H, D]` packed queries.
    k, v: the pools in the step's layout: rows `[L * Hkv * N, bs * D]` for "xla"
      (`kv_cache.to_rows`), pages `[L, Hkv, N, bs, D]` for the Pallas impls.
    meta: `AttentionMetadata` (tile fields for "xla", ragged fields for Pallas).
    layer: the layer (int or traced int32 scalar).
    sm_scale: softmax scale (Python float).
    impl: "xla", "cpu", "pallas" or "pallas_interpret".
    geometry: the pool's static sizes.
    k_scales, v_scales: quantized pools' per-token scales, in the same layout as the
      pools (`kv_cache.scale_rows` rows `[L * Hkv * N, bs]` for "xla", `[L, Hkv, N, bs]`
      for Pallas); None for unquantized pools.

  Returns:
    `[T, H, D]` in q.dtype; zeros in padding rows.
  """
  if impl in ROW_IMPLS:
    t = q.shape[0]
    out = jnp.zeros(q.shape, q.dtype)
    kinds = [(meta.decode_token_index[:, None], meta.decode_block_tables,
              meta.decode_positions[:, None], _DECODE),
             (meta.tile_token_index, meta.tile_block_tables, meta.tile_positions, _TILES)]
    if impl == "cpu":  # every tile (decodes: tiles of one query) in the native kernel
      for index, tables, pos, _ in kinds:
        if index.size == 0:
          continue
        o = cpu_attention.tile_attention_rows(
          q[jnp.minimum(index, t - 1)], k, v, tables, pos, layer, sm_scale=sm_scale,
          geometry=geometry, k_scale_rows=k_scales, v_scale_rows=v_scales)
        out = out.at[index].set(o, mode="drop")
      return out
    for index, tables, pos, (max_groups, chunk_bytes, max_pages) in kinds:
      if index.size == 0:
        continue
      # The host sorts rows by context: each group of consecutive rows runs its own loop
      # to its own longest context, so short rows do not pay for the longest one.
      n = index.shape[0]
      groups = min(max_groups, n)
      for lo in range(0, n, n // groups):
        sl = slice(lo, lo + n // groups)
        qt = q[jnp.minimum(index[sl], t - 1)]  # [n / groups, Tq, H, D]
        o = _attention_tiles(qt, k, v, tables[sl], pos[sl], layer, sm_scale, geometry,
                             k_scale_rows=k_scales, v_scale_rows=v_scales,
                             chunk_bytes=chunk_bytes, max_pages=max_pages)
        out = out.at[index[sl]].set(o, mode="drop")
    return out
  from pallas_kernels.ragged_paged_attention import ragged_paged_attention as kernel

  scales = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  k, v = kvc.from_storage(k), kvc.from_storage(v)  # as _pallas_decode: bit patterns viewed
  return kernel(q, k, v, meta.kv_lens, meta.block_tables, meta.cu_q_lens, meta.num_seqs,
                sm_scale=sm_scale, layer=layer, interpret=impl == "pallas_interpret", **scales)


def _check(q, k_pages, v_pages, block_tables, seq_vectors: dict, sm_scale, impl, layer,
           k_scales=None, v_scales=None):
  """Static checks shared by the rectangular entries; q is [B, T, H, D]."""
  if kvc.is_quantized(k_pages.dtype) != (k_scales is not None) or (k_scales is None) != (
      v_scales is None):
    raise ValueError(f"k_scales and v_scales are required exactly for int8 / fp8 pages, got "
                     f"{k_pages.dtype} pages with k_scales {_desc(k_scales)}, v_scales "
                     f"{_desc(v_scales)}")
  for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
    if sc is not None and (sc.shape != k_pages.shape[:-1] or sc.dtype != jnp.float32):
      raise ValueError(f"{name} must be float32{list(k_pages.shape[:-1])} (the pages without "
                       f"head_dim), got {_desc(sc)}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(sm_scale, (int, float)) or sm_scale <= 0:
    raise ValueError(f"sm_scale must be a positive Python float, got {sm_scale!r}")
  rank = 4 if layer is None else 5
  if k_pages.ndim != rank or k_pages.shape != v_pages.shape:
    want = "[Hkv, N, bs, D]" if layer is None else "[L, Hkv, N, bs, D] (layer given)"
    raise ValueError(
      f"k_pages, v_pages must be equal {want}, got {k_pages.shape} and {v_pages.shape}")
  if isinstance(layer, int) and not 0 <= layer < k_pages.shape[0]:
    raise ValueError(f"layer {layer} out of range [0, {k_pages.shape[0]})")
  b, _, h, d = q.shape
  hkv = k_pages.shape[-4]
  if k_pages.shape[-1] != d:
    raise ValueError(f"head_dim of q ({d}) != head_dim of pages ({k_pages.shape[-1]})")
  if h % hkv:
    raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {hkv}")
  if block_tables.ndim != 2 or block_tables.shape[0] != b:
    raise ValueError(f"block_tables must be [{b}, P], got {block_tables.shape}")
  for name, x in seq_vectors.items():
    if x.shape != (b,):
      raise ValueError(f"{name} must be [{b}], got {x.shape}")


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float,
                           impl: str = "xla", layer=None, k_scales=None, v_scales=None):
  """Attention of one query token per sequence over its paged K/V.

  Args:
      q: `[B, H, D]` queries (H a multiple of Hkv: MHA, GQA or MQA).
      k_pages, v_pages: `[Hkv, N, bs, D]` page pools of one layer, or the pools of all
          layers `[L, Hkv, N, bs, D]` when `layer` is given.
      block_tables: `int32[B, P]`; row b lists the pages of sequence b in order.
          Entries past the sequence's last page are ignored (any value).
      lengths: `int32[B]` context lengths (0 <= length <= P * bs), the query included.
      sm_scale: softmax scale (Python float), e.g. `D ** -0.5`.
      impl: "xla", "cpu", "pallas" or "pallas_interpret".
      layer: None, or the layer (int or int32 scalar, may be traced) of all-layer pools.
      k_scales, v_scales: float32 scales of int8 / fp8 pages, shaped like the pages
          without head_dim (one per token and kv head); None for float pages.

  Returns:
      `[B, H, D]` in q.dtype, accumulated in float32; zeros where length == 0.
  """
  _check(q[:, None], k_pages, v_pages, block_tables, {"lengths": lengths}, sm_scale, impl, layer,
         k_scales, v_scales)
  return _decode(q, k_pages, v_pages, block_tables, lengths, layer, k_scales, v_scales,
                 sm_scale=sm_scale, impl=impl)


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _decode(q, k_pages, v_pages, block_tables, lengths, layer, k_scales, v_scales, *, sm_scale,
            impl):
  if impl in ROW_IMPLS:
    q_pos = (lengths.astype(jnp.int32) - 1)[:, None]  # [B, 1]
    return _rect_rows(q[:, None], k_pages, v_pages, block_tables, q_pos, sm_scale, layer,
                      k_scales, v_scales, impl=impl)[:, 0]
  return _pallas_decode(q, k_pages, v_pages, block_tables, lengths, sm_scale, impl, layer,
                        k_scales, v_scales)


def paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_lens, *,
                            sm_scale: float, impl: str = "xla", layer=None, k_scales=None,
                            v_scales=None):
  """Causal attention of T new tokens per sequence over cached context and themselves.

  Query t of sequence b sits at position `context_lens[b] + t` and attends to every
  position <= its own. Its K/V (and those of the other new tokens) must already be in
  the pages (write first, then attend).

  Args:
      q: `[B, T, H, D]`; rows t >= query_lens[b] are padding.
      k_pages, v_pages: `[Hkv, N, bs, D]` (or `[L, Hkv, N, bs, D]` with `layer`).
      block_tables: `int32[B, P]` covering positions `< context_lens + query_lens`.
      context_lens: `int32[B]` tokens already cached before these queries.
      query_lens: `int32[B]` valid query rows per sequence (0 <= query_lens <= T).
      sm_scale: softmax scale (Python float).
      impl: "xla", "cpu", "pallas" or "pallas_interpret".
      layer: None, or the layer of all-layer pools.
      k_scales, v_scales: scales of int8 / fp8 pages (see `paged_decode_attention`).

  Returns:
      `[B, T, H, D]` in q.dtype; zeros in padded rows.
  """
  _check(q, k_pages, v_pages, block_tables,
         {"context_lens": context_lens, "query_lens": query_lens}, sm_scale, impl, layer,
         k_scales, v_scales)
  return _prefill(q, k_pages, v_pages, block_tables, context_lens, query_lens, layer, k_scales,
                  v_scales, sm_scale=sm_scale, impl=impl)


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _prefill(q, k_pages, v_pages, block_tables, context_lens, query_lens, layer, k_scales,
             v_scales, *, sm_scale, impl):
  b, t, h, d = q.shape
  q_pos = _query_positions(context_lens, query_lens, t)  # [B, T]
  if impl in ROW_IMPLS:
    return _rect_rows(q, k_pages, v_pages, block_tables, q_pos, sm_scale, layer, k_scales,
                      v_scales, impl=impl)
  # Flatten into B*T decode queries: length = position + 1, 0 for padded rows.
  tables = jnp.repeat(block_tables, t, axis=0)  # [B*T, P]
  out = _pallas_decode(q.reshape(b * t, h, d), k_pages, v_pages, tables,
                       (q_pos + 1).reshape(-1), sm_scale, impl, layer, k_scales, v_scales)
  return out.reshape(b, t, h, d)


def _desc(x) -> str:
  return "None" if x is None else f"{x.dtype}{list(x.shape)}"


def _query_positions(context_lens, query_lens, t: int):
  # [B, T] position of each query token; -1 marks padded rows (attend to nothing).
  rows = jnp.arange(t, dtype=jnp.int32)[None]
  pos = context_lens.astype(jnp.int32)[:, None] + rows
  return jnp.where(rows < query_lens[:, None], pos, -1)


def _rect_rows(q, k_pages, v_pages, block_tables, q_pos, sm_scale, layer, k_scales=None,
               v_scales=None, *, impl: str):
  """The tiles on 4-D (one layer) or 5-D pools, outside a step: "xla" or "cpu"."""
  if layer is None:
    k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    if k_scales is not None:
      k_scales, v_scales = k_scales[None], v_scales[None]
  g = kvc.PoolGeometry.of(k_pages)
  args = (q, kvc.to_rows(k_pages), kvc.to_rows(v_pages), block_tables, q_pos, layer)
  scales = dict(k_scale_rows=kvc.scale_rows(k_scales), v_scale_rows=kvc.scale_rows(v_scales))
  if impl == "cpu":
    return cpu_attention.tile_attention_rows(*args, sm_scale=sm_scale, geometry=g, **scales)
  return _attention_tiles(*args, sm_scale, g, **scales)


def _pallas_decode(q, k_pages, v_pages, block_tables, lengths, sm_scale, impl, layer,
                   k_scales=None, v_scales=None):
  # Imported here so the xla path works without the kernel module (and its Triton deps).
  from pallas_kernels.paged_attention import paged_attention

  if layer is not None:
    k_pages, v_pages = k_pages[layer], v_pages[layer]
    if k_scales is not None:
      k_scales, v_scales = k_scales[layer], v_scales[layer]
  scales = {} if k_scales is None else dict(k_scales=k_scales, v_scales=v_scales)
  return paged_attention(q, kvc.from_storage(k_pages), kvc.from_storage(v_pages),
                         block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
                         sm_scale=sm_scale, interpret=impl == "pallas_interpret", **scales)


def _gather_rows(rows, index):
  """rows [R, W], index int32[...] in [0, R) -> [..., W] float32: one row per index
  (int8 / fp8 values as they are stored: the caller applies their scales)."""
  dnums = lax.GatherDimensionNumbers(
    offset_dims=(index.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,))
  out = kvc.from_storage(lax.gather(rows, index[..., None], dnums, slice_sizes=(1, rows.shape[1]),
                                   mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS))
  if out.dtype != jnp.float32:
    # Keeps XLA from turning convert(gather(pool)) into gather(convert(pool)), which
    # would convert (copy) the whole pool.
    out = lax.optimization_barrier(out)
  return out.astype(jnp.float32)


def _attention_tiles(q, k_rows, v_rows, block_tables, q_pos, layer, sm_scale,
                     geometry: kvc.PoolGeometry, pages_per_step=None, k_scale_rows=None,
                     v_scale_rows=None, chunk_bytes=_CHUNK_BYTES, max_pages=None):
  """q [B, T, H, D] (B tiles of T queries), q_pos int32[B, T] (-1: padding) -> [B, T, H, D].

  k_rows / v_rows: the pools as rows `[L * Hkv * N, bs * D]`; block_tables [B, P] the
  pages of each tile's sequence. pages_per_step: block-table columns per loop step;
  None sizes a gathered K chunk to `chunk_bytes`. k_scale_rows / v_scale_rows: quantized
  pools' scales `[L * Hkv * N, bs]` (same rows), applied to the score columns (K) and to
  the probabilities (V), so a gathered chunk is never dequantized as a whole.
  """
  b, t, h, d = q.shape
  hkv, n, bs = geometry.num_kv_heads, geometry.num_blocks, geometry.block_size
  g = h // hkv
  p = block_tables.shape[1]
  col_bytes = hkv * b * bs * d * 4
  c = min(p, pages_per_step or max(1, min(chunk_bytes // col_bytes, max_pages or p)))
  steps = -(-p // c)
  # Rows of the pool view; table entries are clamped into range (entries past a
  # sequence's last page may hold anything; those positions are masked).
  pages = jnp.clip(block_tables.astype(jnp.int32), 0, n - 1)
  pages = jnp.pad(pages, ((0, 0), (0, steps * c - p)))  # [B, steps * c]
  heads = (jnp.asarray(layer, jnp.int32) * hkv + jnp.arange(hkv, dtype=jnp.int32)) * n
  rows = heads[:, None, None] + pages[None]  # [Hkv, B, steps*c]
  rows = rows.reshape(hkv, b, steps, c).transpose(2, 0, 1, 3)  # [steps, Hkv, B, c]
  # [Hkv, B, G*T, D]: the query heads of one kv head and all their tokens together.
  qg = q.reshape(b, t, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv, b, g * t, d)
  qg = qg.astype(jnp.float32)
  q_pos_g = jnp.tile(q_pos, (1, g))[None]  # [1, B, G*T] same order as qg rows
  last_pos = q_pos.max(1)  # [B]

  def step(i, carry):
    m, l, acc = carry  # [Hkv, B, G*T], [Hkv, B, G*T], [Hkv, B, G*T, D]
    rows_c = lax.dynamic_index_in_dim(rows, i, keepdims=False)  # [Hkv, B, c]
    k = _gather_rows(k_rows, rows_c).reshape(hkv, b, c * bs, d)  # [Hkv, B, c*bs, D]
    v = _gather_rows(v_rows, rows_c).reshape(hkv, b, c * bs, d)
    kv_pos = i * (c * bs) + jnp.arange(c * bs, dtype=jnp.int32)  # [c*bs]
    mask = kv_pos[None, None, None, :] <= q_pos_g[..., None]  # [1, B, G*T, c*bs]
    s = jnp.einsum("hbqd,hbkd->hbqk", qg, k)
    if k_scale_rows is not None:  # [Hkv, B, c*bs]: one scale per key
      s = s * _gather_rows(k_scale_rows, rows_c).reshape(hkv, b, 1, c * bs)
    s = jnp.where(mask, s * sm_scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw no key yet
    prob = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    corr = jnp.exp(m - m_safe)
    # Keys no query may see: zero V so that stale/NaN pages cannot leak via 0 * NaN.
    seen = kv_pos[None, :] <= last_pos[:, None]  # [B, c*bs]
    v = jnp.where(seen[None, :, :, None], v, 0)
    if v_scale_rows is not None:  # p . (v * scale) == (p * scale) . v; unseen scales -> 0
      v_sc = _gather_rows(v_scale_rows, rows_c).reshape(hkv, b, 1, c * bs)
      pv = jnp.einsum("hbqk,hbkd->hbqd", prob * jnp.where(seen[None, :, None], v_sc, 0), v)
    else:
      pv = jnp.einsum("hbqk,hbkd->hbqd", prob, v)
    return m_new, l * corr + prob.sum(-1), acc * corr[..., None] + pv

  init = (
    jnp.full((hkv, b, g * t), -jnp.inf, jnp.float32),
    jnp.zeros((hkv, b, g * t), jnp.float32),
    jnp.zeros((hkv, b, g * t, d), jnp.float32),
  )
  # Only the chunks some query can see: the trip count follows the longest context, not
  # the block-table width (the model's whole context).
  num_steps = jnp.clip((jnp.max(q_pos) + c * bs) // (c * bs), 0, steps)
  _, l, acc = lax.fori_loop(0, num_steps, step, init)
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [Hkv, B, G*T, D]; l == 0 -> zeros
  out = out.reshape(hkv, b, g, t, d).transpose(1, 3, 0, 2, 4)  # [B, T, Hkv, G, D]
  return out.reshape(b, t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------------
# Dense references on contiguous K/V.


def _dense_attention(q, k, v, q_pos, sm_scale):
  # q [B, T, H, D], k/v [B, S, Hkv, D], q_pos [B, T] -> [B, T, H, D].
  b, t, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
  mask = jnp.arange(k.shape[1])[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  p = jnp.where(mask[:, None, None], jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)), 0.0)
  l = p.sum(-1, keepdims=True)
  o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def decode_attention_reference(q, k, v, lengths, *, sm_scale: float):
  """Dense decode attention: q `[B, H, D]`, k/v `[B, S, Hkv, D]`, lengths `[B]` -> `[B, H, D]`."""
  return _dense_attention(q[:, None], k, v, (lengths - 1)[:, None], sm_scale)[:, 0]


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def prefill_attention_reference(q, k, v, context_lens, query_lens, *, sm_scale: float):
  """Dense causal prefill: q `[B, T, H, D]`, k/v `[B, S, Hkv, D]` -> `[B, T, H, D]`.

  Position j of k/v holds token j of the sequence; query t is at `context_lens + t`.
  """
  return _dense_attention(q, k, v, _query_positions(context_lens, query_lens, q.shape[1]), sm_scale)
