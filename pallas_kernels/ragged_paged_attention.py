"""Ragged paged attention in Pallas for the Triton-lowered GPU backend.

One launch computes causal attention for a packed batch that mixes prefill chunks and
decodes (vLLM V1 style): sequence i owns the query rows cu_q_lens[i]:cu_q_lens[i+1]
of q, and its K/V context, this step's tokens included, lives in pages of a page pool
located through a block table. Query token j of sequence i sits at position
kv_lens[i] - q_len_i + j and attends to every position <= its own. The kernel runs on
GPU through the Pallas Triton lowering and on CPU in interpret mode (the tests).
`ragged_paged_attention_reference` is the same computation in plain jnp.

Design (the layout of vLLM's Triton "unified attention" kernel):
  * Grid (q blocks, num_kv_heads). A q block is `block_q` consecutive query tokens of
    ONE sequence; sequence i's blocks start at global block cu_q_lens[i] // block_q + i,
    so a sequence never shares a block with another and no host-side metadata is
    needed. cdiv(num_tokens, block_q) + max_seqs blocks (static) are always enough;
    each program finds its sequence by a binary search over cu_q_lens in the kernel.
    Programs that land in the gap after a sequence's last block do nothing.
  * One program handles every query head of one kv head (the GQA group), so a K/V
    page is read once per kv head and q block. Its tile has block_q * group_pad rows
    (token-major, group padded to a power of two); Triton's `tl.dot` needs >= 16 rows.
  * q and the output are passed whole; the tile is read and written with masked
    loads/stores at a dynamic row offset, so rows of a neighbouring sequence are
    never overwritten and nothing is padded or copied in HBM.
  * The pools are passed whole per kv head, with a leading layer axis: the layer is
    indexed inside the kernel (a 4-D pool is viewed as one layer), so a traced layer
    inside lax.scan never makes XLA slice, i.e. copy, a layer's pool.
  * The kv loop covers only the keys the block's last valid query can see (causal),
    so its trip count depends on the sequence and block. Each step gathers
    `pages_per_compute_block` pages through the block table into one
    [block_k, head_dim] tile (entries past the last used page are redirected to page
    0) and folds it into an online softmax in float32. Scores are masked with
    `where` (causal and context length) and so is V: 0 * NaN from an unused slot
    would otherwise leak.
  * Output rows no sequence owns (past cu_q_lens[num_seqs]) are zeroed by the
    programs after the last real block, so the output needs no separate memset
    and never holds uninitialised memory.
  * Quantized pages (int8 or float8_e4m3fn, one float32 scale per token and kv head)
    as in paged_attention.py: the scale pools are passed whole per kv head and layer
    like the page pools (the layer indexed in the kernel, never sliced), each step
    gathers the [block_k] scale tile through the same page ids, and the scales are
    applied to the score columns and to the probabilities outside the dots; scales
    of invisible keys are masked with `where` too.

It does not do split-K over long contexts (a long decode is one program per kv head,
see paged_attention.py for flash-decoding), sliding windows, ALiBi, soft-capping, or
non-causal attention.
"""

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.paged_attention import (check_pages_and_dtypes, check_triton_head_and_page,
                                            masked_attention, with_scale_refs)

# tl.dot needs every matrix dimension >= 16.
MIN_DOT_DIM = 16
# Rows (query tokens x padded GQA group) per program when block_q is not given: the
# 16 of vLLM's unified attention, which keeps decodes (one token per sequence) from
# wasting most of the tile.
DEFAULT_BLOCK_M = 16
# Keys per compute block when pages_per_compute_block is not given.
DEFAULT_BLOCK_K = 64
# Initial running max: finite, so exp(m_old - m_new) is 0, never NaN, even when no
# key has been seen yet (empty rows, length 0).
_M_INIT = float(jnp.finfo(jnp.float32).min)


def ragged_paged_attention_kernel(
    q_ref,  # [num_tokens, num_heads, head_dim] all query rows
    k_pages_ref,  # [num_layers, num_pages, page_size, head_dim] pools of one kv head
    v_pages_ref,  # [num_layers, num_pages, page_size, head_dim]
    kv_lens_ref,  # [max_seqs] context length of each sequence (this step included)
    block_tables_ref,  # [max_seqs, pages_per_seq] physical page ids
    cu_q_lens_ref,  # [max_seqs + 1] cumulative query lengths
    num_seqs_ref,  # [1] number of valid sequences
    layer_ref,  # [1] layer of the pools to read
    o_ref,  # [num_tokens, num_heads, head_dim] all output rows
    *,
    sm_scale: float,
    block_q: int,
    group: int,
    group_pad: int,
    pages_per_compute_block: int,
    k_scales_ref=None,  # quantized pages only: [num_layers, num_pages, page_size] f32
    v_scales_ref=None,  # [num_layers, num_pages, page_size] float32
):
  """Online-softmax causal attention of one q block and one GQA group.

  With k_scales_ref / v_scales_ref the pages are int8 or float8_e4m3fn values whose
  real value is values * scale (one scale per token).
  """
  num_tokens, _, head_dim = q_ref.shape
  num_layers, _, page_size, _ = k_pages_ref.shape
  max_seqs, pages_per_seq = block_tables_ref.shape
  block_k = pages_per_compute_block * page_size
  block_m = block_q * group_pad
  q_block, kv_head = pl.program_id(0), pl.program_id(1)
  quantized = k_scales_ref is not None

  num_seqs = jnp.clip(num_seqs_ref[0], 0, max_seqs)

  def first_block(i):  # Global index of sequence i's first q block.
    return cu_q_lens_ref[i] // block_q + i

  def search(_, bounds):  # Largest i in [0, num_seqs] with first_block(i) <= q_block.
    lo, hi = bounds
    mid = (lo + hi + 1) // 2
    right = first_block(mid) <= q_block
    return jnp.where(right, mid, lo), jnp.where(right, hi, mid - 1)

  seq, _ = lax.fori_loop(
      0, max_seqs.bit_length(), search, (jnp.int32(0), num_seqs))
  # seq == num_seqs: past the last real block; those programs zero the padding rows
  # cu_q_lens[num_seqs]:num_tokens, block_q at a time.
  is_padding = seq == num_seqs
  q_start = cu_q_lens_ref[seq]
  q_end = jnp.where(is_padding, num_tokens,
                    cu_q_lens_ref[jnp.minimum(seq + 1, max_seqs)])
  q_len = q_end - q_start
  local_start = (q_block - first_block(seq)) * block_q  # first token of the block
  row_start = q_start + local_start
  # Valid tokens of this block (0 in the gap after a sequence's last block).
  num_rows = jnp.clip(jnp.minimum(q_len, num_tokens - q_start) - local_start, 0,
                      block_q)
  kv_len = jnp.where(
      is_padding, 0,
      jnp.clip(kv_lens_ref[jnp.minimum(seq, max_seqs - 1)], 0,
               pages_per_seq * page_size))
  context_start = kv_len - q_len  # position of the sequence's first query token
  # Keys [0, kv_end) are visible to the block's last valid token.
  kv_end = jnp.where(num_rows > 0,
                     jnp.clip(context_start + local_start + num_rows, 0, kv_len), 0)
  num_used_pages = pl.cdiv(kv_end, page_size)
  layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

  token = jnp.arange(block_q)
  head = jnp.arange(group_pad)
  tile_mask = ((token < num_rows)[:, None, None]
               & (head < group)[None, :, None])  # [block_q, group_pad, 1]
  tile_at = (pl.ds(row_start, block_q), pl.ds(kv_head * group, group_pad),
             slice(None))
  q = plgpu.load(q_ref.at[tile_at], mask=tile_mask, other=0)
  q = q.reshape(block_m, head_dim)
  # Position of each tile row (row r is token r // group_pad of the block).
  q_pos = context_start + local_start + jnp.arange(block_m) // group_pad  # [block_m]

  def body(i, carry):
    acc, m, l = carry  # [block_m, head_dim], [block_m], [block_m]
    page = i * pages_per_compute_block + jnp.arange(pages_per_compute_block)
    # Table entries past the last used page may be padding (even out of range): read
    # page 0 instead; every position there is masked below.
    page_ids = block_tables_ref[seq, jnp.minimum(page, pages_per_seq - 1)]
    page_ids = jnp.where(page < num_used_pages, page_ids, 0)
    k = k_pages_ref[layer, page_ids].reshape(block_k, head_dim)
    v = v_pages_ref[layer, page_ids].reshape(block_k, head_dim)
    k_pos = i * block_k + jnp.arange(block_k)  # [block_k]
    in_context = k_pos < kv_end  # [block_k]
    if quantized:
      # Scales of unused slots may be garbage (NaN, inf): zero them like V below.
      k_scale = jnp.where(
          in_context, k_scales_ref[layer, page_ids].reshape(block_k), 0.0)
      v_scale = jnp.where(
          in_context, v_scales_ref[layer, page_ids].reshape(block_k), 0.0)
      # int8 and float8_e4m3fn convert exactly to float32, bfloat16 and float16.
      k, v = k.astype(q.dtype), v.astype(q.dtype)

    s = lax.dot_general(  # [block_m, block_k]; HIGHEST: IEEE f32, not TF32.
        q, k, (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if quantized:
      s = s * k_scale[None, :]  # (q . k_values) * k_scale == q . (k_values * k_scale)
    # Causal, and never past kv_end: rows past num_rows (q loaded as 0, output not
    # stored) then see keys < kv_end only, which hold real data, so stay finite.
    visible = (k_pos[None, :] <= q_pos[:, None]) & in_context[None, :]
    s = jnp.where(visible, s * sm_scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l_new = l * alpha + p.sum(axis=1)
    # p is 0 at masked positions, but 0 * NaN garbage in V would still be NaN.
    v = jnp.where(in_context[:, None], v, jnp.zeros_like(v))
    if quantized:
      p = p * v_scale[None, :]  # (p * v_scale) . v_values == p . (v_values * v_scale)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l_new

  init = (
      jnp.zeros((block_m, head_dim), jnp.float32),
      jnp.full((block_m,), _M_INIT, jnp.float32),
      jnp.zeros((block_m,), jnp.float32),
  )
  acc, _, l = lax.fori_loop(0, pl.cdiv(kv_end, block_k), body, init)
  # l == 0 only when no position was seen: the output is then 0, not 0/0.
  o = acc / jnp.where(l > 0, l, 1.0)[:, None]
  o = o.reshape(block_q, group_pad, head_dim).astype(o_ref.dtype)
  plgpu.store(o_ref.at[tile_at], o, mask=tile_mask)


def _ragged_paged_attention_call(
    q,  # [num_tokens, num_heads, head_dim]
    k_pages,  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    kv_lens,  # i32[max_seqs]
    block_tables,  # i32[max_seqs, pages_per_seq]
    cu_q_lens,  # i32[max_seqs + 1]
    num_seqs,  # i32[1]
    layer,  # i32[1]
    k_scales=None,  # quantized pages only: f32[num_layers, num_kv_heads, num_pages,
    #                 page_size]
    v_scales=None,  # f32[num_layers, num_kv_heads, num_pages, page_size]
    *,
    sm_scale: float,
    block_q: int,
    pages_per_compute_block: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
):
  """pallas_call over (q block, kv head); returns [num_tokens, num_heads, head_dim].

  With scales, the pages are quantized and each kv head's scales (all layers) are
  passed whole like its pages.
  """
  num_tokens, num_heads, head_dim = q.shape
  num_layers, num_kv_heads, num_pages, page_size, _ = k_pages.shape
  max_seqs = block_tables.shape[0]
  group = num_heads // num_kv_heads
  # Upper bound on the q blocks: sequence i's blocks start at cu_q_lens[i] // block_q
  # + i, and the padding rows after cu_q_lens[num_seqs] need cdiv(., block_q) more.
  num_q_blocks = pl.cdiv(num_tokens, block_q) + max_seqs

  def whole(x):  # The whole array in every program.
    return pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)

  pages_spec = pl.BlockSpec(
      (num_layers, None, num_pages, page_size, head_dim),
      lambda b, h: (0, h, 0, 0, 0))
  kernel = functools.partial(
      ragged_paged_attention_kernel,
      sm_scale=sm_scale,
      block_q=block_q,
      group=group,
      group_pad=pl.next_power_of_2(group),
      pages_per_compute_block=pages_per_compute_block,
  )
  in_specs = [
      whole(q), pages_spec, pages_spec, whole(kv_lens), whole(block_tables),
      whole(cu_q_lens), whole(num_seqs), whole(layer),
  ]
  inputs = [q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, layer]
  if k_scales is not None:
    # The scale pools go right after the page pools; the kernel takes them by name.
    scales_spec = pl.BlockSpec(
        (num_layers, None, num_pages, page_size), lambda b, h: (0, h, 0, 0))
    in_specs[3:3] = [scales_spec, scales_spec]
    inputs[3:3] = [k_scales, v_scales]
    kernel = functools.partial(with_scale_refs, kernel)
  return pl.pallas_call(
      kernel,
      grid=(num_q_blocks, num_kv_heads),
      in_specs=in_specs,
      out_specs=whole(q),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"ragged_paged_attention_bq{block_q}_bk{pages_per_compute_block * page_size}",
  )(*inputs)


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                  layer, k_scales, v_scales):
  """Raises ValueError on inconsistent ranks, shapes or dtypes."""
  if q.ndim != 3:
    raise ValueError(
        f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
  if layer is None and k_pages.ndim != 4:
    raise ValueError("k_pages must be [num_kv_heads, num_pages, page_size, head_dim]"
                     f" (or 5-D with layer=), got shape {k_pages.shape}")
  if layer is not None and k_pages.ndim != 5:
    raise ValueError("with layer=, k_pages must be [num_layers, num_kv_heads,"
                     f" num_pages, page_size, head_dim], got shape {k_pages.shape}")
  check_pages_and_dtypes(q, k_pages, v_pages, k_scales, v_scales)
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, num_pages, _, page_head_dim = k_pages.shape[-4:]
  if num_tokens < 1:
    raise ValueError(f"q has no tokens: shape {q.shape}")
  if num_pages < 1:
    raise ValueError(f"the page pool is empty: k_pages shape {k_pages.shape}")
  if layer is not None and k_pages.shape[0] < 1:
    raise ValueError(f"the pools have no layer: k_pages shape {k_pages.shape}")
  if page_head_dim != head_dim:
    raise ValueError(f"head_dim of q ({head_dim}) and pages ({page_head_dim}) differ")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads"
                     f" {num_kv_heads}")
  if block_tables.ndim != 2 or block_tables.shape[0] < 1 or block_tables.shape[1] < 1:
    raise ValueError("block_tables must be [max_seqs, pages_per_seq] with both >= 1,"
                     f" got shape {block_tables.shape}")
  if block_tables.dtype != jnp.int32:
    raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
  max_seqs = block_tables.shape[0]
  for name, x, shape in (("kv_lens", kv_lens, (max_seqs,)),
                         ("cu_q_lens", cu_q_lens, (max_seqs + 1,)),
                         ("num_seqs", num_seqs, (1,))):
    if x.shape != shape or x.dtype != jnp.int32:
      raise ValueError(f"{name} must be int32{list(shape)} (block_tables has shape"
                       f" {block_tables.shape}), got {x.dtype}{list(x.shape)}")
  if layer is not None:
    layer_shape, layer_dtype = jnp.shape(layer), jnp.result_type(layer)
    if layer_shape != () or not jnp.issubdtype(layer_dtype, jnp.integer):
      raise ValueError(f"layer must be an integer scalar, got {layer_dtype}"
                       f"{list(layer_shape)}")


def _check_tiling(head_dim, page_size, group_pad, block_q, pages_per_compute_block):
  """Raises ValueError on tiles the Triton lowering cannot take.

  Triton tensors must have power-of-two sizes and tl.dot dimensions must be >= 16;
  without this check these surface as lowering errors from deep inside Pallas.
  """
  check_triton_head_and_page(head_dim, page_size)
  if not _is_power_of_two(block_q):
    raise ValueError(f"block_q must be a power of two, got {block_q}")
  if block_q * group_pad < MIN_DOT_DIM:
    raise ValueError(
        f"block_q * padded GQA group = {block_q} * {group_pad} = {block_q * group_pad}"
        f" rows per program must be >= {MIN_DOT_DIM} for tl.dot")
  if not _is_power_of_two(pages_per_compute_block):
    raise ValueError("pages_per_compute_block must be a power of two, got"
                     f" {pages_per_compute_block}")
  block_k = page_size * pages_per_compute_block
  if block_k < MIN_DOT_DIM:
    raise ValueError(
        f"page_size * pages_per_compute_block = {page_size} * {pages_per_compute_block}"
        f" = {block_k} keys per block must be >= {MIN_DOT_DIM} for tl.dot")


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_q", "pages_per_compute_block", "num_warps",
                     "num_stages", "interpret"),
)
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    layer: jax.Array | int | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_compute_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
  """Causal paged attention (GQA/MQA) of a ragged batch of prefills and decodes.

  Sequence i (i < num_seqs[0]) owns the query rows cu_q_lens[i]:cu_q_lens[i+1] of q;
  with q_len_i = cu_q_lens[i+1] - cu_q_lens[i], its query token j sits at position
  kv_lens[i] - q_len_i + j and attends to the positions <= its own, which live in
  page block_tables[i, t // page_size] at offset t % page_size (this step's K/V must
  already be written there). Query head h attends with kv head
  h // (num_heads // num_kv_heads). Positions a query cannot see never contribute,
  whatever the pages and the table hold there (garbage, NaN, out-of-range padding
  ids). Rows past cu_q_lens[num_seqs[0]] and sequences with kv_len 0 give zeros.
  kv_lens are clipped to [0, pages_per_seq * page_size] and num_seqs to
  [0, max_seqs]; entries of sequences >= num_seqs are never read.

  Quantized pages (int8 or float8_e4m3fn) come with per-token scales: a key is
  k_pages[..., page, offset, :].astype(float32) * k_scales[..., page, offset] (V
  alike). Scales of positions a query cannot see never contribute either (they may
  be NaN). float8 pages need a GPU of compute capability >= 8.9 (the lowering refuses
  the cast below).

  Args:
    q: [num_tokens, num_heads, head_dim] query tokens of all sequences, packed;
      float32, bfloat16 or float16.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key page pool, or with
      `layer`, the pools of all layers [num_layers, num_kv_heads, num_pages,
      page_size, head_dim]; in q's dtype, or int8 / float8_e4m3fn with k_scales.
    v_pages: value page pool(s), shaped like k_pages, in k_pages' dtype.
    kv_lens: int32[max_seqs] context length of each sequence, this step's tokens
      included.
    block_tables: int32[max_seqs, pages_per_seq] physical page ids; the entries a
      sequence uses must lie in [0, num_pages).
    cu_q_lens: int32[max_seqs + 1] cumulative query lengths, cu_q_lens[0] == 0,
      non-decreasing up to num_seqs, cu_q_lens[num_seqs] <= num_tokens, and
      q_len_i <= kv_lens[i].
    num_seqs: int32[1] number of valid sequences.
    sm_scale: softmax scale applied to q.k (a Python float: it is static); default
      1 / sqrt(head_dim).
    k_scales: float32 key scales shaped like k_pages without head_dim
      ([num_kv_heads, num_pages, page_size], or [num_layers, ...] with `layer`: the
      layer is indexed inside the kernel for them too); required with (and only
      with) int8 / float8_e4m3fn pages.
    v_scales: value scales, likewise.
    layer: with 5-D pools, the layer to read: a Python int or an integer scalar
      array (may be traced, e.g. in lax.scan over layers); it is indexed inside the
      kernel, so no layer of the pools is ever copied. Out-of-range values are
      clamped to [0, num_layers). None: the pools are 4-D.
    interpret: run the kernel in Pallas interpret mode (CPU, tests).
    block_q: query tokens per program, a power of two with
      block_q * next_power_of_2(group) >= 16 (group = num_heads // num_kv_heads);
      default max(1, DEFAULT_BLOCK_M // next_power_of_2(group)).
    pages_per_compute_block: pages gathered per kv loop step, a power of two with
      page_size * pages_per_compute_block >= 16; default DEFAULT_BLOCK_K // page_size.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.

  Returns:
    [num_tokens, num_heads, head_dim] attention output in q.dtype.

  Raises:
    ValueError: on inconsistent ranks, shapes or dtypes (scales missing for
      quantized pages, given for unquantized ones, or of the wrong shape or dtype),
      or tiles the Triton lowering cannot take (head_dim, page_size, block_q or
      pages_per_compute_block not a power of two, head_dim, block_q * padded group
      or page_size * pages_per_compute_block below 16).
  """
  _check_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs,
                layer, k_scales, v_scales)
  num_heads, head_dim = q.shape[1:]
  num_kv_heads, _, page_size, _ = k_pages.shape[-4:]
  group_pad = pl.next_power_of_2(num_heads // num_kv_heads)
  if block_q is None:
    block_q = max(1, DEFAULT_BLOCK_M // group_pad)
  if pages_per_compute_block is None:
    pages_per_compute_block = max(1, DEFAULT_BLOCK_K // page_size)
  _check_tiling(head_dim, page_size, group_pad, block_q, pages_per_compute_block)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)

  if layer is None:
    # One layer: a leading unit axis is a free view (a bitcast), not a copy.
    k_pages, v_pages = k_pages[None], v_pages[None]
    if k_scales is not None:
      k_scales, v_scales = k_scales[None], v_scales[None]
    layer = 0
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  return _ragged_paged_attention_call(
      q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, layer,
      k_scales, v_scales,
      sm_scale=float(sm_scale),
      block_q=block_q,
      pages_per_compute_block=pages_per_compute_block,
      num_warps=num_warps,
      num_stages=num_stages,
      interpret=interpret,
  )


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
  """Ragged paged attention in plain jnp: gather each token's context (dequantized,
  with scales), masked causal softmax in float32.

  Same contract as `ragged_paged_attention` (masked positions never contribute, even
  if their pages or scales hold NaN; rows no sequence owns and empty contexts give
  zeros). Inputs are not checked.

  Args:
    q: [num_tokens, num_heads, head_dim].
    k_pages: [num_kv_heads, num_pages, page_size, head_dim], or 5-D with `layer`.
    v_pages: shaped like k_pages.
    kv_lens: int32[max_seqs].
    block_tables: int32[max_seqs, pages_per_seq].
    cu_q_lens: int32[max_seqs + 1].
    num_seqs: int32[1].
    sm_scale: softmax scale; default 1 / sqrt(head_dim).
    k_scales: float32, k_pages' shape without head_dim, for quantized pages; else
      None.
    v_scales: likewise for v_pages.
    layer: the layer of 5-D pools (clamped to range); None for 4-D pools.

  Returns:
    [num_tokens, num_heads, head_dim] in q.dtype.
  """
  if layer is not None:
    num_layers = k_pages.shape[0]
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1)
    k_pages, v_pages = k_pages[layer], v_pages[layer]
    if k_scales is not None:
      k_scales, v_scales = k_scales[layer], v_scales[layer]
  num_tokens, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  max_seqs, pages_per_seq = block_tables.shape
  group = num_heads // num_kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  seq_len = pages_per_seq * page_size

  n = jnp.clip(num_seqs[0], 0, max_seqs)
  seq_ids = jnp.arange(max_seqs)
  # Ends of the valid sequences; padding sequences never own a row.
  q_ends = jnp.where(seq_ids < n, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
  tokens = jnp.arange(num_tokens)
  seq = jnp.minimum(jnp.searchsorted(q_ends, tokens, side="right"), max_seqs - 1)
  owned = tokens < jnp.where(n > 0, cu_q_lens[n], 0)  # [T]
  kv_len = jnp.clip(kv_lens, 0, seq_len)[seq]  # [T]
  q_len = (cu_q_lens[1:] - cu_q_lens[:-1])[seq]
  q_pos = kv_len - q_len + tokens - cu_q_lens[seq]  # [T]

  # Every token's whole context: [T, Hkv, seq_len, D], float32.
  page_ids = block_tables[seq]  # [T, pages_per_seq]
  def gather(pages, scales):
    x = pages[:, page_ids].astype(jnp.float32)  # [Hkv, T, P, page_size, D]
    if scales is not None:
      x = x * scales[:, page_ids][..., None]
    return x.reshape(num_kv_heads, num_tokens, seq_len, head_dim).swapaxes(0, 1)

  k_pos = jnp.arange(seq_len)
  visible = (owned[:, None] & (k_pos[None, :] <= q_pos[:, None])
             & (k_pos[None, :] < kv_len[:, None]))  # [T, seq_len]
  return masked_attention(q, gather(k_pages, k_scales), gather(v_pages, v_scales),
                          visible, sm_scale)
