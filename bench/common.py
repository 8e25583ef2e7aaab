"""Shared plumbing of the benchmark modules: machine info, result paths, JSON, tables, plots.

Every experiment in `bench/` exposes `run(quick: bool = False, out_dir=None) -> dict`,
writes `<out_dir>/<name>.json` (+ `.png`) and puts a small flat `"headline"` dict in its
report for `bench.run_all`'s summary table. Full runs go to `bench/results/` (committed,
small files only); `--quick` smoke runs go to `bench/results/tmp/` (git-ignored) so a
smoke run never overwrites a real result.

This module does no measuring itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

RESULTS = pathlib.Path(__file__).parent / "results"


def results_dir(quick: bool, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where a run writes: `out_dir` if given, else bench/results (or its tmp/ when quick)."""
  path = pathlib.Path(out_dir) if out_dir is not None else RESULTS / "tmp" if quick else RESULTS
  path.mkdir(parents=True, exist_ok=True)
  return path


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def machine_info() -> dict:
  """Where a result came from: OS, CPU, Python/JAX versions, backend, and the load right now.

  The load average is recorded because the benchmark machine is shared: timings taken at a
  load above the core count are slower than the machine can do.
  """
  info = {
    "platform": platform.platform(),
    "processor": _cpu_model(),
    "machine": platform.machine(),
    "python": sys.version.split()[0],
    "cpu_count": os.cpu_count(),
    "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]
    if hasattr(os, "getloadavg")
    else None,
  }
  if "jax" in sys.modules:  # host-only benchmarks should not pay for importing JAX
    import jax

    info.update(
      jax=jax.__version__,
      backend=jax.default_backend(),
      device=str(jax.devices()[0].device_kind),
    )
  return info


def median_time(fn, *args, reps: int) -> float:
  """Median wall time of `fn(*args)` (synchronised) over `reps` calls, after a warm call."""
  import time

  import jax
  import numpy as np

  jax.block_until_ready(fn(*args))  # compile + warm
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_rate(reps: int, shape: tuple[int, int, int] = (256, 256, 704),
                matmul=None) -> dict:
  """Median float32 GFLOP/s of a jitted [m, k] x [k, n] product on this machine, now
  (`matmul`: the product to time, default `jnp.matmul`, i.e. XLA's).

  The yardstick for engine figures measured in the same run (the machine is shared).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  m, k, n = shape
  a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
  t = median_time(jax.jit(matmul or jnp.matmul), a, b, reps=reps)
  return {"shape": f"{m}x{k}x{n}", "median_s": t, "gflops": 2 * m * k * n / t / 1e9}


class MatmulYardstick:
  """The matmul rate at one shape, measured next to each engine measurement.

  On this shared machine the rate of the same jitted product moves 2x between moments of
  one run, so a ratio of an engine time to a rate measured minutes apart mostly measures
  the machine. `sample()` times the product right after each engine step (min of `reps`
  calls, ~1 ms), and `ratios` pairs each engine rate with the rate measured beside it.
  """

  def __init__(self, shape: tuple[int, int, int], reps: int = 3):
    import jax
    import jax.numpy as jnp
    import numpy as np

    m, k, n = shape
    self.shape, self.flops, self.reps = f"{m}x{k}x{n}", 2 * m * k * n, reps
    self._a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    self._b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    self._fn = jax.jit(jnp.matmul)
    jax.block_until_ready(self._fn(self._a, self._b))
    self.gflops: list[float] = []

  def sample(self) -> float:
    """Times the product now; returns (and records) its GFLOP/s."""
    import time

    import jax

    best = float("inf")
    for _ in range(self.reps):
      start = time.perf_counter()
      jax.block_until_ready(self._fn(self._a, self._b))
      best = min(best, time.perf_counter() - start)
    self.gflops.append(self.flops / best / 1e9)
    return self.gflops[-1]

  def summary(self, engine_gflops) -> dict:
    """The engine's per-measurement GFLOP/s over the yardstick's beside each (median)."""
    import numpy as np

    ratios = np.asarray(engine_gflops) / np.asarray(self.gflops[-len(engine_gflops):])
    return {"shape": self.shape, "gflops_median": float(np.median(self.gflops)),
            "gflops_min_max": [float(min(self.gflops)), float(max(self.gflops))],
            "samples": len(self.gflops), "fraction_median": float(np.median(ratios))}


def serve_trace(llm, trace) -> dict:
  """Serves every request of `trace` at once (greedy, its output lengths, ignore_eos)
  through `llm`'s streaming API; returns wall time, output tok/s, the peak number of
  running sequences and every request's tokens."""
  import time

  from pagedjax import SamplingParams

  for i, (p, n) in enumerate(zip(trace.prompts, trace.output_lens)):
    llm.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
  outs, peak = {}, 0
  start = time.perf_counter()
  while llm.has_unfinished_requests():
    for o in llm.step():
      if o.finished:
        outs[o.request_id] = o.outputs[0].token_ids
    peak = max(peak, sum(len(g.live_seqs) for g in llm.scheduler.running))
  wall = time.perf_counter() - start
  tokens = sum(len(t) for t in outs.values())
  return {"wall_s": wall, "output_tokens_per_s": tokens / wall, "peak_running_seqs": peak,
          "outputs": [outs[f"r{i}"] for i in range(len(trace.prompts))]}


def write_json(path: pathlib.Path, report: dict) -> pathlib.Path:
  """Writes `report` as indented JSON (a trailing newline, keys in insertion order)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=1) + "\n")
  return path


def format_table(header: list[str], rows: list[list]) -> str:
  """A plain-text table: text left-aligned, numbers right-aligned (floats to 4 digits)."""

  def cell(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)

  table = [header, *rows]
  cells = [[cell(x) for x in row] for row in table]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = [
    "  ".join(
      c.ljust(w) if isinstance(x, str) else c.rjust(w) for x, c, w in zip(raw, r, widths)
    ).rstrip()
    for raw, r in zip(table, cells)
  ]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (benchmarks only write PNGs)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: pathlib.Path, *, dpi: int = 110) -> pathlib.Path:
  """Saves and closes `fig`; a modest dpi keeps the committed PNGs small."""
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  pyplot().close(fig)
  return path


def trace_main(run, description: str, argv: list[str] | None = None) -> dict:
  """Command line of a trace experiment: --quick, --num-requests, --seed -> run(...)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--num-requests", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  return run(args.quick, num_requests=args.num_requests, seed=args.seed)
