"""The native float32 product of the model's projections (pagedjax/runner/cpu_matmul.cc).

Compared with a float64 reference on fresh random shapes and contents (hypothesis: rows
around the kernel's 6- and 8-row tiles, K from 1, N at 16-column granularity, values
spanning magnitudes); a row's result must not depend on the rows computed with it
(bitwise); `dot_general` must take the native path exactly where it applies and XLA's
elsewhere; the engine's step under attention_impl="cpu" must use it, "xla" must not, and
both must give the same greedy tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedjax import LLM, SamplingParams
from pagedjax.runner import cpu_attention, cpu_matmul

_ROWS = st.one_of(st.sampled_from([1, 5, 6, 7, 8, 9, 12, 13, 64]), st.integers(1, 80))
_N = st.integers(1, 48).map(lambda x: 16 * x)


def _data(seed, m, k, n):
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(-3, 3, size=(m, 1))).astype(np.float32)  # rows of any size
  a = (rng.standard_normal((m, k)) * scale).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  return a, w


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ROWS, st.integers(1, 300), _N, st.integers(0, 2**31 - 1))
def test_matches_a_float64_reference(m, k, n, seed):
  a, w = _data(seed, m, k, n)
  got = np.asarray(jax.jit(cpu_matmul.matmul)(a, w))
  ref = a.astype(np.float64) @ w.astype(np.float64)
  # float32 rounding of a K-term sum: bounded by K eps sum_k |a w| (a loose multiple)
  bound = k * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(w))
  assert got.dtype == np.float32 and got.shape == (m, n)
  np.testing.assert_array_less(np.abs(got - ref), bound + 1e-30)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 70), st.sampled_from([32, 256, 704]), st.sampled_from([128, 704]),
       st.integers(0, 2**31 - 1))
def test_a_row_does_not_depend_on_its_batch(m, k, n, seed):
  """Bitwise: each row alone, and the rows reversed, give the batch's rows (tiles of 8,
  6 and fewer rows, with and without a helper thread)."""
  a, w = _data(seed, m, k, n)
  f = jax.jit(cpu_matmul.matmul)
  whole = np.asarray(f(a, w))
  np.testing.assert_array_equal(np.asarray(f(a[::-1].copy(), w))[::-1], whole)
  for i in {0, m // 2, m - 1}:
    np.testing.assert_array_equal(np.asarray(f(a[i:i + 1], w))[0], whole[i])


def test_dot_general_is_native_only_where_it_applies():
  x = jnp.ones((2, 3, 32), jnp.float32)
  dims = (((2,), (0,)), ((), ()))

  def hlo(w, on=True, x=x):
    def f(x, w):
      with cpu_matmul.enabled(on):
        return cpu_matmul.dot_general(x, w, dims)
    return jax.jit(f).lower(x, w).as_text()

  w = jnp.ones((32, 48), jnp.float32)
  assert cpu_attention.MATMUL_TARGET in hlo(w)
  assert cpu_attention.MATMUL_TARGET not in hlo(w, on=False)
  assert cpu_attention.MATMUL_TARGET not in hlo(jnp.ones((32, 40), jnp.float32))  # N % 16
  assert cpu_attention.MATMUL_TARGET not in hlo(w.astype(jnp.bfloat16),
                                                x=x.astype(jnp.bfloat16))
  with cpu_matmul.enabled():
    y = jax.jit(lambda x, w: cpu_matmul.dot_general(x, w, dims))(x, w)
  np.testing.assert_array_equal(np.asarray(y), np.full((2, 3, 48), 32.0, np.float32))


def test_it_differentiates_like_xlas_product():
  """A program traced inside enabled() keeps the native call in jit's cache (the context
  is not a key), so it must still differentiate: its JVP rule is XLA's products."""
  a, w = _data(1, 5, 32, 48)

  def loss(a, w):
    return (cpu_matmul.matmul(a, w) ** 2).sum()

  got = jax.grad(loss, argnums=(0, 1))(a, w)
  want = jax.grad(lambda a, w: ((a @ w) ** 2).sum(), argnums=(0, 1))(a, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_matmul_refuses_what_it_cannot_compute():
  with pytest.raises(ValueError, match=r"a \(2, 8\) and w \(8, 40\)"):
    cpu_matmul.matmul(jnp.ones((2, 8)), jnp.ones((8, 40)))
  with pytest.raises(ValueError, match="float32 only"):
    cpu_matmul.matmul(jnp.ones((2, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16))


def test_the_cpu_step_uses_it_and_gives_the_xla_steps_tokens():
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(0, 256, size=s)] for s in (5, 37, 70)]
  params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
  outs = {}
  for impl in ("cpu", "xla"):
    llm = LLM(num_blocks=64, attention_impl=impl)
    outs[impl] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    texts = [c.as_text() for _, c in llm.runner.compiled_programs()]
    assert texts and all((cpu_attention.MATMUL_TARGET in t) == (impl == "cpu") for t in texts)
  assert outs["cpu"] == outs["xla"]


def test_decode_steps_run_one_row_only_with_the_native_products():
  """T = the sample-row bucket for decode-only steps where the products are native (a
  row's result does not depend on M), at least 8 rows with XLA's (they round differently
  below 8); a one-token prompt with n = 4 runs 4 rows, in the serving keys."""
  params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
  for impl, t_cap in (("cpu", 1), ("xla", 8)):
    llm = LLM(num_blocks=64, attention_impl=impl)
    llm.generate([[5, 6, 7]], params)
    assert (t_cap, 1, 1, 0) in llm.runner.programs, (impl, set(llm.runner.programs))
  llm = LLM(num_blocks=64)
  out = llm.generate([[9]], SamplingParams(max_tokens=3, n=4, temperature=1.0, seed=0))
  assert len(out[0].outputs) == 4
  assert set(llm.runner.programs) <= set(llm.runner.serving_program_keys(64))
