"""Decode cost per token against the size of the KV pool: it must not grow.

Issue 10's defect was a batch-1 step that copied the whole pool every layer (10.5 ms
per token with 64 blocks, 501 ms with 4096). This measures, for pools of 64..4096
blocks, batch 1 and batch 2, float32 and bfloat16, the median wall time of a decode
step of `pagedjax.LLM` on the bundled model (greedy, ignore_eos, every request decoding;
prefill steps are not counted), after a warm-up run of the same shapes on the same
engine so that no compilation is timed.

Reported per row: ms per step, ms per output token, and two ratios measured in this
run: to the 64-block row of the same batch and dtype (flat = 1.0), and the model's
matmul FLOP/s as a fraction of this machine's float32 matmul rate (bench.common).

  python -m bench.pool_scaling [--quick]  ->  bench/results/pool_scaling.{json,png}
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from tqdm import tqdm

from bench import common
from pagedjax import LLM, SamplingParams

NAME = "pool_scaling"
PROMPTS = ("The Python language reference describes ", "A class definition is ")


def _decode_step_times(llm: LLM, batch: int, steps: int) -> list[float]:
  """Wall time of each step in which every one of `batch` requests decoded."""
  params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
  for p in PROMPTS[:batch]:
    llm.add_request(None, p, params)
  times = []
  while llm.has_unfinished_requests():
    before = llm.memory_stats()
    start = time.perf_counter()
    llm.step()
    dt = time.perf_counter() - start
    after = llm.memory_stats()
    if after["num_prefill_tokens"] == before["num_prefill_tokens"] \
        and before["num_running_seqs"] == batch:
      times.append(dt)
  return times


def measure(pools: list[int], batches: list[int], dtypes: list[str], steps: int) -> list[dict]:
  rows = []
  cases = [(d, b, n) for d in dtypes for b in batches for n in pools]
  for dtype, batch, num_blocks in tqdm(cases, desc=NAME, disable=None):
    llm = LLM(num_blocks=num_blocks, dtype=dtype, max_num_seqs=8, attention_impl="xla")
    _decode_step_times(llm, batch, 4)  # compiles this pool's programs
    times = np.asarray(_decode_step_times(llm, batch, steps))
    flops = _flops_per_token(llm.model_config)
    med = float(np.median(times))
    rows.append({
        "dtype": dtype, "batch": batch, "num_blocks": num_blocks,
        "kv_pool_mib": llm.memory_stats()["bytes_per_block"] * num_blocks / 2**20,
        "decode_steps": len(times), "ms_per_step": 1e3 * med,
        "ms_per_step_p90": 1e3 * float(np.percentile(times, 90)),
        "ms_per_token": 1e3 * med / batch, "model_gflops": batch * flops / med / 1e9,
        "num_compilations": llm.num_compilations,
    })
  for row in rows:
    base = next(r for r in rows if r["dtype"] == row["dtype"] and r["batch"] == row["batch"])
    row["ratio_to_smallest_pool"] = row["ms_per_step"] / base["ms_per_step"]
  return rows


def _flops_per_token(cfg) -> float:
  """2 x the weights used in matmuls per token (projections, MLP, output head)."""
  attn = cfg.dim * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  attn += cfg.num_heads * cfg.head_dim * cfg.dim
  return 2.0 * (cfg.num_layers * (attn + 3 * cfg.dim * cfg.hidden_dim) + cfg.dim * cfg.vocab_size)


def _figure(rows: list[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  for dtype in sorted({r["dtype"] for r in rows}):
    for batch in sorted({r["batch"] for r in rows}):
      sel = [r for r in rows if r["dtype"] == dtype and r["batch"] == batch]
      ax.plot([r["num_blocks"] for r in sel], [r["ms_per_token"] for r in sel], marker="o",
              label=f"{dtype}, batch {batch}")
  ax.set_xscale("log", base=2)
  ax.set_ylim(bottom=0)
  ax.set_xlabel("KV pool size (blocks of 16 tokens)")
  ax.set_ylabel("ms per output token (median decode step / batch)")
  ax.set_title("Decode cost does not depend on the pool size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, pools: list[int] | None = None,
        steps: int | None = None) -> dict:
  """Runs the sweep; prints the table and writes pool_scaling.json / .png.

  Args:
    quick: two pool sizes, float32, few steps: a smoke run.
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    pools: pool sizes in blocks (None: 64, 256, 1024, 4096; quick: 64, 1024).
    steps: timed decode steps per row (None: 48; quick: 6).
  """
  pools = pools or ([64, 1024] if quick else [64, 256, 1024, 4096])
  steps = steps or (6 if quick else 48)
  dtypes = ["float32"] if quick else ["float32", "bfloat16"]
  batches = [1, 2]
  rate = common.matmul_rate(reps=3 if quick else 20)
  rows = measure(pools, batches, dtypes, steps)
  for r in rows:
    r["fraction_of_matmul_rate"] = r["model_gflops"] / rate["gflops"]
  print(f"\ndecode step vs KV pool size (bundled model; matmul rate {rate['gflops']:.1f} "
        f"GFLOP/s on {rate['shape']})")
  cols = ["dtype", "batch", "num_blocks", "kv_pool_mib", "ms_per_step", "ms_per_token",
          "ratio_to_smallest_pool", "fraction_of_matmul_rate"]
  print(common.format_table(cols, [[r[c] for c in cols] for r in rows]))
  out = common.results_dir(quick, out_dir)
  _figure(rows, out / f"{NAME}.png")
  report = {
      "benchmark": NAME,
      "command": "python -m bench.pool_scaling" + (" --quick" if quick else ""),
      "inputs": {"pools": pools, "batches": batches, "dtypes": dtypes, "steps": steps,
                 "prompts": list(PROMPTS), "quick": quick},
      "machine": common.machine_info(),
      "matmul_rate": rate,
      "headline": {
          f"max ratio to 64 blocks, batch {b}": round(max(
              r["ratio_to_smallest_pool"] for r in rows if r["batch"] == b), 3)
          for b in batches
      } | {
          f"ms/token batch {b} at {pools[-1]} blocks ({dtypes[0]})": round(next(
              r["ms_per_token"] for r in rows if r["batch"] == b and r["num_blocks"] == pools[-1]
              and r["dtype"] == dtypes[0]), 3)
          for b in batches
      },
      "results": rows,
      "notes": [
          "Median wall time of decode-only steps (every request decoding), after a warm-up "
          "of the same shapes on the same engine; prefill steps are not counted.",
          "ratio_to_smallest_pool: ms per step / the 64-block row of the same batch and dtype "
          "(flat = 1.0; the defect this guards was 48x at 4096 blocks).",
          "Shared machine: compare rows within one run only.",
      ],
  }
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run")
  parser.add_argument("--pools", type=int, nargs="+", default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--out-dir", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  return run(args.quick, args.out_dir, pools=args.pools, steps=args.steps)


if __name__ == "__main__":
  main()
