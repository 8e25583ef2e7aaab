"""Native paged attention for XLA:CPU (attention_impl="cpu").

`tile_attention_rows` computes what the xla path's tiles compute (tiles of T queries of
one sequence, causal over its pages; decode rows are tiles of one query;
pagedjax.runner.attention), as one XLA FFI custom call per layer and kind of tile,
implemented in `cpu_attention.cc`. The xla path stays the reference.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else g++,
c++ or clang++) against the XLA FFI headers shipped in jaxlib (`jax.ffi.include_dir()`),
into `$PAGEDJAX_CACHE_DIR` (default `~/.cache/pagedjax`), together with the model's
native product (`cpu_matmul.cc`, pagedjax.runner.cpu_matmul) as one library, keyed by the
sources, the flags, the jaxlib version and the CPU, like Triton's and torch's C++ extensions. Builds
are serialised across processes with a file lock. `available()` says whether it can be
built here; `LLM(attention_impl="auto")` picks "cpu" on CPU when it can, "xla" otherwise.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_SRC = pathlib.Path(__file__).with_suffix(".cc")
# One library holds the native CPU kernels: this attention and the float32 product of
# the model's projections (pagedjax.runner.cpu_matmul).
_SOURCES = (_SRC, _SRC.with_name("cpu_matmul.cc"))
_HEADERS = (_SRC.with_name("cpu_pool.h"),)  # in the build key too
_TARGET = "pagedjax_cpu_paged_attention"
MATMUL_TARGET = "pagedjax_cpu_matmul"
# -march=native: the library is built on the machine that runs it (the key has the CPU).
# -fopenmp-simd: only the loops marked `omp simd` (dot products, sums) may be
# reassociated into vector lanes; no -ffast-math elsewhere. No OpenMP runtime.
# -fno-trapping-math: float -> int conversions may be vectorised (no FP traps are enabled;
# results are unchanged), which the exp loop needs.
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-std=c++20",
          "-shared", "-fPIC")


class BuildError(RuntimeError):
  """The native kernel could not be compiled on this machine."""


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("model name", "flags")):
        return line
  except OSError:
    pass
  return platform.processor()


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("PAGEDJAX_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pagedjax")
  return pathlib.Path(root) / "native"


@functools.cache
def library_path() -> pathlib.Path:
  """Builds the kernel if needed; returns the shared library's path (BuildError if not)."""
  cxx = _compiler()
  if cxx is None:
    raise BuildError("attention_impl='cpu' needs a C++20 compiler (g++, c++ or clang++, or "
                     "$CXX); none was found on PATH")
  include = jax.ffi.include_dir()
  key = hashlib.sha256("\0".join(
    [*(src.read_text() for src in (*_SOURCES, *_HEADERS)), cxx, *_FLAGS, jax.__version__, str(include),
     platform.machine(), _cpu_model()]).encode()).hexdigest()[:16]
  out_dir = _cache_dir()
  out_dir.mkdir(parents=True, exist_ok=True)
  lib = out_dir / f"cpu_attention-{key}.so"
  if lib.exists():
    return lib
  with open(out_dir / f"cpu_attention-{key}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
    if lib.exists():
      return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{include}", *map(str, _SOURCES), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      os.unlink(tmp)
      names = ", ".join(src.name for src in _SOURCES)
      raise BuildError(f"building {names} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: readers see the whole library or none
  return lib


@functools.cache
def _register() -> bool:
  """Registers the library's FFI targets; returns whether its matmul has the AVX-512
  tiles (pagedjax.runner.cpu_matmul)."""
  import ctypes

  lib = ctypes.cdll.LoadLibrary(str(library_path()))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.PagedjaxCpuPagedAttention),
                              platform="cpu")
  jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.PagedjaxCpuMatmul),
                              platform="cpu")
  return bool(lib.PagedjaxCpuMatmulIsVectorized())


@functools.cache
def available() -> bool:
  """Whether the native kernel builds and loads here (CPU backend)."""
  try:
    library_path()
    _register()
  except (BuildError, OSError):
    return False
  return True


# 8-bit codes -> float32, indexed by the stored byte.
_BYTES = np.arange(256, dtype=np.uint8)
_LUTS = {
  jnp.dtype(jnp.int8): _BYTES.view(np.int8).astype(np.float32),
  jnp.dtype(jnp.uint8): _BYTES.view(ml_dtypes.float8_e4m3fn).astype(np.float32),  # fp8 bits
  jnp.dtype(jnp.float8_e4m3fn): _BYTES.view(ml_dtypes.float8_e4m3fn).astype(np.float32),
}
_STORED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16), *_LUTS)


def supports(storage_dtype) -> bool:
  """Whether the kernel reads pools stored as `storage_dtype`."""
  return jnp.dtype(storage_dtype) in _STORED


# Threads per call: XLA:CPU's intra-op pool is shared with the step's other kernels;
# more helpers than work items or cores are not scheduled.
_NUM_THREADS = os.cpu_count() or 1


def tile_attention_rows(q, k_rows, v_rows, block_tables, positions, layer, *, sm_scale: float,
                        geometry, k_scale_rows=None, v_scale_rows=None):
  """Tiles of T queries of one sequence each, causal over their pages, read in place
  from the pools' row view.

  Args:
    q: `[B, T, H, D]` queries (any float dtype; computed in float32).
    k_rows, v_rows: pools as rows `[L * Hkv * N, bs * D]` (`kv_cache.to_rows`): float32,
      bfloat16 / its uint16 bits, or 8-bit codes (int8; fp8 or its uint8 bits).
    block_tables: `i32[B, P]` each tile's pages (entries past its last page: any value).
    positions: `i32[B, T]` each query's position (it attends to keys 0..position);
      -1: padding.
    layer: int or traced int32 scalar.
    sm_scale: softmax scale.
    geometry: the pool's `kv_cache.PoolGeometry`.
    k_scale_rows, v_scale_rows: `f32[L * Hkv * N, bs]` per-token scales of 8-bit pools.

  Returns:
    `[B, T, H, D]` in q.dtype; zeros in padding rows.
  """
  _register()
  quantized = k_rows.dtype in _LUTS
  if not supports(k_rows.dtype):
    raise ValueError(f"the cpu kernel does not read {k_rows.dtype} pools (supported: "
                     f"{[str(d) for d in _STORED]})")
  if quantized != (k_scale_rows is not None):
    raise ValueError(f"scales are required exactly for 8-bit pools, got {k_rows.dtype} pools "
                     f"with k_scale_rows {None if k_scale_rows is None else k_scale_rows.shape}")
  if quantized:
    lut = jnp.asarray(_LUTS[k_rows.dtype])
  else:
    k_scale_rows = v_scale_rows = lut = jnp.zeros((1,), jnp.float32)
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  out = call(q.astype(jnp.float32), k_rows, v_rows, k_scale_rows, v_scale_rows, lut,
             block_tables.astype(jnp.int32), positions.astype(jnp.int32),
             jnp.asarray(layer, jnp.int32).reshape(1), sm_scale=np.float32(sm_scale),
             num_kv_heads=np.int64(geometry.num_kv_heads),
             num_blocks=np.int64(geometry.num_blocks), block_size=np.int64(geometry.block_size),
             num_threads=np.int64(_NUM_THREADS))
  return out.astype(q.dtype)
