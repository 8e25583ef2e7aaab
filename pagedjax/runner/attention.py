"""Paged attention for decode and prefill, behind one dispatch, plus dense references.

`paged_decode_attention`: one query token per sequence over its paged K/V context.
`paged_prefill_attention`: T query tokens per sequence, causal over the cached context
and themselves (their K/V must already be written into the pages).

Implementations (`impl=`):

* "xla" (the CPU default): pure jnp/lax. A loop over chunks of block-table
  columns; each step gathers the chunk's pages of every (kv head, sequence) with one
  row gather from the pool viewed as `[num_kv_heads * num_blocks, block_size * head_dim]`
  and folds them into an online softmax in float32. Decode is prefill with one query
  per sequence at position `length - 1`, so both share this code. Chunking keeps every
  temporary small (a few MB) whatever the context length: on the CPU backend,
  materialising the whole gathered context costs more in fresh-memory page faults than
  the attention itself. Speed (bench/attention.py): 2.6-3.5x the best contiguous layout
  in float32, the gather itself being the cost (~3 GB/s on XLA:CPU); faster than
  contiguous in bfloat16, where XLA:CPU upcasts whole operands either way.
  Tried, at context 1024 / float32, paged / contiguous time: gather of the whole
  context then einsum 6-9x (page faults on the 67 MB temporaries); the same with
  `mode="promise_in_bounds"`, per-kv-head or page-row gathers 6-8x; gather fused into a
  multiply-reduce 18x; Python-unrolled chunks (with or without a chain of
  optimization barriers) 7-12x plus long compiles; `lax.map` over sequences ~3.5-4x;
  this scan 2.6-4x (1, 4 or 8 pages per step alike; `unroll` no help).
* "pallas" / "pallas_interpret": the decode kernel in
  `pallas_kernels/paged_attention.py` (GPU, or interpreted on CPU for tests). Prefill
  reuses it exactly: the (B, T) queries are flattened into B*T decode queries whose
  length is `position + 1` (0 for padded rows) and whose block table is their
  sequence's row.

Masking: every key position `>= length` (or after the query's position) is removed
with `where` on the scores *and* on V before any matmul, so padded block-table entries
and stale or NaN data in unused pages can never reach the output (0 * NaN would).
Block-table entries past a sequence's last page may hold any value; they are clamped
into range before the gather. A query with nothing to attend to returns zeros.

The dense references (`decode_attention_reference`, `prefill_attention_reference`)
compute the same thing on contiguous K/V `[B, S, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "pallas", "pallas_interpret")
# Target size of one gathered K (or V) chunk in the xla path: small enough to stay in
# cache and to be reused across scan steps, large enough to amortise the loop overhead.
_CHUNK_BYTES = 1 << 20


def _check(q, k_pages, v_pages, block_tables, seq_vectors: dict, sm_scale, impl, layer):
  """Static checks shared by both entries; q is [B, T, H, D]."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if not isinstance(sm_scale, (int, float)) or sm_scale <= 0:
    raise ValueError(f"sm_scale must be a positive Python float, got {sm_scale!r}")
  rank = 4 if layer is None else 5
  if k_pages.ndim != rank or k_pages.shape != v_pages.shape:
    want = "[Hkv, N, bs, D]" if layer is None else "[L, Hkv, N, bs, D] (layer given)"
    raise ValueError(
      f"k_pages, v_pages must be equal {want}, got {k_pages.shape} and {v_pages.shape}"
    )
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


def paged_decode_attention(
  q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float, impl: str = "xla", layer=None
):
  """Attention of one query token per sequence over its paged K/V.

  Args:
      q: `[B, H, D]` queries (H a multiple of Hkv: MHA, GQA or MQA).
      k_pages, v_pages: `[Hkv, N, bs, D]` page pools of one layer, or the pools of all
          layers `[L, Hkv, N, bs, D]` when `layer` is given.
      block_tables: `int32[B, P]`; row b lists the pages of sequence b in order.
          Entries past the sequence's last page are ignored (any value).
      lengths: `int32[B]` context lengths (0 <= length <= P * bs), the query included.
      sm_scale: softmax scale (Python float), e.g. `D ** -0.5`.
      impl: "xla", "pallas" or "pallas_interpret".
      layer: None, or the layer (int or int32 scalar, may be traced) of all-layer pools.
          Inside a jitted step prefer this to slicing `k_pages[layer]` yourself: on
          XLA:CPU the slice is materialised (a copy of the layer's pool per call).

  Returns:
      `[B, H, D]` in q.dtype, accumulated in float32; zeros where length == 0.
  """
  _check(q[:, None], k_pages, v_pages, block_tables, {"lengths": lengths}, sm_scale, impl, layer)
  return _decode(q, k_pages, v_pages, block_tables, lengths, layer, sm_scale=sm_scale, impl=impl)


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _decode(q, k_pages, v_pages, block_tables, lengths, layer, *, sm_scale, impl):
  if impl == "xla":
    q_pos = (lengths.astype(jnp.int32) - 1)[:, None]  # [B, 1]
    return _attention_xla(q[:, None], k_pages, v_pages, block_tables, q_pos, sm_scale, layer=layer)[
      :, 0
    ]
  return _pallas(q, k_pages, v_pages, block_tables, lengths, sm_scale, impl, layer)


def paged_prefill_attention(
  q,
  k_pages,
  v_pages,
  block_tables,
  context_lens,
  query_lens,
  *,
  sm_scale: float,
  impl: str = "xla",
  layer=None,
):
  """Causal attention of T new tokens per sequence over cached context and themselves.

  Query t of sequence b sits at position `context_lens[b] + t` and attends to every
  position <= its own. Its K/V (and those of the other new tokens) must already be in
  the pages (write first, then attend).

  Args:
      q: `[B, T, H, D]`; rows t >= query_lens[b] are padding.
      k_pages, v_pages: `[Hkv, N, bs, D]` page pools of one layer (or `[L, Hkv, N, bs, D]`
          with `layer`, as in `paged_decode_attention`).
      block_tables: `int32[B, P]` covering positions `< context_lens + query_lens`.
      context_lens: `int32[B]` tokens already cached before these queries.
      query_lens: `int32[B]` valid query rows per sequence (0 <= query_lens <= T).
      sm_scale: softmax scale (Python float).
      impl: "xla", "pallas" or "pallas_interpret".
      layer: None, or the layer of all-layer pools (see `paged_decode_attention`).

  Returns:
      `[B, T, H, D]` in q.dtype; zeros in padded rows.
  """
  _check(
    q,
    k_pages,
    v_pages,
    block_tables,
    {"context_lens": context_lens, "query_lens": query_lens},
    sm_scale,
    impl,
    layer,
  )
  return _prefill(
    q, k_pages, v_pages, block_tables, context_lens, query_lens, layer, sm_scale=sm_scale, impl=impl
  )


@functools.partial(jax.jit, static_argnames=("sm_scale", "impl"))
def _prefill(q, k_pages, v_pages, block_tables, context_lens, query_lens, layer, *, sm_scale, impl):
  b, t, h, d = q.shape
  q_pos = _query_positions(context_lens, query_lens, t)  # [B, T]
  if impl == "xla":
    return _attention_xla(q, k_pages, v_pages, block_tables, q_pos, sm_scale, layer=layer)
  # Flatten into B*T decode queries: length = position + 1, 0 for padded rows.
  tables = jnp.repeat(block_tables, t, axis=0)  # [B*T, P]
  out = _pallas(
    q.reshape(b * t, h, d), k_pages, v_pages, tables, (q_pos + 1).reshape(-1), sm_scale, impl, layer
  )
  return out.reshape(b, t, h, d)


def _query_positions(context_lens, query_lens, t: int):
  # [B, T] position of each query token; -1 marks padded rows (attend to nothing).
  rows = jnp.arange(t, dtype=jnp.int32)[None]
  pos = context_lens.astype(jnp.int32)[:, None] + rows
  return jnp.where(rows < query_lens[:, None], pos, -1)


def _pallas(q, k_pages, v_pages, block_tables, lengths, sm_scale, impl, layer):
  # Imported here so the xla path works without the kernel module (and its Triton deps).
  from pallas_kernels.paged_attention import paged_attention

  if layer is not None:
    k_pages, v_pages = k_pages[layer], v_pages[layer]
  return paged_attention(
    q,
    k_pages,
    v_pages,
    block_tables.astype(jnp.int32),
    lengths.astype(jnp.int32),
    sm_scale=sm_scale,
    interpret=impl == "pallas_interpret",
  )


def _row_gather(table, rows):
  # table [R, W], rows int32[...] in [0, R) -> [..., W]; one contiguous row per index.
  dnums = lax.GatherDimensionNumbers(
    offset_dims=(rows.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
  )
  return lax.gather(
    table,
    rows[..., None],
    dnums,
    slice_sizes=(1, table.shape[1]),
    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _gather_f32(rows_table, rows):
  """Gathers rows of a [R, W] table as float32.

  16-bit tables travel as uint16: on a float table XLA rewrites convert(gather(x)) into
  gather(convert(x)) and hoists that convert of the whole pool out of the scan (the
  uint16 view is a copy on XLA:CPU too, but of half the bytes: measured 1.7x faster).
  """
  if rows_table.dtype.itemsize != 2:
    return _row_gather(rows_table, rows).astype(jnp.float32)
  bits = _row_gather(lax.bitcast_convert_type(rows_table, jnp.uint16), rows)
  return lax.bitcast_convert_type(bits, rows_table.dtype).astype(jnp.float32)


def _attention_xla(
  q, k_pages, v_pages, block_tables, q_pos, sm_scale, pages_per_step=None, *, layer=None
):
  """q [B, T, H, D], q_pos int32[B, T] (-1: padded row) -> [B, T, H, D].

  pages_per_step: block-table columns per scan step; None sizes a K chunk to
  _CHUNK_BYTES. layer: None for pages [Hkv, N, bs, D], else the layer of [L, Hkv, N, bs, D].
  """
  b, t, h, d = q.shape
  if layer is not None and k_pages.dtype.itemsize == 2:
    # 16-bit pools are gathered through a uint16 view, which XLA:CPU materialises:
    # view one layer, not all of them.
    k_pages, v_pages, layer = k_pages[layer], v_pages[layer], None
  hkv, n, bs, _ = k_pages.shape[-4:]
  g = h // hkv
  p = block_tables.shape[1]
  # Block-table columns per scan step, so one gathered K chunk is ~_CHUNK_BYTES.
  col_bytes = hkv * b * bs * d * k_pages.dtype.itemsize
  c = min(p, pages_per_step or max(1, _CHUNK_BYTES // col_bytes))
  steps = -(-p // c)
  # Rows of the [(L *) Hkv * N, bs * D] pool view. Table entries are clamped into range
  # (entries past a sequence's last page may hold anything; those positions are masked).
  pages = jnp.clip(block_tables.astype(jnp.int32), 0, n - 1)
  pages = jnp.pad(pages, ((0, 0), (0, steps * c - p)))  # [B, steps * c]
  first_row = 0 if layer is None else jnp.asarray(layer, jnp.int32) * (hkv * n)
  heads = jnp.arange(hkv, dtype=jnp.int32)[:, None, None] * n + first_row
  rows = heads + pages[None]  # [Hkv, B, steps*c]
  rows = rows.reshape(hkv, b, steps, c).transpose(2, 0, 1, 3)  # [steps, Hkv, B, c]
  # [L * Hkv * N, bs * D] (a free reshape): a page of one head is one contiguous row.
  k_rows = k_pages.reshape(-1, bs * d)
  v_rows = v_pages.reshape(-1, bs * d)
  # [Hkv, B, G*T, D]: the query heads of one kv head and all their tokens together.
  qg = q.reshape(b, t, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv, b, g * t, d)
  qg = qg.astype(jnp.float32)
  q_pos_g = jnp.tile(q_pos, (1, g))[None]  # [1, B, G*T] same order as qg rows

  def step(i, carry):
    m, l, acc = carry  # [Hkv, B, G*T], [Hkv, B, G*T], [Hkv, B, G*T, D]
    rows_c = lax.dynamic_index_in_dim(rows, i, keepdims=False)  # [Hkv, B, c]
    first = i * (c * bs)
    # float32 chunks: XLA:CPU upcasts bfloat16 dot operands anyway; doing it here on a
    # small chunk avoids a full-size convert.
    k = _gather_f32(k_rows, rows_c).reshape(hkv, b, c * bs, d)  # [Hkv, B, c*bs, D]
    v = _gather_f32(v_rows, rows_c).reshape(hkv, b, c * bs, d)
    kv_pos = first + jnp.arange(c * bs, dtype=jnp.int32)  # [c*bs]
    mask = kv_pos[None, None, None, :] <= q_pos_g[..., None]  # [1, B, G*T, c*bs]
    s = jnp.einsum("hbqd,hbkd->hbqk", qg, k)
    s = jnp.where(mask, s * sm_scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw no key yet
    prob = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    corr = jnp.exp(m - m_safe)
    # Keys no query may see: zero V so that stale/NaN pages cannot leak via 0 * NaN.
    seen = kv_pos[None, :] <= q_pos.max(1)[:, None]  # [B, c*bs]
    v = jnp.where(seen[None, :, :, None], v, 0)
    pv = jnp.einsum("hbqk,hbkd->hbqd", prob, v)
    return m_new, l * corr + prob.sum(-1), acc * corr[..., None] + pv

  init = (
    jnp.full((hkv, b, g * t), -jnp.inf, jnp.float32),
    jnp.zeros((hkv, b, g * t), jnp.float32),
    jnp.zeros((hkv, b, g * t, d), jnp.float32),
  )
  # Only the chunks some query can see: the trip count follows the batch's longest
  # context, not the block-table width (padded to the model's whole context), so a
  # batch of short sequences reads a few chunks instead of all of them.
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
