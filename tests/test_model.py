"""Transformer (dense forward), its config and rope layout (weight files: test_checkpoint.py)."""

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pagedjax.weights import checkpoint as ckpt
from pagedjax.runner import model as M

TINY = M.ModelConfig(
  vocab_size=64,
  dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  hidden_dim=48,
  max_seq_len=32,
)


def make(cfg=TINY, seed=0):
  return M.Transformer(cfg, rngs=nnx.Rngs(seed))


def fwd(model, x, positions=None):
  """Jitted dense forward (eager NNX calls dispatch op by op and are slow)."""
  graphdef, state = nnx.split(model)
  return M.dense_forward(graphdef, state, x, positions)


def tokens(b=2, t=12, vocab=TINY.vocab_size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@functools.cache
def random_model(cfg=TINY, scale=0.3):
  """A model whose every parameter is N(0, scale): no weight is trivially 0 or 1.

  Built from an abstract model and filled with numpy draws (eager or jitted JAX init
  compiles a program per initializer and dominates the test time); cached, so tests
  must not mutate it.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(cfg)))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(1)
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_logits_shape_dtype_finite():
  x = tokens()
  logits = fwd(make(dataclasses.replace(TINY, num_layers=1)), x)  # real init, not random_model
  chex.assert_shape(logits, (2, 12, TINY.vocab_size))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_causal_future_token_does_not_change_earlier_logits():
  model = random_model()
  x = tokens(t=10)
  j = 6
  y = x.at[:, j].set((x[:, j] + 1) % TINY.vocab_size)
  a, b = fwd(model, x), fwd(model, y)
  np.testing.assert_array_equal(np.asarray(a[:, :j]), np.asarray(b[:, :j]))
  assert not np.allclose(np.asarray(a[:, j:]), np.asarray(b[:, j:]))


def test_batch_rows_are_independent():
  model = random_model()
  x = tokens(b=3)
  full = fwd(model, x)
  np.testing.assert_allclose(np.asarray(fwd(model, x[1:2])), np.asarray(full[1:2]), atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads):
  """Query head h reads kv head h // (H / Hkv), as in HF Llama's repeat_kv."""
  gqa_cfg = dataclasses.replace(TINY, num_kv_heads=num_kv_heads)
  mha_cfg = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
  gqa = random_model(gqa_cfg)
  assert gqa.layers[0].attn.k_proj.kernel.shape == (TINY.dim, num_kv_heads * TINY.head_dim)
  groups, d = TINY.num_heads // num_kv_heads, TINY.head_dim
  g_state = nnx.state(gqa, nnx.Param)
  flat = {}
  for path, var in nnx.to_flat_state(g_state):
    w = np.asarray(var[...])
    if path[-2] in ("k_proj", "v_proj"):  # [dim, Hkv*D] -> [dim, H*D]
      w = np.repeat(w.reshape(TINY.dim, num_kv_heads, d), groups, axis=1).reshape(TINY.dim, -1)
    flat[".".join(map(str, path))] = w
  mha = ckpt.model_from_arrays(mha_cfg, flat)
  x = tokens()
  np.testing.assert_allclose(np.asarray(fwd(gqa, x)), np.asarray(fwd(mha, x)), atol=1e-5)
  q, k, v = gqa.layers[0].attn.qkv(gqa.embed_tokens(x), jnp.broadcast_to(jnp.arange(12), x.shape))
  chex.assert_shape(q, (2, 12, TINY.num_heads, d))
  chex.assert_shape([k, v], (2, 12, num_kv_heads, d))


def test_tied_vs_untied_embeddings():
  abstract = lambda cfg: nnx.eval_shape(lambda: make(cfg))
  tied, untied = abstract(TINY), abstract(dataclasses.replace(TINY, tie_embeddings=False))
  assert M.count_params(untied) - M.count_params(tied) == TINY.dim * TINY.vocab_size
  assert not hasattr(tied, "lm_head") and hasattr(untied, "lm_head")
  tied = random_model()
  x = jnp.ones((1, 4, TINY.dim))
  expected = tied.final_norm(x) @ tied.embed.embedding[...].T
  np.testing.assert_allclose(np.asarray(tied.logits(x)), np.asarray(expected), atol=1e-5)


def test_rope_matches_complex_rotation_of_half_split_pairs():
  """HF layout: dims (i, i + D/2) form the pair rotated by angle pos * theta^(-2i/D)."""
  d, theta = 8, 10000.0
  x = np.random.default_rng(0).normal(size=(1, 5, 2, d)).astype(np.float32)
  pos = jnp.arange(5)[None]
  cos, sin = M.rope_cos_sin(pos, d, theta)
  got = np.asarray(M.apply_rope(jnp.asarray(x), cos, sin))
  freq = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * np.exp(
    1j * np.arange(5)[None, :, None, None] * freq
  )
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_shifting_all_positions_keeps_logits():
  """Rope makes attention depend on relative positions only."""
  model = random_model(scale=0.1)
  x = tokens()
  pos = jnp.broadcast_to(jnp.arange(12), x.shape)
  np.testing.assert_allclose(
    np.asarray(fwd(model, x, pos + 9)), np.asarray(fwd(model, x)), atol=1e-4
  )
  np.testing.assert_array_equal(np.asarray(fwd(model, x, pos)), np.asarray(fwd(model, x)))


def test_qwen_style_flags_add_params_and_run():
  cfg = dataclasses.replace(TINY, qkv_bias=True, qk_norm=True, tie_embeddings=False)
  model = random_model(cfg)
  attn = model.layers[0].attn
  assert attn.q_proj.bias.shape == (TINY.num_heads * TINY.head_dim,)
  assert attn.k_norm.scale.shape == (TINY.head_dim,)
  chex.assert_tree_all_finite(fwd(model, tokens()))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  f32 = random_model(scale=0.1)
  bf16 = ckpt.model_from_arrays(dataclasses.replace(TINY, dtype="bfloat16"), ckpt.flat_params(f32))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  x = tokens()
  a, b = fwd(f32, x), fwd(bf16, x)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.1)


def test_greedy_generate_dense_masks_invalid_ids_and_matches_argmax_loop():
  model = random_model()
  prompt = [1, 2, 3]
  out = M.greedy_generate_dense(model, prompt, 3, num_valid_tokens=10)
  assert len(out) == 3 and all(0 <= t < 10 for t in out)
  seq = list(prompt)
  for _ in range(3):
    seq.append(int(jnp.argmax(fwd(model, jnp.asarray([seq]))[0, -1, :10])))
  assert out == seq[3:]
  with pytest.raises(ValueError, match="max_seq_len 32"):
    M.greedy_generate_dense(model, prompt, 30)


def test_config_round_trip_and_validation():
  assert M.ModelConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    dataclasses.replace(TINY, num_kv_heads=3)
  with pytest.raises(ValueError, match="bogus"):
    M.ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})
  with pytest.raises(ValueError, match="float16"):
    dataclasses.replace(TINY, dtype="float16")
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    random_model()(jnp.zeros((4,), jnp.int32))


def test_llama3_rope_scaling_round_trips_and_rescales_only_low_frequencies():
  scaling = M.Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64
  )
  cfg = dataclasses.replace(TINY, rope_scaling=scaling)
  assert M.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="low_freq_factor"):
    dataclasses.replace(scaling, low_freq_factor=4.0)
  d, theta, pos = 16, 10000.0, jnp.ones((1, 1), jnp.int32)

  def angle(scaling):  # rotation angle at position 1 = the inverse frequency
    cos, sin = M.rope_cos_sin(pos, d, theta, scaling)
    return np.arctan2(np.asarray(sin), np.asarray(cos))[0, 0, : d // 2]

  freq = theta ** (-np.arange(0, d, 2) / d)
  wavelen = 2 * np.pi / freq
  high, low = wavelen < 64 / 4.0, wavelen > 64 / 1.0  # kept / divided by 8 / interpolated
  assert high.any() and low.any() and (~high & ~low).any()
  np.testing.assert_allclose(angle(scaling)[high], freq[high], rtol=1e-5)
  np.testing.assert_allclose(angle(scaling)[low], freq[low] / 8, rtol=1e-4)
  mid = ~high & ~low
  assert np.all(angle(scaling)[mid] < freq[mid]) and np.all(angle(scaling)[mid] > freq[mid] / 8)
  np.testing.assert_allclose(angle(None), freq, rtol=1e-5)
