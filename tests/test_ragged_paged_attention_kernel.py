"""Tests of the Pallas ragged paged-attention kernel (mixed prefill + decode).

On CPU the kernel runs in Pallas interpret mode, so every distinct shape compiles an
interpreter program (~1-3 s): the grid below is a chosen list that covers each page
size, head_dim, GQA ratio, dtype and tiling rather than their full cross. The CUDA
lowering, which is cheap, is checked on a wider cross.

The interpreter runs the programs in grid order and clamps out-of-range gathers,
which would hide write races and stray reads that a GPU would not forgive; two tests
patch the kernel module to walk the grid backwards and to record every index the
kernel reads. Quantized (int8 / float8_e4m3fn) pages have their own section at the end.
"""

import functools
import re
import types

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.runner.kv_cache import dequantize_kv
from quantized_pages import QUANT_DTYPES, QUANT_ERROR, quantize_case, quantized_shapes
from pallas_kernels import ragged_paged_attention as rpa

# Run the compiled kernel where a GPU is present, the interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
INT32_MAX = np.iinfo(np.int32).max
NUM_PADDING_SEQS = 2
NUM_PADDING_TOKENS = 5


def _sequences(page_size, pages_per_seq):
  """(q_len, kv_len) of the valid sequences of a case, and the fork pair."""
  ps = page_size
  seqs = [
      (1, ps + 3),  # decode
      (ps + 5, ps + 5),  # prefill chunk from position 0, over two pages
      (0, ps),  # no query this step: contributes nothing, its pages are never read
      (5, 2 * ps + 1),  # chunk in the middle of a context
      (1, 2 * ps),  # decode ending exactly on a page boundary
      (0, 0),  # empty
      (3, pages_per_seq * ps),  # chunk filling the whole table
      (1, 1),  # a one-token prompt
  ]
  # Sequence 6 shares its first two (full) pages with sequence 3, as after a fork.
  return seqs, (3, 6)


def make_case(seed, *, page_size, head_dim, ratio, num_kv_heads, dtype,
              pages_per_seq, num_layers=None):
  """A packed batch of 8 sequences, 2 padding sequences and 5 padding rows.

  The valid sequences come in a random order. Table entries past a sequence's last
  page are padding (-1 or INT32_MAX); padding sequences have garbage kv_lens, table
  rows and cu_q_lens entries; every page slot that no query reads holds NaN.

  Returns:
    dict with the poisoned inputs q, k, v, kv_lens, block_tables, cu_q_lens,
    num_seqs, the pages k_clean, v_clean with NaN replaced by 0 for the reference,
    and the number of rows the sequences own. With num_layers, k, v, k_clean,
    v_clean are pools of that many layers, each layer with its own values.
  """
  rng = np.random.default_rng(seed)
  seqs, (fork_src, fork_dst) = _sequences(page_size, pages_per_seq)
  order = rng.permutation(len(seqs))
  q_lens = np.array([seqs[i][0] for i in order], np.int32)
  kv_lens = np.array([seqs[i][1] for i in order], np.int32)
  num_seqs = len(seqs)
  max_seqs = num_seqs + NUM_PADDING_SEQS
  num_pages = max_seqs * pages_per_seq + 3
  block_tables = rng.permutation(num_pages)[:max_seqs * pages_per_seq].reshape(
      max_seqs, pages_per_seq).astype(np.int32)
  src, dst = np.argsort(order)[[fork_src, fork_dst]]
  block_tables[dst, :2] = block_tables[src, :2]
  read = np.zeros((num_pages, page_size), bool)  # slots some query reads
  for b in range(num_seqs):
    pages_used = -(-kv_lens[b] // page_size)
    block_tables[b, pages_used:] = -1 if b % 2 else INT32_MAX
    if q_lens[b]:
      positions = np.arange(kv_lens[b])
      read[block_tables[b, positions // page_size], positions % page_size] = True
  block_tables[num_seqs:] = rng.integers(-5, INT32_MAX, block_tables[num_seqs:].shape)

  num_rows = int(q_lens.sum())
  num_tokens = num_rows + NUM_PADDING_TOKENS
  cu_q_lens = np.concatenate([[0], np.cumsum(q_lens), [3, 1000]]).astype(np.int32)
  kv_lens = np.concatenate([kv_lens, [999, -7]]).astype(np.int32)

  num_heads = ratio * num_kv_heads
  q = rng.standard_normal((num_tokens, num_heads, head_dim))
  pages_shape = (num_kv_heads, num_pages, page_size, head_dim)
  if num_layers is not None:
    pages_shape = (num_layers, *pages_shape)
  k_clean, v_clean = rng.standard_normal(pages_shape), rng.standard_normal(pages_shape)
  k, v = k_clean.copy(), v_clean.copy()
  k[..., ~read, :], v[..., ~read, :] = np.nan, np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return dict(
      q=cast(q), k=cast(k), v=cast(v), kv_lens=jnp.asarray(kv_lens),
      block_tables=jnp.asarray(block_tables), cu_q_lens=jnp.asarray(cu_q_lens),
      num_seqs=jnp.asarray([num_seqs], jnp.int32), k_clean=cast(k_clean),
      v_clean=cast(v_clean), num_rows=num_rows)


def _args(case, k="k", v="v"):
  return (case["q"], case[k], case[v], case["kv_lens"], case["block_tables"],
          case["cu_q_lens"], case["num_seqs"])


def _check_output(out, expected, case, dtype):
  q = case["q"]
  assert out.shape == q.shape and out.dtype == q.dtype
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all(), "NaN of an unused slot leaked"
  np.testing.assert_array_equal(out[case["num_rows"]:], 0.0)  # padding rows
  np.testing.assert_allclose(out, np.asarray(expected, np.float32),
                             atol=TOLERANCE[dtype], rtol=0)


# page_size, head_dim, gqa ratio, num_kv_heads, dtype, block_q,
# pages_per_compute_block, pages_per_seq, sm_scale
CASES = [
    # MHA, default tiles: 16-token blocks, 8 pages per step exceed the table.
    (8, 32, 1, 2, jnp.float32, None, None, 4, None),
    (8, 64, 4, 1, jnp.bfloat16, 4, 2, 4, None),
    # 2 tokens x 8 heads per program: every multi-token sequence spans many blocks.
    (8, 128, 8, 1, jnp.float32, 2, 4, 3, 0.3),
    # One page per step: many kv loop steps, two GQA groups.
    (16, 32, 4, 2, jnp.float32, 8, 1, 3, None),
    (16, 64, 1, 1, jnp.bfloat16, 32, 2, 3, None),
    (16, 128, 8, 1, jnp.bfloat16, None, None, 4, None),
    (32, 32, 8, 2, jnp.bfloat16, 4, 1, 3, 0.3),
    (32, 64, 1, 2, jnp.float32, 16, 1, 3, None),
    (32, 128, 4, 1, jnp.float32, None, 2, 3, None),
    # Group of 6 padded to 8: the tile reads past its kv head's query heads (masked).
    (16, 32, 6, 2, jnp.float32, 4, 1, 3, None),
    # A 64-token block is larger than the whole packed batch (29 rows).
    (8, 64, 2, 2, jnp.float32, 64, 2, 3, None),
]


@pytest.mark.parametrize(
    "page_size,head_dim,ratio,num_kv_heads,dtype,block_q,ppcb,pages_per_seq,sm_scale",
    CASES,
    ids=[f"bs{c[0]}-d{c[1]}-gqa{c[2]}x{c[3]}-{jnp.dtype(c[4]).name}-bq{c[5]}"
         f"-ppcb{c[6]}" for c in CASES],
)
def test_kernel_matches_reference(page_size, head_dim, ratio, num_kv_heads, dtype,
                                  block_q, ppcb, pages_per_seq, sm_scale):
  case = make_case(0, page_size=page_size, head_dim=head_dim, ratio=ratio,
                   num_kv_heads=num_kv_heads, dtype=dtype,
                   pages_per_seq=pages_per_seq)
  out = rpa.ragged_paged_attention(
      *_args(case), sm_scale=sm_scale, block_q=block_q,
      pages_per_compute_block=ppcb, interpret=INTERPRET)
  expected = rpa.ragged_paged_attention_reference(
      *_args(case, "k_clean", "v_clean"), sm_scale=sm_scale)
  _check_output(out, expected, case, dtype)


@pytest.fixture(scope="module")
def small_case():
  """The first CASES shape, whose interpreter program is then already compiled."""
  return make_case(3, page_size=8, head_dim=32, ratio=1, num_kv_heads=2,
                   dtype=jnp.float32, pages_per_seq=4)


def test_no_valid_sequence_gives_zeros(small_case):
  args = list(_args(small_case))
  for num_seqs in (0, -3):
    args[-1] = jnp.asarray([num_seqs], jnp.int32)
    out = rpa.ragged_paged_attention(*args, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_vllm_style_padding_and_num_seqs_past_max_seqs(small_case):
  """Padding sequences as vLLM writes them (kv_len 0, cu_q_lens repeating the last
  end) give the same output whether counted in num_seqs or not, and num_seqs past
  max_seqs is clipped."""
  c = small_case
  num_seqs = int(c["num_seqs"][0])
  q, k, v, kv_lens, block_tables, cu_q_lens, _ = _args(c)
  kv_lens = kv_lens.at[num_seqs:].set(0)
  cu_q_lens = cu_q_lens.at[num_seqs + 1:].set(c["num_rows"])
  expected = rpa.ragged_paged_attention(*_args(c), interpret=INTERPRET)
  for n in (num_seqs + NUM_PADDING_SEQS, 100):
    out = rpa.ragged_paged_attention(q, k, v, kv_lens, block_tables, cu_q_lens,
                                     jnp.asarray([n], jnp.int32), interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_output_does_not_depend_on_program_order(small_case, monkeypatch):
  """On GPU the programs run in any order, the interpreter runs them in grid order.
  With the q blocks walked backwards (pl.program_id(0) patched), the output is the
  same: no program writes rows another one owns (e.g. a block's rows past its
  sequence's last token, which belong to the next sequence)."""
  reversed_pl = types.SimpleNamespace(
      **{name: getattr(pl, name) for name in dir(pl) if not name.startswith("_")})
  # Only axis 0: the kv head also picks the pages' block through the BlockSpecs.
  reversed_pl.program_id = lambda axis: (
      pl.num_programs(0) - 1 - pl.program_id(0) if axis == 0
      else pl.program_id(axis))
  expected = rpa.ragged_paged_attention(*_args(small_case), interpret=INTERPRET)
  monkeypatch.setattr(rpa, "pl", reversed_pl)
  # jit caches traces by function: clear them so the patched module is traced,
  # and again after, so no later test reuses the patched program.
  jax.clear_caches()
  try:
    out = rpa.ragged_paged_attention(*_args(small_case), interpret=INTERPRET)
  finally:
    jax.clear_caches()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.fixture(scope="module")
def layered_case():
  """3 layers of pools; the poisoned slots are NaN in every layer."""
  return make_case(2, page_size=16, head_dim=32, ratio=4, num_kv_heads=2,
                   dtype=jnp.float32, pages_per_seq=3, num_layers=3)


class _RecordingRef:
  """A kernel ref whose integer indices are recorded (jax.debug.callback) on every
  read, so a test can see what the interpreter, which clamps or wraps out-of-range
  gathers where a GPU would read stray memory, hides."""

  def __init__(self, ref, name, log):
    self._ref, self._name, self._log = ref, name, log

  def __getattr__(self, attr):
    return getattr(self._ref, attr)

  def __getitem__(self, idx):
    ints = [i for i in idx if not isinstance(i, slice)]
    jax.debug.callback(
        lambda *i: self._log.append((self._name, [np.asarray(x) for x in i])), *ints)
    return self._ref[idx]


@pytest.mark.skipif(not INTERPRET, reason="records reads with host callbacks")
@pytest.mark.parametrize("pages_dtype", [None, jnp.int8], ids=["float32", "int8"])
def test_gathers_stay_in_bounds_and_follow_causality(layered_case, pages_dtype,
                                                     monkeypatch):
  """What the kernel reads, recorded: only layer `layer` of the 5-D pools, only
  pages in range (table entries past a sequence's last page, -1 or INT32_MAX, and
  padding sequences are never used as indices), only columns inside a table row,
  and for each q block only the kv blocks its last token can see (causal trip
  count), not the sequence's whole context. With quantized pages, the scales are
  read with exactly the pages' indices."""
  # 2-page compute blocks over 3-page tables: the last step of a long context
  # reaches past the table row, and short contexts leave a padding entry in a step.
  c, layer, block_q, pages_per_compute_block = layered_case, 1, 4, 2
  log = []
  kernel = rpa.ragged_paged_attention_kernel

  def recording_kernel(q, k, v, kv_lens, block_tables, *rest, **kwargs):
    for name in ("k_scales", "v_scales"):
      if kwargs.get(f"{name}_ref") is not None:
        kwargs[f"{name}_ref"] = _RecordingRef(kwargs[f"{name}_ref"], name, log)
    return kernel(q, _RecordingRef(k, "k", log), _RecordingRef(v, "v", log),
                  kv_lens, _RecordingRef(block_tables, "table", log), *rest, **kwargs)

  args, scales = list(_args(c)), {}
  if pages_dtype is not None:
    args[1], scales["k_scales"], *_ = quantize_case(c["k"], c["k_clean"], pages_dtype)
    args[2], scales["v_scales"], *_ = quantize_case(c["v"], c["v_clean"], pages_dtype)
  monkeypatch.setattr(rpa, "ragged_paged_attention_kernel", recording_kernel)
  jax.clear_caches()  # so that the patched kernel is traced, not a cached program
  try:
    out = rpa.ragged_paged_attention(*args, **scales, layer=layer, block_q=block_q,
                                     pages_per_compute_block=pages_per_compute_block,
                                     interpret=INTERPRET)
    jax.block_until_ready(out)
    jax.effects_barrier()
  finally:
    jax.clear_caches()
  _, num_kv_heads, num_pages, page_size, _ = c["k"].shape
  block_k = pages_per_compute_block * page_size
  num_seqs = int(c["num_seqs"][0])
  pages_per_seq = c["block_tables"].shape[1]
  reads = {name: [idx for n, idx in log if n == name]
           for name in ("k", "v", "table", "k_scales", "v_scales")}
  if pages_dtype is None:
    assert not reads["k_scales"] and not reads["v_scales"]
  else:
    for name in ("k", "v"):
      assert len(reads[f"{name}_scales"]) == len(reads[name])
      for (scale_layer, scale_ids), (read_layer, page_ids) in zip(
          reads[f"{name}_scales"], reads[name]):
        assert scale_layer == read_layer
        np.testing.assert_array_equal(scale_ids, page_ids)
  for read_layer, page_ids in reads["k"] + reads["v"]:
    assert read_layer == layer
    assert ((0 <= page_ids) & (page_ids < num_pages)).all(), page_ids
  for seq, columns in reads["table"]:
    assert 0 <= seq < num_seqs
    assert ((0 <= columns) & (columns < pages_per_seq)).all(), columns

  cu_q_lens, kv_lens = np.asarray(c["cu_q_lens"]), np.asarray(c["kv_lens"])
  steps = 0
  for b in range(num_seqs):
    q_len = cu_q_lens[b + 1] - cu_q_lens[b]
    for start in range(0, q_len, block_q):
      kv_end = kv_lens[b] - q_len + min(start + block_q, q_len)
      steps += -(-kv_end // block_k)
  assert len(reads["k"]) == len(reads["v"]) == len(reads["table"]) == (
      num_kv_heads * steps)


def test_layer_of_5d_pool_matches_4d_pool(layered_case):
  c = layered_case
  kwargs = dict(block_q=8, pages_per_compute_block=1, interpret=INTERPRET)
  tail = _args(c)[3:]
  per_layer = rpa.ragged_paged_attention(c["q"], c["k"][1], c["v"][1], *tail,
                                         **kwargs)
  as_int = rpa.ragged_paged_attention(c["q"], c["k"], c["v"], *tail, layer=1,
                                      **kwargs)
  traced = jax.jit(
      lambda layer: rpa.ragged_paged_attention(c["q"], c["k"], c["v"], *tail,
                                               layer=layer, **kwargs)
  )(jnp.int32(1))
  np.testing.assert_array_equal(np.asarray(as_int), np.asarray(per_layer))
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(per_layer))
  expected = rpa.ragged_paged_attention_reference(
      c["q"], c["k_clean"][1], c["v_clean"][1], *tail)
  _check_output(per_layer, expected, c, jnp.float32)


def test_layer_traced_in_scan_over_layers(layered_case):
  """lax.scan over the layers: each step reads its own layer of the pools."""
  c = layered_case
  tail = _args(c)[3:]

  def step(carry, layer):
    out = rpa.ragged_paged_attention(c["q"], c["k"], c["v"], *tail, layer=layer,
                                     block_q=8, pages_per_compute_block=1,
                                     interpret=INTERPRET)
    return carry, out

  _, outs = jax.lax.scan(step, None, jnp.arange(3, dtype=jnp.int32))
  for layer in range(3):
    expected = rpa.ragged_paged_attention_reference(
        c["q"], c["k_clean"], c["v_clean"], *tail, layer=layer)
    _check_output(outs[layer], expected, c, jnp.float32)


def test_reference_matches_dense_attention_per_sequence():
  """The reference (fed NaN-poisoned pages) equals causal softmax attention computed
  per sequence in float64 numpy."""
  case = make_case(1, page_size=4, head_dim=8, ratio=2, num_kv_heads=2,
                   dtype=jnp.float32, pages_per_seq=4)
  sm_scale = 0.7
  out = np.asarray(rpa.ragged_paged_attention_reference(*_args(case),
                                                        sm_scale=sm_scale))
  q, k_clean, v_clean = (np.asarray(case[n], np.float64)
                         for n in ("q", "k_clean", "v_clean"))
  kv_lens, block_tables, cu_q_lens = (np.asarray(case[n]) for n in (
      "kv_lens", "block_tables", "cu_q_lens"))
  page_size = k_clean.shape[2]
  expected = np.zeros_like(q)
  for b in range(int(case["num_seqs"][0])):
    q_rows = slice(cu_q_lens[b], cu_q_lens[b + 1])
    q_len, kv_len = cu_q_lens[b + 1] - cu_q_lens[b], kv_lens[b]
    if q_len == 0:
      continue  # owns no row
    positions = np.arange(kv_len)
    pages = block_tables[b, positions // page_size]
    keys = k_clean[:, pages, positions % page_size]  # [Hkv, kv_len, D]
    values = v_clean[:, pages, positions % page_size]
    q_pos = kv_len - q_len + np.arange(q_len)
    causal = positions[None, :] <= q_pos[:, None]  # [q_len, kv_len]
    for h in range(q.shape[1]):
      logits = q[q_rows, h] @ keys[h // 2].T * sm_scale
      logits = np.where(causal, logits, -np.inf)
      weights = np.exp(logits - logits.max(axis=1, keepdims=True))
      expected[q_rows, h] = weights @ values[h // 2] / weights.sum(axis=1)[:, None]
  assert case["num_rows"] < q.shape[0]  # padding rows stay 0
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def _shapes(num_tokens=40, num_heads=8, head_dim=64, num_kv_heads=2, num_pages=16,
            page_size=16, max_seqs=4, pages_per_seq=5, dtype=jnp.float32,
            num_layers=None):
  pages = (num_kv_heads, num_pages, page_size, head_dim)
  if num_layers is not None:
    pages = (num_layers, *pages)
  return dict(
      q=jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), dtype),
      k_pages=jax.ShapeDtypeStruct(pages, dtype),
      v_pages=jax.ShapeDtypeStruct(pages, dtype),
      kv_lens=jax.ShapeDtypeStruct((max_seqs,), jnp.int32),
      block_tables=jax.ShapeDtypeStruct((max_seqs, pages_per_seq), jnp.int32),
      cu_q_lens=jax.ShapeDtypeStruct((max_seqs + 1,), jnp.int32),
      num_seqs=jax.ShapeDtypeStruct((1,), jnp.int32),
  )


def _lower_for_cuda(shapes, layer=None, **kwargs):
  if layer is None:
    f = functools.partial(rpa.ragged_paged_attention, **kwargs)
    return jax.jit(f).trace(*shapes.values()).lower(lowering_platforms=("cuda",))
  f = lambda *args, layer: rpa.ragged_paged_attention(*args, layer=layer, **kwargs)
  return jax.jit(f).trace(*shapes.values(), layer=layer).lower(
      lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_lowers_for_cuda(page_size, head_dim, dtype):
  """The Triton lowering (no GPU needed) accepts the shapes of the grid."""
  for ratio, block_q in ((1, None), (4, None), (8, None), (1, 64), (6, 4)):
    shapes = _shapes(num_heads=2 * ratio, head_dim=head_dim, page_size=page_size,
                     dtype=dtype)
    hlo = _lower_for_cuda(shapes, block_q=block_q).as_text()
    assert "__gpu$xla.gpu.triton" in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layer", [2, jax.ShapeDtypeStruct((), jnp.int32)],
                         ids=["int", "traced"])
def test_layer_path_lowers_for_cuda_without_slicing_the_pool(layer, dtype):
  """The 5-D pools go into the Triton call as they are: no slice of a layer (an XLA
  copy of a whole layer's pool) happens outside the kernel."""
  hlo = _lower_for_cuda(_shapes(num_layers=3, dtype=dtype), layer=layer).as_text()
  [call] = [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]
  assert "(%arg0, %arg1, %arg2," in call  # q, k_pages, v_pages, unsliced
  outside = "\n".join(line for line in hlo.splitlines() if line != call)
  assert "slice" not in outside and "gather" not in outside


def test_triton_lowering_rejects_non_power_of_two_tiles():
  """Without the entry's checks such a shape fails deep in the Triton lowering."""
  s = jax.ShapeDtypeStruct
  pages = s((1, 2, 8, 16, 48), jnp.float32)  # [L, Hkv, P, page_size, D=48]
  args = (s((40, 8, 48), jnp.float32), pages, pages, s((4,), jnp.int32),
          s((4, 5), jnp.int32), s((5,), jnp.int32), s((1,), jnp.int32),
          s((1,), jnp.int32))
  f = functools.partial(rpa._ragged_paged_attention_call, sm_scale=1.0, block_q=4,
                        pages_per_compute_block=1, num_warps=4, num_stages=2,
                        interpret=False)
  with pytest.raises(Exception, match="power of 2"):
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("overrides,kwargs,match", [
    (dict(head_dim=48), {}, r"head_dim must be a power of two >= 16 .* got 48"),
    (dict(head_dim=8), {}, r"head_dim must be a power of two >= 16 .* got 8"),
    (dict(page_size=12), {}, r"page_size must be a power of two .* got 12"),
    ({}, dict(block_q=3), r"block_q must be a power of two, got 3"),
    # group 4: 2 tokens x 4 heads = 8 rows.
    ({}, dict(block_q=2), r"block_q \* padded GQA group = 2 \* 4 = 8 rows"),
    # group 3 pads to 4.
    (dict(num_heads=6), dict(block_q=2), r"= 2 \* 4 = 8 rows"),
    (dict(num_heads=2), dict(block_q=8), r"= 8 \* 1 = 8 rows"),
    (dict(page_size=8), dict(pages_per_compute_block=3),
     r"pages_per_compute_block must be a power of two, got 3"),
    (dict(page_size=8), dict(pages_per_compute_block=1), r"8 \* 1 = 8 keys"),
])
def test_untileable_shapes_raise_value_error(overrides, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _lower_for_cuda(_shapes(**overrides), **kwargs)


def _with(name, shape, dtype=None, **overrides):
  """_shapes(**overrides) with one argument replaced."""
  shapes = _shapes(**overrides)
  shapes[name] = jax.ShapeDtypeStruct(shape, dtype or shapes[name].dtype)
  return shapes


@pytest.mark.parametrize("shapes,layer,match", [
    (_with("q", (40, 64)), None,
     r"q must be \[num_tokens, num_heads, head_dim\], got shape \(40, 64\)"),
    (_with("q", (0, 8, 64)), None, r"q has no tokens: shape \(0, 8, 64\)"),
    (_with("k_pages", (16, 16, 64)), None,
     r"k_pages must be .* got shape \(16, 16, 64\)"),
    (_shapes(num_layers=3), None, r"k_pages must be .* got shape \(3, 2, 16, 16, 64\)"),
    (_shapes(), 0, r"with layer=, k_pages must be .* got shape \(2, 16, 16, 64\)"),
    (_shapes(num_layers=0), 0, r"pools have no layer: k_pages shape \(0, 2, 16,"),
    (_shapes(num_layers=3), jax.ShapeDtypeStruct((2,), jnp.int32),
     r"layer must be an integer scalar, got int32\[2\]"),
    (_shapes(num_layers=3), jax.ShapeDtypeStruct((), jnp.float32),
     r"layer must be an integer scalar, got float32\[\]"),
    (_with("v_pages", (2, 16, 8, 64)), None,
     r"shapes differ: \(2, 16, 16, 64\) vs \(2, 16, 8, 64\)"),
    (_with("k_pages", (2, 16, 16, 64), jnp.bfloat16), None,
     r"dtypes differ: float32, bfloat16, float32"),
    (_shapes(dtype=jnp.int32), None, r"dtype must be float32, bfloat16 or float16"),
    (_with("q", (40, 7, 64)), None, r"num_heads 7 is not a multiple of num_kv_heads 2"),
    (_with("q", (40, 8, 32)), None, r"head_dim of q \(32\) and pages \(64\) differ"),
    (_shapes(num_pages=0), None, r"page pool is empty: k_pages shape \(2, 0, 16, 64\)"),
    (_with("block_tables", (4,)), None,
     r"block_tables must be \[max_seqs, pages_per_seq\] .* got shape \(4,\)"),
    (_with("block_tables", (4, 0)), None, r"with both >= 1, got shape \(4, 0\)"),
    (_with("block_tables", (4, 5), jnp.float32), None,
     r"block_tables must be int32, got float32"),
    (_with("kv_lens", (5,)), None,
     r"kv_lens must be int32\[4\] \(block_tables has shape \(4, 5\)\), got int32\[5\]"),
    (_with("kv_lens", (4,), jnp.float32), None, r"got float32\[4\]"),
    (_with("cu_q_lens", (4,)), None, r"cu_q_lens must be int32\[5\] .* got int32\[4\]"),
    (_with("num_seqs", ()), None, r"num_seqs must be int32\[1\] .* got int32\[\]"),
])
def test_inconsistent_inputs_raise_value_error(shapes, layer, match):
  with pytest.raises(ValueError, match=match):
    _lower_for_cuda(shapes, layer=layer)


# Quantized pages: int8 / float8_e4m3fn values with one float32 scale per token
# (helpers in tests/quantized_pages.py).


def _quantized_args(case, pages_dtype):
  """(args, scales, clean_args, clean_scales): _args(case) with quantized poisoned
  pages and scale keywords, and the same unpoisoned."""
  kq, ks, kq_clean, ks_clean = quantize_case(case["k"], case["k_clean"], pages_dtype)
  vq, vs, vq_clean, vs_clean = quantize_case(case["v"], case["v_clean"], pages_dtype)
  args, tail = (case["q"], kq, vq), _args(case)[3:]
  return ((*args, *tail), dict(k_scales=ks, v_scales=vs),
          (case["q"], kq_clean, vq_clean, *tail),
          dict(k_scales=ks_clean, v_scales=vs_clean))


@pytest.mark.parametrize("pages_dtype", QUANT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantized_kernel_matches_reference(pages_dtype):
  """4-D pools against the reference on the same quantized pages; the NaN scales
  (and NaN or garbage values) of unused slots never leak."""
  case = make_case(0, page_size=8, head_dim=32, ratio=4, num_kv_heads=2,
                   dtype=jnp.float32, pages_per_seq=4)
  args, scales, clean_args, clean_scales = _quantized_args(case, pages_dtype)
  out = rpa.ragged_paged_attention(*args, **scales, block_q=4,
                                   pages_per_compute_block=2, interpret=INTERPRET)
  expected = rpa.ragged_paged_attention_reference(*clean_args, **clean_scales)
  _check_output(out, expected, case, jnp.float32)


def test_quantized_layer_of_5d_pool(layered_case):
  """float8 pools and scales of 3 layers, the layer traced: the kernel reads that
  layer of both."""
  c = layered_case
  args, scales, clean_args, clean_scales = _quantized_args(c, jnp.float8_e4m3fn)
  out = jax.jit(
      lambda layer: rpa.ragged_paged_attention(
          *args, **scales, layer=layer, block_q=8, pages_per_compute_block=1,
          interpret=INTERPRET)
  )(jnp.int32(1))
  expected = rpa.ragged_paged_attention_reference(*clean_args, **clean_scales,
                                                  layer=1)
  _check_output(out, expected, c, jnp.float32)
  other_layer = rpa.ragged_paged_attention_reference(*clean_args, **clean_scales,
                                                     layer=2)
  assert np.abs(np.asarray(expected) - np.asarray(other_layer)).max() > 0.1


@pytest.mark.parametrize("pages_dtype", QUANT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantized_reference_is_reference_on_dequantized_pages(pages_dtype):
  """The quantized reference (fed poisoned pages and scales) is the float32
  reference on the dequantized pages, and close to it on the original pages."""
  case = make_case(2, page_size=8, head_dim=64, ratio=2, num_kv_heads=2,
                   dtype=jnp.float32, pages_per_seq=4)
  args, scales, (q, kq, vq, *tail), clean_scales = _quantized_args(case, pages_dtype)
  out = rpa.ragged_paged_attention_reference(*args, **scales)
  dequantized = rpa.ragged_paged_attention_reference(
      q, dequantize_kv(kq, clean_scales["k_scales"]),
      dequantize_kv(vq, clean_scales["v_scales"]), *tail)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dequantized), atol=1e-6,
                             rtol=0)
  exact = rpa.ragged_paged_attention_reference(*_args(case, "k_clean", "v_clean"))
  np.testing.assert_allclose(np.asarray(out), np.asarray(exact),
                             atol=QUANT_ERROR[pages_dtype], rtol=0)


def _quantized_shapes(pages_dtype, **overrides):
  """_shapes(**overrides) with pages of pages_dtype and their float32 scales."""
  return quantized_shapes(_shapes(**overrides), pages_dtype)


def _lower_quantized_for_cuda(shapes, layer=None, **kwargs):
  """Lowers ragged_paged_attention with shapes' last two, k_scales and v_scales, as
  the keywords."""
  def f(*args, layer):
    *args, k_scales, v_scales = args
    return rpa.ragged_paged_attention(*args, k_scales=k_scales, v_scales=v_scales,
                                      layer=layer, **kwargs)
  return jax.jit(f).trace(*shapes.values(), layer=layer).lower(
      lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pages_dtype", QUANT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantized_lowers_for_cuda(pages_dtype, dtype):
  """The Triton lowering takes int8 / float8_e4m3fn pages with float32 scales."""
  for page_size, ratio, block_q in ((8, 1, None), (16, 4, None), (32, 8, 2)):
    shapes = _quantized_shapes(pages_dtype, num_heads=2 * ratio, page_size=page_size,
                               dtype=dtype)
    hlo = _lower_quantized_for_cuda(shapes, block_q=block_q).as_text()
    assert "__gpu$xla.gpu.triton" in hlo


@pytest.mark.parametrize("pages_dtype,dtype", [(jnp.int8, jnp.float32),
                                               (jnp.float8_e4m3fn, jnp.bfloat16)],
                         ids=["int8-qfloat32", "float8_e4m3fn-qbfloat16"])
@pytest.mark.parametrize("layer", [2, jax.ShapeDtypeStruct((), jnp.int32)],
                         ids=["int", "traced"])
def test_quantized_layer_path_lowers_for_cuda_without_slicing(layer, pages_dtype,
                                                              dtype):
  """The 5-D pools and their 4-D scales go into the Triton call as they are (int8 /
  float8, not converted): no slice of a layer or gather happens outside the kernel."""
  shapes = _quantized_shapes(pages_dtype, num_layers=3, dtype=dtype)
  hlo = _lower_quantized_for_cuda(shapes, layer=layer).as_text()
  [call] = [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]
  # q, k_pages, v_pages, k_scales, v_scales: parameters of the enclosing function
  # (the jitted entry's, numbered in its own order), not values computed from them.
  assert re.search(r"triton\((%arg\d+, ){5}", call), call[:200]
  outside = "\n".join(line for line in hlo.splitlines() if line != call)
  assert "slice" not in outside and "gather" not in outside


def _with_quantized(name, shape=None, dtype=None, pages_dtype=jnp.int8, **overrides):
  """_quantized_shapes(**overrides) with one argument replaced (shape None: None)."""
  shapes = _quantized_shapes(pages_dtype, **overrides)
  shapes[name] = None if shape is None else jax.ShapeDtypeStruct(
      shape, dtype or shapes[name].dtype)
  return shapes


@pytest.mark.parametrize("shapes,layer,match", [
    (_with_quantized("k_scales"), None,
     r"int8 pages \(2, 16, 16, 64\) need k_scales float32\[2, 16, 16\] .* got None"),
    (_with_quantized("v_scales", pages_dtype=jnp.float8_e4m3fn), None,
     r"float8_e4m3fn pages .* need v_scales float32\[2, 16, 16\] .* got None"),
    (_with_quantized("v_scales", (2, 16, 8)), None, r"got float32\[2, 16, 8\]"),
    (_with_quantized("k_scales", (2, 16, 16), jnp.bfloat16), None,
     r"need k_scales float32\[2, 16, 16\] .* got bfloat16\[2, 16, 16\]"),
    # 5-D pools need scales of every layer.
    (_with_quantized("k_scales", (2, 16, 16), num_layers=3), 1,
     r"pages \(3, 2, 16, 16, 64\) need k_scales float32\[3, 2, 16, 16\] .* got"
     r" float32\[2, 16, 16\]"),
    (dict(_shapes(), k_scales=None,
          v_scales=jax.ShapeDtypeStruct((2, 16, 16), jnp.float32)), None,
     r"k_scales / v_scales are only for int8 or float8_e4m3fn pages, got float32"
     r" pages with k_scales None, v_scales float32\[2, 16, 16\]"),
    (_with_quantized("k_pages", (2, 16, 16, 64), jnp.float32), None,
     r"dtypes differ: float32, float32, int8"),
    (_with_quantized("q", (40, 8, 64), jnp.float8_e4m3fn), None,
     r"dtype must be float32, bfloat16 or float16, got float8_e4m3fn"),
])
def test_quantized_inconsistent_inputs_raise_value_error(shapes, layer, match):
  with pytest.raises(ValueError, match=match):
    _lower_quantized_for_cuda(shapes, layer=layer)
