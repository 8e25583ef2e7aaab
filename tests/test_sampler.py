"""Sampler: greedy / temperature / top-k / top-p / bans against numpy, and key derivation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.runner import sampler
from pagedjax.sampling_params import SamplingParams, seed_words

V, REAL_V = 16, 12


def _run(logits, *, temperature=0.0, top_k=0, top_p=1.0, banned=None, seeds=None, positions=None,
         need_top=True, lazy_keys=False):
  r = logits.shape[0]
  banned = np.full((r, 4), -1, np.int32) if banned is None else banned
  seeds = np.arange(r) if seeds is None else seeds
  words = np.asarray([seed_words(int(x)) for x in seeds], np.uint32)  # [R, 2]
  positions = np.zeros(r, np.int32) if positions is None else positions
  args = (jnp.asarray(words), jnp.zeros(r, jnp.int32), jnp.asarray(positions))
  keys = (lambda: sampler.row_keys(*args)) if lazy_keys else sampler.row_keys(*args)
  full = lambda x, dt: jnp.full((r,), x, dt)
  return jax.device_get(sampler.sample(
      jnp.asarray(logits), temperature=full(temperature, jnp.float32), top_k=full(top_k, jnp.int32),
      top_p=full(top_p, jnp.float32), keys=keys, banned_ids=jnp.asarray(banned),
      vocab_size=REAL_V, num_top_logprobs=3, need_top=need_top))


def _masked_log_softmax(logits, banned_row=()):
  x = logits.astype(np.float64).copy()
  x[REAL_V:] = -np.inf
  x[list(banned_row)] = -np.inf
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def test_greedy_is_argmax_over_real_vocab_and_logprobs_match():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, V)).astype(np.float32)
  logits[:, REAL_V:] = 100.0  # padded ids have the largest logits: must never be drawn
  tokens, lps, ranks, top_ids, top_lps = _run(logits)
  for i in range(5):
    ref = _masked_log_softmax(logits[i])
    assert tokens[i] == np.argmax(ref[:REAL_V]) and ranks[i] == 1
    np.testing.assert_allclose(lps[i], ref[tokens[i]], atol=1e-5)
    np.testing.assert_array_equal(top_ids[i], np.argsort(-ref)[:3])
    np.testing.assert_allclose(top_lps[i], np.sort(ref)[::-1][:3], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_skipping_the_top_tokens_and_deriving_keys_lazily_change_no_draw(temperature):
  """need_top=False (no row wants logprobs or beams) returns zeros for the top arrays and
  the same tokens, logprobs and ranks; keys given as a function draw the same tokens."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, V)).astype(np.float32)
  ref = _run(logits, temperature=temperature)
  for need_top, lazy in [(False, False), (True, True), (jnp.asarray(False), True)]:
    got = _run(logits, temperature=temperature, need_top=need_top, lazy_keys=lazy)
    for a, b in zip(got[:3], ref[:3]):
      np.testing.assert_array_equal(a, b)
    if need_top is True:
      np.testing.assert_array_equal(got[3], ref[3])
      np.testing.assert_array_equal(got[4], ref[4])
    else:
      assert not got[3].any() and not got[4].any()
  assert ref[3].any()


def test_rank_of_a_sampled_token():
  logits = np.tile(np.arange(V, dtype=np.float32)[::-1], (64, 1))  # id 0 most likely
  tokens, lps, ranks, *_ = _run(logits, temperature=50.0, seeds=np.arange(64))
  np.testing.assert_array_equal(ranks, tokens + 1)


@pytest.mark.parametrize("temperature", [1e6, 1e30, 3e38])
def test_huge_temperature_never_draws_padded_or_banned_ids(temperature):
  """Dividing by a huge temperature must not lift masked ids back to level (uniform over
  the allowed vocabulary instead)."""
  logits = np.zeros((256, V), np.float32)
  banned = np.full((256, 4), -1, np.int32)
  banned[:, 0] = 5
  tokens, *_ = _run(logits, temperature=temperature, banned=banned, seeds=np.arange(256))
  assert (tokens < REAL_V).all() and not (tokens == 5).any()
  assert len(set(tokens.tolist())) > 6  # spread over the allowed ids


def test_seed_words_and_key_compatibility():
  assert seed_words(7) == (0, 7) and seed_words(2**40 + 3) == (2**8, 3)
  assert seed_words(-1) != seed_words(2**64 - 1) and seed_words(-1) == seed_words(-1)
  assert seed_words(2**64) != seed_words(0) and seed_words(10**30) != seed_words(10**30 + 1)
  # A 32-bit seed gives the same stream as jax.random.key(seed).
  k = sampler.row_keys(jnp.asarray([seed_words(123)], jnp.uint32), jnp.zeros(1, jnp.int32),
                       jnp.zeros(1, jnp.int32))
  ref = jax.random.fold_in(jax.random.fold_in(jax.random.key(123), 0), 0)
  np.testing.assert_array_equal(jax.random.key_data(k)[0], jax.random.key_data(ref))


def test_banned_ids_never_drawn():
  logits = np.zeros((64, V), np.float32)
  logits[:, 3] = 50.0
  banned = np.full((64, 4), -1, np.int32)
  banned[:, 0] = 3
  banned[:, 1] = 4
  for temp in (0.0, 1.0):
    tokens, *_ = _run(logits, temperature=temp, banned=banned, seeds=np.arange(64))
    assert not np.isin(tokens, [3, 4]).any()
    assert (tokens < REAL_V).all()


def test_top_k_and_top_p_restrict_support():
  probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
  logits = np.log(np.maximum(probs, 1e-12)).astype(np.float32)
  rows = np.tile(logits, (256, 1))
  seeds = np.arange(256, dtype=np.int32)
  tokens, *_ = _run(rows, temperature=1.0, top_k=2, seeds=seeds)
  assert set(tokens.tolist()) == {0, 1}
  tokens, *_ = _run(rows, temperature=1.0, top_p=0.5, seeds=seeds)
  assert set(tokens.tolist()) == {0}
  tokens, *_ = _run(rows, temperature=1.0, top_p=0.7, seeds=seeds)
  assert set(tokens.tolist()) == {0, 1}
  tokens, *_ = _run(rows, temperature=1.0, seeds=seeds)
  assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_temperature_sampling_matches_softmax_frequencies():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(V,)).astype(np.float32)
  n = 4000
  tokens, *_ = _run(np.tile(logits, (n, 1)), temperature=0.7, seeds=np.arange(n, dtype=np.int32))
  ref = np.exp(_masked_log_softmax(logits / 0.7))
  freq = np.bincount(tokens, minlength=V) / n
  # 4 standard errors of a binomial proportion per bucket.
  assert np.all(np.abs(freq - ref) <= 4 * np.sqrt(ref * (1 - ref) / n) + 1e-3)


def test_draw_depends_on_seed_and_position_not_on_row():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, V)).astype(np.float32)
  seeds = rng.integers(0, 2**62, size=8)
  pos = rng.integers(0, 50, size=8).astype(np.int32)
  a, *_ = _run(logits, temperature=1.0, seeds=seeds, positions=pos)
  perm = rng.permutation(8)
  b, *_ = _run(logits[perm], temperature=1.0, seeds=seeds[perm], positions=pos[perm])
  np.testing.assert_array_equal(a[perm], b)
  # Different positions give different streams.
  c, *_ = _run(np.tile(logits[0], (64, 1)), temperature=5.0, seeds=np.full(64, 7, np.int32),
               positions=np.arange(64, dtype=np.int32))
  assert len(set(c.tolist())) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n must"),
    (dict(n=4, beam_width=2, use_beam_search=True, temperature=0.0), "beam_width"),
    (dict(use_beam_search=True, temperature=0.5), "temperature"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_sampling_params_reject_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_sampling_params_normalise():
  p = SamplingParams(stop="x", top_k=-1, n=3)
  assert p.stop == ["x"] and p.top_k == 0 and p.beam_width == 3
  assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1).greedy
