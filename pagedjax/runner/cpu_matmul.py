"""Native float32 products for the model's projections on XLA:CPU (attention_impl="cpu").

The model's `nnx.Linear` layers take `dot_general` from here. Outside `enabled(True)`
it is `jax.lax.dot_general`. Inside it (the engine's step under attention_impl="cpu", on
one device), a float32 product of activations `[..., K]` with a kernel `[K, N]` (N a
multiple of 16) is the FFI call of `cpu_matmul.cc`, built into the same library as the
native attention (`pagedjax.runner.cpu_attention`); anything else still goes to XLA.

Profiled in the engine, XLA:CPU's products were most of a decode step's time and ran at
about half this kernel's rate at decode shapes (the numbers are in the .cc file and in
the README). The kernel's sums run in the order k = 0 .. K - 1 for every output element
whatever the batch, so a row's projections do not depend on the rows batched with it.
The dense forward (tests' reference, training) keeps XLA's products; both round like
float32 products of the same values, and `tests/test_cpu_matmul.py` compares them.

`enabled` is read while a step is traced: jit caches programs by the step's static
arguments (impl, mesh), which decide it, so a step's cached program never disagrees with
it. Another jitted function traced inside the context keeps the native products in its
cache (jit does not key on the context): call none inside it. Such a program is still
right (the product has a JVP rule made of XLA's products, so it differentiates), only
not XLA's. Builds without AVX-512 (the scalar loop is slower than XLA) never use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pagedjax.runner import cpu_attention

_ENABLED = contextvars.ContextVar("pagedjax_cpu_matmul", default=False)
_NUM_THREADS = os.cpu_count() or 1  # at most; items are 64-column panels


@contextlib.contextmanager
def enabled(flag: bool = True):
  """Within: the model's projections use the native product where it applies."""
  token = _ENABLED.set(bool(flag))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def supports(lhs, rhs, dimension_numbers, preferred_element_type=None) -> bool:
  """Whether `dot_general` would call the native product for these operands."""
  return (rhs.ndim == 2 and lhs.ndim >= 1 and lhs.dtype == jnp.float32
          and rhs.dtype == jnp.float32 and rhs.shape[1] % 16 == 0
          and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
          and tuple(map(tuple, dimension_numbers[1])) == ((), ())
          and preferred_element_type in (None, jnp.float32))


def native_available() -> bool:
  """Whether the native product is built here with its AVX-512 tiles (else: XLA's)."""
  return cpu_attention.available() and cpu_attention._register()


def matmul(a: jax.Array, w: jax.Array) -> jax.Array:
  """`a [M, K] @ w [K, N]` in float32 by the native kernel (N a multiple of 16)."""
  if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0] or w.shape[1] % 16:
    raise ValueError(f"cpu matmul needs a [M, K] and w [K, N] with N a multiple of 16, got "
                     f"a {a.shape} and w {w.shape}")
  if a.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f"cpu matmul is float32 only, got {a.dtype} and {w.dtype}")
  cpu_attention._register()
  return _native(a, w)


@jax.custom_jvp
def _native(a, w):
  call = jax.ffi.ffi_call(cpu_attention.MATMUL_TARGET,
                          jax.ShapeDtypeStruct((a.shape[0], w.shape[1]), jnp.float32),
                          vmap_method="sequential")
  return call(a, w, num_threads=np.int64(_NUM_THREADS))


@_native.defjvp
def _native_jvp(primals, tangents):
  (a, w), (da, dw) = primals, tangents
  return _native(a, w), da @ w + a @ dw  # linear in the tangents: transposes for grad


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """`jax.lax.dot_general`, or the native product inside `enabled(True)` where it applies
  (float32 `[..., K] x [K, N]`, N a multiple of 16: an `nnx.Linear`'s product)."""
  if (_ENABLED.get() and not kwargs.get("out_sharding")
      and supports(lhs, rhs, dimension_numbers, preferred_element_type)
      and native_available()):
    y = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
