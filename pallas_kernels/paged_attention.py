"""Paged-attention decode kernel in Pallas for the Triton-lowered GPU backend.

One query token per sequence attends over its K/V context, which lives in fixed-size
pages scattered through a page pool and is located through a block table (vLLM's
PagedAttention). The kernel runs on GPU through the Pallas Triton lowering and on CPU
in interpret mode (the tests). `paged_attention_reference` is the same computation in
plain jnp: gather the pages into contiguous K/V, masked softmax in float32.

Design:
  * Grid (batch, num_kv_heads, k_splits). One program handles every query head of one
    kv head (the GQA group), so each K/V page is read once per kv head, not once per
    query head. The group is padded to >= 16 rows because Triton's `tl.dot` needs
    M >= 16; decode is memory bound, so the idle MMA rows cost nothing that matters,
    whereas an elementwise multiply-reduce would need a [group, block_k, head_dim]
    register tile.
  * The page pool of the kv head is passed whole (no blocking on the page axis); each
    loop step gathers `pages_per_compute_block` pages through the block table into one
    [block_k, head_dim] tile and folds it into an online softmax in float32.
  * k_splits > 1 (split-K / flash-decoding) splits the block table over a grid axis so
    short batches still fill the GPU; each split writes its normalised output with its
    row max `m` and denominator `l`, and a log-sum-exp combine in jnp merges them.
  * Quantized pages (int8 or float8_e4m3fn, with one float32 scale per token and kv
    head: real value = values * scale) are read as they are stored: each step gathers
    the [block_k] scale tile through the same page ids as the page tile and applies
    it outside the dots, to the score columns (q . k_values) * k_scale and to the
    probabilities (p * v_scale) . v_values, which equals dequantizing the tiles but
    costs [group_pad, block_k] multiplies instead of [block_k, head_dim]. The values
    are converted exactly to q's dtype (float32, or bfloat16 / float16) for the dot,
    in registers: HBM traffic stays 1 byte per element. The Pallas Triton lowering
    casts float8_e4m3fn only on compute capability >= 8.9 (Ada, Hopper); int8 works
    everywhere.

It does not do prefill (several query tokens per sequence) or logit soft-capping.
"""

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

# tl.dot needs every matrix dimension >= 16.
MIN_DOT_DIM = 16
# Keys per compute block when pages_per_compute_block is not given.
DEFAULT_BLOCK_K = 64
# Initial running max: finite, so exp(m_old - m_new) is 0, never NaN, even when no
# key has been seen yet (empty splits, length 0).
_M_INIT = float(jnp.finfo(jnp.float32).min)
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Page dtypes that carry per-token float32 scales (q then stays in _SUPPORTED_DTYPES).
QUANTIZED_DTYPES = (jnp.int8, jnp.float8_e4m3fn)


def paged_attention_kernel(
    q_ref,  # [group_pad, head_dim] query heads of one kv head
    k_pages_ref,  # [num_pages, page_size, head_dim] page pool of that kv head
    v_pages_ref,  # [num_pages, page_size, head_dim]
    block_table_ref,  # [pages_per_split] physical page ids of this split
    length_ref,  # [1] context length of this sequence
    o_ref,  # [group_pad, head_dim] normalised output of this split
    *stats_refs,  # k_splits > 1 only: m_ref [group_pad], l_ref [group_pad] (float32)
    sm_scale: float,
    pages_per_compute_block: int,
    k_scales_ref=None,  # quantized pages only: [num_pages, page_size] float32
    v_scales_ref=None,  # [num_pages, page_size] float32
):
  """Online-softmax attention of one GQA group over one split of a block table.

  With k_scales_ref / v_scales_ref the pages are int8 or float8_e4m3fn values whose
  real value is values * scale (one scale per token).
  """
  group_pad, head_dim = q_ref.shape
  page_size = k_pages_ref.shape[1]
  pages_per_split = block_table_ref.shape[0]
  block_k = pages_per_compute_block * page_size

  quantized = k_scales_ref is not None
  length = length_ref[0]
  first_page = pl.program_id(2) * pages_per_split
  # Pages of this split that hold at least one position < length.
  num_pages = jnp.minimum(
      jnp.maximum(pl.cdiv(length, page_size) - first_page, 0), pages_per_split)
  q = q_ref[...]

  def body(i, carry):
    acc, m, l = carry  # [group_pad, head_dim], [group_pad], [group_pad]
    page = i * pages_per_compute_block  # local page index within the split
    page_ids = block_table_ref[pl.ds(page, pages_per_compute_block)]
    # Table entries past the last page may be padding (even out of range): read page
    # 0 instead; every position there is masked below.
    page_in_use = page + jnp.arange(pages_per_compute_block) < num_pages
    page_ids = jnp.where(page_in_use, page_ids, 0)
    k = k_pages_ref[page_ids].reshape(block_k, head_dim)
    v = v_pages_ref[page_ids].reshape(block_k, head_dim)
    valid = (first_page + page) * page_size + jnp.arange(block_k) < length  # [block_k]
    if quantized:
      # Scales of unused slots may be garbage (NaN, inf): zero them like V below.
      k_scale = jnp.where(valid, k_scales_ref[page_ids].reshape(block_k), 0.0)
      v_scale = jnp.where(valid, v_scales_ref[page_ids].reshape(block_k), 0.0)
      # int8 and float8_e4m3fn convert exactly to float32, bfloat16 and float16.
      k, v = k.astype(q.dtype), v.astype(q.dtype)

    s = lax.dot_general(  # [group_pad, block_k]; HIGHEST: IEEE f32, not TF32.
        q, k, (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if quantized:
      s = s * k_scale[None, :]  # (q . k_values) * k_scale == q . (k_values * k_scale)
    s = jnp.where(valid[None, :], s * sm_scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l_new = l * alpha + p.sum(axis=1)
    # p is 0 at masked positions, but 0 * NaN garbage in V would still be NaN.
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
    if quantized:
      p = p * v_scale[None, :]  # (p * v_scale) . v_values == p . (v_values * v_scale)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l_new

  init = (
      jnp.zeros((group_pad, head_dim), jnp.float32),
      jnp.full((group_pad,), _M_INIT, jnp.float32),
      jnp.zeros((group_pad,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(
      0, pl.cdiv(num_pages, pages_per_compute_block), body, init)
  # l == 0 only when no position was seen: the output is then 0, not 0/0.
  o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
  if stats_refs:
    m_ref, l_ref = stats_refs
    m_ref[...] = m
    l_ref[...] = l


def _paged_attention_call(
    q,  # [batch, num_kv_heads, group_pad, head_dim]
    k_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    v_pages,  # [num_kv_heads, num_pages, page_size, head_dim]
    block_tables,  # i32[batch, k_splits * pages_per_split]
    lengths,  # i32[batch]
    k_scales=None,  # quantized pages only: f32[num_kv_heads, num_pages, page_size]
    v_scales=None,  # f32[num_kv_heads, num_pages, page_size]
    *,
    sm_scale: float,
    pages_per_compute_block: int,
    k_splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
):
  """pallas_call over (batch, kv head, split).

  Returns o [batch, num_kv_heads, group_pad, head_dim] in q.dtype when k_splits == 1,
  else (o, m, l): o [k_splits, batch, num_kv_heads, group_pad, head_dim] and
  m, l [k_splits, batch, num_kv_heads, group_pad], all float32. With scales, the
  pages are quantized and each kv head's scales are passed whole like its pages.
  """
  batch, num_kv_heads, group_pad, head_dim = q.shape
  _, num_pages, page_size, _ = k_pages.shape
  pages_per_split = block_tables.shape[1] // k_splits

  pages_spec = pl.BlockSpec(
      (None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
  in_specs = [
      pl.BlockSpec((None, None, group_pad, head_dim), lambda b, h, s: (b, h, 0, 0)),
      pages_spec,
      pages_spec,
      pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),
      pl.BlockSpec((1,), lambda b, h, s: (b,)),
  ]
  if k_splits == 1:
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    out_specs = pl.BlockSpec(
        (None, None, group_pad, head_dim), lambda b, h, s: (b, h, 0, 0))
  else:
    stats_shape = jax.ShapeDtypeStruct((k_splits, *q.shape[:-1]), jnp.float32)
    out_shape = (
        jax.ShapeDtypeStruct((k_splits, *q.shape), jnp.float32),
        stats_shape,
        stats_shape,
    )
    stats_spec = pl.BlockSpec(
        (None, None, None, group_pad), lambda b, h, s: (s, b, h, 0))
    out_specs = (
        pl.BlockSpec((None, None, None, group_pad, head_dim),
                     lambda b, h, s: (s, b, h, 0, 0)),
        stats_spec,
        stats_spec,
    )
  kernel = functools.partial(
      paged_attention_kernel,
      sm_scale=sm_scale,
      pages_per_compute_block=pages_per_compute_block,
  )
  inputs = [q, k_pages, v_pages, block_tables, lengths]
  if k_scales is not None:
    # The scale pools go right after the page pools; the kernel takes them by name.
    scales_spec = pl.BlockSpec(
        (None, num_pages, page_size), lambda b, h, s: (h, 0, 0))
    in_specs[3:3] = [scales_spec, scales_spec]
    inputs[3:3] = [k_scales, v_scales]
    kernel = functools.partial(with_scale_refs, kernel)
  return pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, k_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(
          num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"paged_attention_bk{pages_per_compute_block * page_size}",
  )(*inputs)


def with_scale_refs(kernel, q_ref, k_pages_ref, v_pages_ref, k_scales_ref, v_scales_ref,
                    *refs, **kwargs):
  """The refs of a quantized call (scale pools after the page pools) as `kernel`
  takes them: scales by keyword, every other ref where it is without scales."""
  return kernel(q_ref, k_pages_ref, v_pages_ref, *refs, k_scales_ref=k_scales_ref,
                v_scales_ref=v_scales_ref, **kwargs)


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def is_quantized(dtype) -> bool:
  """Whether pages of this dtype are quantized (int8 / float8_e4m3fn with scales)."""
  return jnp.dtype(dtype) in QUANTIZED_DTYPES


def check_pages_and_dtypes(q, k_pages, v_pages, k_scales=None, v_scales=None) -> None:
  """The checks both paged kernels share: K and V pages alike, one supported dtype,
  and scales exactly when the pages are quantized.

  Unquantized pages have q's dtype, one of float32, bfloat16, float16, and no scales.
  Quantized pages (both int8 or both float8_e4m3fn) need k_scales and v_scales,
  float32 and shaped like the pages without their last (head_dim) axis; q is then
  any of the three float dtypes.
  """
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"k_pages and v_pages shapes differ: {k_pages.shape} vs"
                     f" {v_pages.shape}")
  if not is_quantized(k_pages.dtype) or k_pages.dtype != v_pages.dtype:
    if not q.dtype == k_pages.dtype == v_pages.dtype:
      raise ValueError(f"q, k_pages, v_pages dtypes differ: {q.dtype}, {k_pages.dtype},"
                       f" {v_pages.dtype}")
    if k_scales is not None or v_scales is not None:
      raise ValueError(
          "k_scales / v_scales are only for int8 or float8_e4m3fn pages, got"
          f" {k_pages.dtype} pages with k_scales {_describe(k_scales)}, v_scales"
          f" {_describe(v_scales)}")
  else:
    scales_shape = k_pages.shape[:-1]
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
      if (scales is None or scales.shape != scales_shape
          or scales.dtype != jnp.float32):
        raise ValueError(
            f"{k_pages.dtype} pages {k_pages.shape} need {name} float32"
            f"{list(scales_shape)} (one scale per token and kv head), got"
            f" {_describe(scales)}")
  if q.dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {q.dtype}")


def _describe(x) -> str:
  """dtype[shape] of an array, or None."""
  return "None" if x is None else f"{x.dtype}{list(x.shape)}"


def _check_inputs(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales):
  """Raises ValueError on inconsistent ranks, shapes or dtypes."""
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {q.shape}")
  if k_pages.ndim != 4:
    raise ValueError("k_pages must be [num_kv_heads, num_pages, page_size, head_dim],"
                     f" got shape {k_pages.shape}")
  check_pages_and_dtypes(q, k_pages, v_pages, k_scales, v_scales)
  batch, num_heads, head_dim = q.shape
  num_kv_heads, num_pages, _, page_head_dim = k_pages.shape
  if num_pages < 1:
    raise ValueError(f"the page pool is empty: k_pages shape {k_pages.shape}")
  if page_head_dim != head_dim:
    raise ValueError(f"head_dim of q ({head_dim}) and pages ({page_head_dim}) differ")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads"
                     f" {num_kv_heads}")
  if block_tables.ndim != 2 or block_tables.shape[0] != batch:
    raise ValueError(f"block_tables must be [batch={batch}, pages_per_seq], got shape"
                     f" {block_tables.shape}")
  if block_tables.shape[1] < 1:
    raise ValueError(f"block_tables has no columns: shape {block_tables.shape}")
  if block_tables.dtype != jnp.int32:
    raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
  if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
    raise ValueError(f"lengths must be int32[{batch}], got {lengths.dtype}"
                     f"{list(lengths.shape)}")


def check_triton_head_and_page(head_dim: int, page_size: int) -> None:
  """The tile checks both paged kernels share: power-of-two head_dim >= MIN_DOT_DIM
  (tl.dot) and power-of-two page_size (Triton tensor sizes)."""
  if not _is_power_of_two(head_dim) or head_dim < MIN_DOT_DIM:
    raise ValueError(f"head_dim must be a power of two >= {MIN_DOT_DIM} for the Triton"
                     f" backend, got {head_dim}")
  if not _is_power_of_two(page_size):
    raise ValueError(f"page_size must be a power of two for the Triton backend, got"
                     f" {page_size}")


def _check_tiling(head_dim, page_size, pages_per_compute_block, k_splits):
  """Raises ValueError on tiles the Triton lowering cannot take.

  Triton tensors must have power-of-two sizes and tl.dot dimensions must be >= 16;
  without this check these surface as lowering errors from deep inside Pallas.
  """
  check_triton_head_and_page(head_dim, page_size)
  if not _is_power_of_two(pages_per_compute_block):
    raise ValueError("pages_per_compute_block must be a power of two, got"
                     f" {pages_per_compute_block}")
  block_k = page_size * pages_per_compute_block
  if block_k < MIN_DOT_DIM:
    raise ValueError(
        f"page_size * pages_per_compute_block = {page_size} * {pages_per_compute_block}"
        f" = {block_k} keys per block must be >= {MIN_DOT_DIM} for tl.dot")
  if k_splits < 1:
    raise ValueError(f"k_splits must be >= 1, got {k_splits}")


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "pages_per_compute_block", "k_splits", "num_warps",
                     "num_stages", "interpret"),
)
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    pages_per_compute_block: int | None = None,
    k_splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
  """Paged decode attention (GQA/MQA) with the Pallas Triton kernel.

  Query head h attends with kv head h // (num_heads // num_kv_heads). Sequence b's
  position t lives in page block_tables[b, t // page_size] at offset t % page_size.
  Positions >= lengths[b] are masked and never contribute, whatever the pages and the
  table hold there (garbage, NaN, out-of-range padding ids); a sequence of length 0
  gives zeros. lengths are clipped to [0, pages_per_seq * page_size].

  Quantized pages (int8 or float8_e4m3fn) come with per-token scales: key t of kv head
  h is k_pages[h, page, offset].astype(float32) * k_scales[h, page, offset] (V alike).
  Scales of masked positions never contribute either (they may be NaN). float8 pages
  need a GPU of compute capability >= 8.9 (the lowering refuses the cast below).

  Args:
    q: [batch, num_heads, head_dim] one query token per sequence, float32, bfloat16
      or float16.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key page pool, in q's
      dtype, or int8 / float8_e4m3fn with k_scales.
    v_pages: [num_kv_heads, num_pages, page_size, head_dim] value page pool, in
      k_pages' dtype.
    block_tables: int32[batch, pages_per_seq] physical page ids; the entries a
      sequence uses must lie in [0, num_pages).
    lengths: int32[batch] context length of each sequence.
    sm_scale: softmax scale applied to q.k (a Python float: it is static); default
      1 / sqrt(head_dim).
    k_scales: float32[num_kv_heads, num_pages, page_size] key scales; required with
      (and only with) int8 / float8_e4m3fn pages.
    v_scales: float32[num_kv_heads, num_pages, page_size] value scales, likewise.
    pages_per_compute_block: pages gathered per loop step, a power of two with
      page_size * pages_per_compute_block >= 16; default DEFAULT_BLOCK_K // page_size.
    k_splits: splits of the block table run in parallel and merged by log-sum-exp
      (flash-decoding); 1 computes the output in one pass.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    interpret: run the kernel in Pallas interpret mode (CPU, tests).

  Returns:
    [batch, num_heads, head_dim] attention output in q.dtype.

  Raises:
    ValueError: on inconsistent shapes or dtypes (scales missing for quantized
      pages, given for unquantized ones, or of the wrong shape or dtype), or tiles
      the Triton lowering cannot take (head_dim, page_size or
      pages_per_compute_block not a power of two, head_dim or
      page_size * pages_per_compute_block below 16).
  """
  _check_inputs(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales)
  batch, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  pages_per_seq = block_tables.shape[1]
  if pages_per_compute_block is None:
    pages_per_compute_block = max(1, DEFAULT_BLOCK_K // page_size)
  _check_tiling(head_dim, page_size, pages_per_compute_block, k_splits)
  group = num_heads // num_kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)

  # Query heads of a kv head are contiguous: [B, H, D] -> [B, Hkv, G, D], G padded to
  # a power of two >= 16 with zero rows (their outputs are dropped below).
  group_pad = max(MIN_DOT_DIM, pl.next_power_of_2(group))
  q_grouped = q.reshape(batch, num_kv_heads, group, head_dim)
  q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
  # Pad the table so each split holds whole compute blocks; the padding columns lie
  # past every (clipped) length, so the kernel never uses them as page ids.
  pages_per_split = pages_per_compute_block * pl.cdiv(
      pl.cdiv(pages_per_seq, k_splits), pages_per_compute_block)
  block_tables = jnp.pad(
      block_tables, ((0, 0), (0, k_splits * pages_per_split - pages_per_seq)))
  lengths = jnp.clip(lengths, 0, pages_per_seq * page_size)

  out = _paged_attention_call(
      q_grouped, k_pages, v_pages, block_tables, lengths, k_scales, v_scales,
      sm_scale=float(sm_scale),
      pages_per_compute_block=pages_per_compute_block,
      k_splits=k_splits,
      num_warps=num_warps,
      num_stages=num_stages,
      interpret=interpret,
  )
  if k_splits > 1:
    o, m, l = out  # [S, B, Hkv, Gp, D], [S, B, Hkv, Gp], [S, B, Hkv, Gp]
    # Weight of each split: its softmax denominator rescaled to the global max. Empty
    # splits have l == 0, so weight 0; all-empty rows (length 0) give 0, not NaN.
    weights = l * jnp.exp(m - m.max(axis=0))
    total = weights.sum(axis=0)  # [B, Hkv, Gp]
    out = (weights[..., None] * o).sum(axis=0) / jnp.where(total > 0, total, 1.0)[
        ..., None]
  return out[:, :, :group].reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
  """Paged decode attention in plain jnp: gather pages (dequantized, with scales),
  masked softmax in float32.

  Same contract as `paged_attention` (masked positions never contribute, even if
  their pages or scales hold NaN; length 0 gives zeros). Inputs are not checked.

  Args:
    q: [batch, num_heads, head_dim].
    k_pages: [num_kv_heads, num_pages, page_size, head_dim].
    v_pages: [num_kv_heads, num_pages, page_size, head_dim].
    block_tables: int32[batch, pages_per_seq].
    lengths: int32[batch].
    sm_scale: softmax scale; default 1 / sqrt(head_dim).
    k_scales: float32[num_kv_heads, num_pages, page_size] for quantized pages, else
      None.
    v_scales: likewise for v_pages.

  Returns:
    [batch, num_heads, head_dim] in q.dtype.
  """
  batch, num_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  pages_per_seq = block_tables.shape[1]
  group = num_heads // num_kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  seq_len = pages_per_seq * page_size

  def gather(pages, scales):  # -> [B, Hkv, T, D] float32
    x = pages[:, block_tables].astype(jnp.float32)  # [Hkv, B, P, page_size, D]
    if scales is not None:
      x = x * scales[:, block_tables][..., None]
    return x.reshape(num_kv_heads, batch, seq_len, head_dim).swapaxes(0, 1)

  valid = jnp.arange(seq_len)[None, :] < lengths[:, None]  # [B, T]
  return masked_attention(q, gather(k_pages, k_scales), gather(v_pages, v_scales),
                          valid, sm_scale)


def masked_attention(q, k, v, visible, sm_scale):
  """The reference core both kernels share: q [N, H, D] (N rows: sequences or query
  tokens), k / v [N, Hkv, S, D] float32 (each row's gathered context), visible bool
  [N, S]. Masked keys and values are zeroed before any product (stale or NaN pages
  never leak); a row that sees nothing gives zeros. Returns [N, H, D] in q.dtype."""
  n, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  k = jnp.where(visible[:, None, :, None], k, 0.0)
  v = jnp.where(visible[:, None, :, None], v, 0.0)
  qg = q.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim).astype(jnp.float32)
  s = jnp.einsum("nkgd,nksd->nkgs", qg, k, precision=lax.Precision.HIGHEST) * sm_scale
  s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # [N, Hkv, G, S]
  l = p.sum(axis=-1, keepdims=True)
  o = jnp.einsum("nkgs,nksd->nkgd", p, v, precision=lax.Precision.HIGHEST)
  o = o / jnp.where(l > 0, l, 1.0)
  return o.reshape(q.shape).astype(q.dtype)
