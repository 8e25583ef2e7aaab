"""The step's host inputs: packed into one int32 buffer (step.pack / unpack) and built by
the runner into views of it (ModelRunner.prepare)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedjax import LLM, SamplingParams
from pagedjax.runner import step as step_lib

DTYPES = [np.int32, np.uint32, np.float32, np.bool_]


@st.composite
def _trees(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  leaves = {}
  for i in range(draw(st.integers(0, 6))):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    # Every bit pattern (NaN payloads and infinities included) must survive.
    leaves[f"x{i}"] = bits.astype(bool) if dtype is np.bool_ else bits.view(dtype)
  return leaves, draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(_trees())
def test_pack_unpack_round_trip_is_bitwise(case):
  tree, nest = case
  tree = {"outer": tree, "none": None} if nest else tree
  buf, layout = step_lib.pack(tree)
  assert buf.dtype == np.int32 and buf.shape == (layout.size,)
  got = jax.jit(step_lib.unpack, static_argnums=1)(buf, layout)
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                  b.reshape(-1).view(np.uint8))
  # The layout is interned: the same structure and shapes give the same object.
  assert step_lib.pack(jax.tree.map(np.copy, tree))[1] is layout
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  assert step_lib.pack_abstract(abstract)[1] is layout


def test_pack_rejects_other_dtypes_and_a_wrong_layout():
  with pytest.raises(TypeError, match="int64"):
    step_lib.pack({"a": np.zeros(3, np.int64)})
  _, layout = step_lib.pack({"a": np.zeros(3, np.int32)})
  with pytest.raises(ValueError, match="layout"):
    step_lib.pack({"a": np.zeros(4, np.int32)}, layout)


@pytest.fixture(scope="module")
def llm():
  return LLM(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
             attention_impl="xla")


def _reference(so, t_cap, bs, tile):
  """What a step's inputs hold, from the scheduled sequences, in plain Python."""
  tokens, positions, slots, feed, logits, rows, decodes, tiles = [], [], [], [], [], [], [], []
  for s in so.seqs:
    first = len(tokens)
    n = len(s.token_ids)
    for j, t in enumerate(s.token_ids):
      p = s.start + j
      tokens.append(t)
      positions.append(p)
      slots.append(s.block_table[p // bs] * bs + p % bs)
      feed.append(s.feed_row if j == 0 else -1)
    if s.sample_indices:
      logits.append(first + n - 1)
      ds = s.group.device_sampling
      for j in s.sample_indices:
        out_pos = len(s.seq.output_token_ids) + (s.feed_row >= 0)
        banned = list(ds.banned_ids) if out_pos < ds.banned_until else []
        rows.append((len(logits) - 1, j, out_pos, ds.temperature, ds.top_k, ds.top_p,
                     ds.seed_words, banned))
    if n == 1 and s.sample_indices:
      decodes.append((s.start, first, tuple(s.block_table)))
    else:
      for a in range(0, n, tile):
        m = min(tile, n - a)
        tiles.append((s.start + a + m - 1, tuple(range(first + a, first + a + m)),
                      tuple(range(s.start + a, s.start + a + m)), tuple(s.block_table)))
  pad = t_cap - len(tokens)
  return dict(tokens=tokens + [0] * pad, positions=positions + [0] * pad,
              slots=slots + [-1] * pad, feed=feed + [-1] * pad, logits=logits, rows=rows,
              decodes=sorted(decodes, key=lambda d: d[0]),
              tiles=sorted(tiles, key=lambda t: t[0]))


def test_prepare_matches_a_plain_python_reference(llm):
  """Each step's packed buffer, unpacked as the program does, against the scheduled
  sequences read in plain Python (decodes, chunks, fed decodes, logprobs rows, n > 1,
  min_tokens bans set and cleared, block tables growing), built from the padding
  template or from the decode step before (the persistent decode batch); each step has
  a buffer of its own and the per-program templates stay all padding."""
  from pagedjax.runner.attention import TILE_SIZE
  runner = llm.runner
  bs = runner.block_size
  seen = []
  original, new_inputs = runner.prepare, runner._new_inputs
  bases = []

  def prepare(so):
    out = original(so)
    if so.seqs:
      seen.append((out, _reference(so, out[0].token_ids.shape[0], bs, TILE_SIZE)))
    return out

  def tracked(key, base=None):
    bases.append(base is not None)
    return new_inputs(key, base)

  runner.prepare, runner._new_inputs = prepare, tracked
  try:
    llm.generate(["a b c d e f g h i j k l m n o p q r s t", "xy", "z"],
                 [SamplingParams(max_tokens=5, temperature=0.0),
                  SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=2),
                  SamplingParams(max_tokens=3, n=2, temperature=0.5, seed=1)])
    # Steady decodes: the same sequences step after step, tables growing (blocks of 4),
    # a ban lifted mid-run (min_tokens), a request ending (the batch shrinks).
    llm.generate(["a b c", "d", "e f g h i"],
                 [SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=18, temperature=0.9, seed=5, min_tokens=7,
                                 stop_token_ids=[7, 9]),
                  SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)])
  finally:
    runner.prepare, runner._new_inputs = original, new_inputs
  assert len(seen) > 5 and len({id(out[3]) for out, _ in seen}) == len(seen)
  assert sum(bases) >= 10  # steps that started from the decode step before
  kinds, bans = set(), set()
  for (batch, samp, key, buf), ref in seen:
    b, s = step_lib.unpack(jnp.asarray(buf), runner._inputs[key][1])
    b, s = jax.tree.map(np.asarray, (b, s))
    for got, want in zip(jax.tree.leaves((b, s)), jax.tree.leaves(
        (batch.replace(prev_tokens=None), samp))):  # the typed views are the buffer
      np.testing.assert_array_equal(got, want)
    fed = np.asarray(ref["feed"]) >= 0
    np.testing.assert_array_equal(b.token_ids[~fed], np.asarray(ref["tokens"])[~fed])
    np.testing.assert_array_equal(b.positions, ref["positions"])
    np.testing.assert_array_equal(b.slot_mapping, ref["slots"])
    np.testing.assert_array_equal(b.feed_index, ref["feed"])
    n = len(ref["rows"])
    np.testing.assert_array_equal(b.logits_index[:len(ref["logits"])], ref["logits"])
    got_rows = list(zip(s.row_index[:n].tolist(), s.sample_indices[:n].tolist(),
                        s.out_positions[:n].tolist(), s.temperature[:n].tolist(),
                        s.top_k[:n].tolist(), s.top_p[:n].tolist(),
                        [tuple(x) for x in s.seeds[:n].tolist()],
                        [[x for x in row if x >= 0] for row in s.banned_ids[:n].tolist()]))
    assert got_rows == [(r, j, o, np.float32(t), k, np.float32(p), sw, ban)
                        for r, j, o, t, k, p, sw, ban in ref["rows"]]
    assert (s.banned_ids[:n][s.banned_ids[:n] < 0] == -1).all() and (s.banned_ids[n:] == -1).all()
    assert (s.temperature[n:] == 0).all() and (s.top_p[n:] == 1).all()
    a = b.attn
    live = a.decode_positions >= 0
    width = a.decode_block_tables.shape[1]
    got_dec = [(int(p), int(i), tuple(t)) for p, i, t in zip(
        a.decode_positions[live], a.decode_token_index[live], a.decode_block_tables[live])]
    assert got_dec == [(p, i, t + (0,) * (width - len(t))) for p, i, t in ref["decodes"]]
    assert (~live[:live.size - live.sum()]).all()  # the padding rows first
    live = a.tile_positions.max(1) >= 0
    got_tiles = [(tuple(int(x) for x in i if x < key[0]), tuple(int(x) for x in p if x >= 0),
                  tuple(t)) for i, p, t in zip(a.tile_token_index[live], a.tile_positions[live],
                                               a.tile_block_tables[live])]
    assert got_tiles == [(i, p, t + (0,) * (width - len(t))) for _, i, p, t in ref["tiles"]]
    kinds.add((bool(ref["decodes"]), bool(ref["tiles"]), bool(fed.any())))
    bans.update(bool(row[-1]) for row in ref["rows"] if row[3] > 0.85)  # (the min_tokens one)
  assert {(True, False, True), (False, True, False)} <= kinds, kinds
  assert bans == {True, False}  # a ban set, then lifted
  for key, (template, _) in runner._inputs.items():
    np.testing.assert_array_equal(template, step_lib.pack(runner._padding_inputs(key))[0])


@pytest.mark.parametrize("lead", [(), (3,)])
def test_step_outputs_packed_for_one_transfer_unpack_bitwise(lead):
  """The step's tokens, logprobs and ranks travel as one int32 head (multi-step: a
  leading steps axis); the logprobs' bits (-inf, NaN payloads) come back exactly."""
  rng = np.random.default_rng(len(lead))
  r = 5
  tokens = rng.integers(0, 512, lead + (r,), dtype=np.int32)
  logprobs = rng.standard_normal(lead + (r,)).astype(np.float32)
  logprobs.reshape(-1)[:2] = [-np.inf, np.nan]
  logprobs.reshape(-1)[2:3].view(np.uint32)[:] = 0x7FC00123  # a NaN with a payload
  ranks = rng.integers(1, 512, lead + (r,), dtype=np.int32)
  top = (np.zeros(lead + (r, 2), np.int32), np.zeros(lead + (r, 2), np.float32))
  head, *rest = jax.device_get(jax.jit(step_lib._pack_outputs)(
      (tokens, logprobs, ranks, *top)))
  assert head.shape == lead + (3, r) and head.dtype == np.int32
  got = step_lib.unpack_outputs(head, *rest)
  for a, b in zip(got, (tokens, logprobs, ranks, *top)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32 if a.dtype == np.float32 else a.dtype),
                                  b.view(np.uint32 if b.dtype == np.float32 else b.dtype))
