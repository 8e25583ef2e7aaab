"""No step program copies or rewrites the KV pool: XLA's own accounting says so.

The defect this guards (issue 10): at batch 1 XLA:CPU turned the one-token KV write into
a dynamic-update-slice and, through a reshape between the write and attention's read,
duplicated it with a copy of the whole pool per layer (0.5 s per token at 4096 blocks);
bfloat16 pools were converted to float32 and back around every scatter. Both are
invisible to outputs and only show as time, so this test reads the compiled programs
instead of timing them.

An engine serves a small mix of requests that makes it compile every kind of step
program (batch-1 and batch-2 decode, whole and chunked prefill, chunks mixed with
decodes, parallel samples with copy-on-write, beams, swap preemption). Every program it
ran is compiled again for a 64x larger pool (8192 pages), and:
  * the pool is aliased in place (alias bytes = both page arrays);
  * temporaries stay below one layer of one page array (a single copy of the pool, or
    of one layer of it, would exceed that; the model's own temporaries, e.g. bfloat16
    weights converted for CPU matmuls, are far smaller);
  * the optimised HLO has no copy or convert of pool shape.
The block-copy programs (copy-on-write, swap-in) get the same checks, where the
temporaries must also not grow between a small and the large pool, and so do the
multi-step decode programs (the pool carried through a loop of decode steps).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.runner import kv_cache as kvc

SMALL, LARGE = 128, 8192  # pages per layer: the engine's pool, and the pool compiled for


@pytest.fixture(scope="module", params=["float32", "bfloat16", "int8", "fp8"])
def served(request):
  # int8 / fp8: float32 compute over a quantized pool (pages + per-token scales)
  dtype, kv_dtype = ("float32", request.param) if request.param in ("int8", "fp8") else (
      request.param, "auto")
  llm = LLM(num_blocks=SMALL, dtype=dtype, kv_cache_dtype=kv_dtype, max_num_batched_tokens=64,
            max_num_seqs=8, num_host_blocks=64, preemption_mode="swap")
  greedy = SamplingParams(max_tokens=3, temperature=0.0)
  llm.generate(["def "], greedy)  # batch-1 prefill + decode
  if request.param == "float32":  # other dtypes change the pool's storage, not programs' kinds
    llm.generate(["def ", "The Python "], greedy)  # batch 2
    # A prompt over the 64-token budget: chunks, mixed with the other request's decodes.
    llm.generate(["A ", "The try statement " * 8], SamplingParams(max_tokens=6,
                                                                temperature=0.0))
    llm.generate(["A class "], SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=4))
    llm.generate(["def "], SamplingParams(use_beam_search=True, beam_width=2, temperature=0.0,
                                          max_tokens=3))
  return llm


def _pool_shaped(hlo: str, num_blocks: int, geometry) -> list[str]:
  """HLO instructions that copy or convert a whole pool-shaped array (an in-place
  dynamic-update-slice or scatter has a pool-shaped result too: those are fine)."""
  g = geometry
  rows = g.num_layers * g.num_kv_heads * num_blocks
  shapes = {f"[{rows},{g.block_size * g.head_dim}]",
            f"[{g.num_layers},{g.num_kv_heads},{num_blocks},{g.block_size},{g.head_dim}]",
            # a quantized pool's scales, rows and 4-D
            f"[{rows},{g.block_size}]",
            f"[{g.num_layers},{g.num_kv_heads},{num_blocks},{g.block_size}]"}
  bad = []
  for line in hlo.splitlines():
    m = re.search(r"= \w+(\[[\d,]+\])\{[^}]*\} (copy|convert)\(", line)
    if m and m.group(1) in shapes:
      bad.append(line.strip()[:200])
  return bad


def _check(compiled_small, compiled_large, pool_small: int, pool_large: int, what: str,
           hlo_large: str, geometry):
  ms, ml = compiled_small.memory_analysis(), compiled_large.memory_analysis()
  assert ms.alias_size_in_bytes >= 2 * pool_small, f"{what}: pool not updated in place"
  assert ml.alias_size_in_bytes >= 2 * pool_large, f"{what}: pool not updated in place"
  growth = ml.temp_size_in_bytes - ms.temp_size_in_bytes
  assert growth < 0.01 * 2 * (pool_large - pool_small), (
    f"{what}: temporaries grow with the pool: {ms.temp_size_in_bytes} B at {SMALL} pages, "
    f"{ml.temp_size_in_bytes} B at {LARGE} pages")
  assert not _pool_shaped(hlo_large, LARGE, geometry), (
    f"{what}: pool-sized ops: {_pool_shaped(hlo_large, LARGE, geometry)[:3]}")


def test_engine_compiled_every_kind_of_step(served):
  if served.runner.kv.dtype != jnp.float32:
    pytest.skip("this engine serves one request: the storage is what it checks")
  keys = list(served.runner.programs)
  # (T, R, decode rows, prefill tiles): decode-only batch 1 and 2, prefill-only, mixed.
  assert any(k[2] == 1 and k[3] == 0 for k in keys), keys
  assert any(k[2] == 2 and k[3] == 0 for k in keys), keys
  assert any(k[2] == 0 and k[3] > 0 for k in keys), keys
  assert any(k[2] > 0 and k[3] > 0 for k in keys), keys
  st = served.memory_stats()
  assert st["num_preemptions_swap"] == 0 or st["num_blocks_swapped_in"] > 0


def test_no_step_program_copies_the_pool(served):
  _check_programs(served.runner, 4 if served.runner.kv.dtype == jnp.float32 else 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_multi_step_program_copies_the_pool(dtype):
  """The pool is carried through the multi-step decode loop in place as well (bfloat16:
  the dtype whose scatters once copied the pool; int8 checked by hand, same result)."""
  llm = LLM(num_blocks=SMALL, dtype=dtype, max_num_batched_tokens=64,
            max_num_seqs=8, num_scheduler_steps=4)
  llm.generate(["def ", "The "], SamplingParams(max_tokens=9, temperature=0.0))
  assert any("steps" in key for key in llm.runner.programs)
  _check_programs(llm.runner, 2)


def _check_programs(runner, min_programs: int):
  geometry = kvc.PoolGeometry.of(runner.kv.k_pages)
  itemsize = runner.kv.k_pages.dtype.itemsize
  per_page = geometry.num_layers * geometry.num_kv_heads * geometry.block_size * \
      geometry.head_dim * itemsize
  pool = LARGE * per_page  # one page array (K or V), all layers
  layer = pool // geometry.num_layers
  large = dict(runner.compiled_programs(LARGE))
  assert len(large) >= min_programs
  for key, compiled in large.items():
    m = compiled.memory_analysis()
    assert m.alias_size_in_bytes >= 2 * pool, f"step program {key}: pool not updated in place"
    assert m.temp_size_in_bytes < layer, (
        f"step program {key}: {m.temp_size_in_bytes} B of temporaries with a pool of "
        f"{pool} B per array ({layer} B per layer)")
    hlo = compiled.as_text()
    assert not _pool_shaped(hlo, LARGE, geometry), _pool_shaped(hlo, LARGE, geometry)[:3]


@pytest.mark.parametrize("n", [1, 4])
def test_block_copies_are_in_place(served, n):
  runner = served.runner
  geometry = kvc.PoolGeometry.of(runner.kv.k_pages)
  ids = jax.ShapeDtypeStruct((n,), jnp.int32)
  compiled = {}
  for pages in (SMALL, LARGE):
    kv = runner.abstract_kv(pages)
    blocks = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[:2] + (n,) + x.shape[3:], x.dtype),
                          (kv.k_pages, kv.v_pages, kv.k_scales, kv.v_scales))
    compiled[pages] = {
        "copy-on-write": kvc._copy_blocks_jit.lower(kv, ids, ids).compile(),
        "swap-in": kvc._swap_in_jit.lower(
            kv, blocks, ids, ids, device=runner.kv.k_pages.sharding.with_memory_kind("device"),
            host=None).compile(),
    }
  per_page = runner.kv.k_pages.nbytes // runner.kv.k_pages.shape[2]
  for what in compiled[SMALL]:
    _check(compiled[SMALL][what], compiled[LARGE][what], SMALL * per_page, LARGE * per_page,
           what, compiled[LARGE][what].as_text(), geometry)


def test_guard_catches_a_pool_copy():
  """The checks above fail on a program that does copy the pool (the old defect's form:
  a bfloat16 scatter, which XLA:CPU runs as convert-scatter-convert of the whole array)."""
  geometry = kvc.PoolGeometry(2, 2, SMALL, 16, 32)

  def write(kv, slot):
    k = jnp.ones((1, 2, 32), jnp.float32)
    pages = kvc.write_kv_layer(kv.k_pages, kv.v_pages, 0, k, k, slot)
    return kv.replace(k_pages=pages[0], v_pages=pages[1])

  fn = jax.jit(write, donate_argnums=0)
  slot = jax.ShapeDtypeStruct((1,), jnp.int32)
  out = {}
  for pages in (SMALL, LARGE):
    shape = jax.ShapeDtypeStruct((2, 2, pages, 16, 32), jnp.bfloat16)
    out[pages] = fn.lower(kvc.KVCache(shape, shape), slot).compile()
  per_page = 2 * 2 * 16 * 32 * 2
  with pytest.raises(AssertionError, match="temporaries grow|pool-sized ops"):
    _check(out[SMALL], out[LARGE], SMALL * per_page, LARGE * per_page, "bf16 scatter",
           out[LARGE].as_text(), geometry)
  # The same write on bit-pattern storage passes.
  for pages in (SMALL, LARGE):
    shape = jax.ShapeDtypeStruct((2, 2, pages, 16, 32), jnp.uint16)
    out[pages] = fn.lower(kvc.KVCache(shape, shape), slot).compile()
  _check(out[SMALL], out[LARGE], SMALL * per_page, LARGE * per_page, "uint16 scatter",
         out[LARGE].as_text(), geometry)
