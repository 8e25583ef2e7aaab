"""Session settings for the test suite: faster XLA compiles, which are most of its time.

* XLA's CPU backend compiles at LLVM -O0 (`--xla_backend_optimization_level=0`): about a
  quarter less compile time per step program here. It changes code generation only, not
  the HLO (XLA's fast math stays off), and every exactness test compares paths compiled
  under the same flags. Benchmarks (bench/) keep the default; the quick bench runs the
  tests make assert no timing.
* With pytest-xdist, the workers of one run share a persistent compilation cache (a fresh
  temporary directory per run, removed at its end), so a program one worker compiled is
  loaded, not compiled again, by the other. A run without xdist needs none: compiled
  programs are already shared within a process.
Both are set through the environment (XLA_FLAGS, JAX_COMPILATION_CACHE_DIR), so the
subprocesses the tests start (main.py, the notebook's kernel, the server of
bench.serving_http) compile the same way and share the same cache.
* Compiled programs are released between test modules once the process holds many: each
  XLA:CPU step program keeps ~500 memory mappings of JIT'd code (measured: two step
  programs of the bundled model, +1040 mappings), and a worker that had compiled ~130
  crossed Linux's vm.max_map_count (65530) and segfaulted inside XLA's compiler or
  executable serializer. `jax.clear_caches()` frees them (the persistent cache makes a
  later module's recompile a load).
"""

import gc
import os
import shutil
import tempfile

import pytest

_FLAG = "--xla_backend_optimization_level=0"
_CACHE_ENV = "PAGEDJAX_TEST_XLA_CACHE"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

if os.environ.get(_CACHE_ENV):  # an xdist worker of a run that made one
  import jax

  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  if hasattr(config, "workerinput"):  # a worker: the controller made the directory
    return
  if getattr(config.option, "numprocesses", None) and not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="pagedjax-xla-cache-")
    config._pagedjax_cache = os.environ[_CACHE_ENV]
    # read by jax at import, in the workers and in every subprocess they start
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def pytest_unconfigure(config):
  path = getattr(config, "_pagedjax_cache", None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
    for name in (_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
      os.environ.pop(name, None)


_MAX_MAPPINGS = 24000  # of vm.max_map_count's usual 65530: ~45 step programs


def _num_mappings() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: no such limit to stay under
    return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  if _num_mappings() > _MAX_MAPPINGS:
    import jax

    jax.clear_caches()
    gc.collect()
