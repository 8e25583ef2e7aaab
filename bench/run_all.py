"""Runs every benchmark in `bench/` with one progress bar and prints one summary table.

  python -m bench.run_all [--quick] [--only NAME ...]

Each experiment module is imported lazily, in EXPERIMENTS order, and run through its
command-line entry `main(argv)` (argv: ["--quick"] or []), which writes its own
`<name>.json` / `.png`; a module that is missing (not written yet) or fails is reported
and skipped, and the others still run. The summary takes each report's flat "headline"
dict (or, failing that, its top-level numbers) and is written to
`bench/results/summary.json` (`bench/results/tmp/summary.json` with --quick) with the
machine info and the wall time of every experiment.

Sizes: the defaults take a few minutes on a 2-core CPU; --quick is a smoke run.
This module measures nothing itself.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback

from tqdm import tqdm

from bench import common

EXPERIMENTS = (
  "host_overhead",
  "attention",
  "memory_waste",
  "fragmentation",
  "sharing",
  "swap_vs_recompute",
  "throughput",
  "pool_scaling",
  "serving",
  "prefix_caching",
  "serving_http",
  "memory_timeline",
  "kv_quantization",
  "tensor_parallel",
)
_MAX_FALLBACK_FIGURES = 6


def headline(report) -> dict:
  """The figures of a report worth a summary line: its "headline", else top-level numbers."""
  if not isinstance(report, dict):
    return {}
  if isinstance(report.get("headline"), dict):
    return report["headline"]
  figures = {}
  for key, value in report.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      figures[key] = value
    elif (
      isinstance(value, dict)
      and value
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())
    ):
      figures.update({f"{key}.{k}": v for k, v in value.items()})
  return dict(list(figures.items())[:_MAX_FALLBACK_FIGURES])


def run_one(name: str, quick: bool) -> dict:
  """Imports and runs bench.<name>; never raises: failures become a status line."""
  start = time.perf_counter()
  try:
    module = importlib.import_module(f"bench.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"bench.{name}":  # the module exists but one of its imports is missing
      return {"status": f"import failed: {e}", "wall_s": 0.0}
    return {"status": "skipped: module not present yet", "wall_s": 0.0}
  if not hasattr(module, "main"):
    return {"status": "skipped: no main(argv)", "wall_s": 0.0}
  try:
    report = module.main(["--quick"] if quick else [])
  except Exception as e:  # noqa: BLE001 - one broken experiment must not stop the others
    traceback.print_exc()
    return {"status": f"failed: {type(e).__name__}: {e}", "wall_s": time.perf_counter() - start}
  return {"status": "ok", "wall_s": time.perf_counter() - start, "headline": headline(report)}


def _fmt(value) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def run(quick: bool = False, only: list[str] | None = None) -> dict:
  """Runs the experiments; writes and returns the summary.

  Args:
    quick: pass --quick to every experiment.
    only: a subset of EXPERIMENTS (None: all).

  Returns:
    {"quick", "machine", "total_wall_s", "experiments": {name: {status, wall_s, headline}}}.
  """
  names = list(EXPERIMENTS) if not only else only
  unknown = sorted(set(names) - set(EXPERIMENTS))
  if unknown:
    raise ValueError(f"unknown experiments {unknown}; expected some of {list(EXPERIMENTS)}")
  load_at_start = common.machine_info()["load_avg_1m_5m_15m"]
  start = time.perf_counter()
  results = {}
  with tqdm(names, desc="bench.run_all", unit="experiment", disable=None) as bar:
    for name in bar:
      bar.set_postfix_str(name)
      results[name] = run_one(name, quick)
  total = time.perf_counter() - start
  rows = []
  for name, r in results.items():
    figures = r.get("headline") or {}
    lines = [f"{k} = {_fmt(v)}" for k, v in figures.items()] or [""]
    rows.append([name, r["status"], f"{r['wall_s']:.1f}", lines[0]])
    rows.extend(["", "", "", line] for line in lines[1:])
  print(f"\nbench.run_all{' --quick' if quick else ''}: {total:.0f} s")
  print(common.format_table(["experiment", "status", "wall s", "headline"], rows))
  summary = {
    "command": "python -m bench.run_all" + (" --quick" if quick else ""),
    "quick": quick,
    # Taken at the end: the experiments have imported JAX by then, so it names the backend.
    "machine": common.machine_info() | {"load_avg_at_start": load_at_start},
    "total_wall_s": total,
    "experiments": results,
  }
  path = common.write_json(common.results_dir(quick) / "summary.json", summary)
  print(f"wrote {path}")
  return summary


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run of every experiment")
  parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run just these")
  args = parser.parse_args(argv)
  return run(args.quick, args.only)


if __name__ == "__main__":
  main()
