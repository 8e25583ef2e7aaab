"""Host bookkeeping cost of the block manager per decode step, and of fork / free.

For 256 and 1024 running sequences with "sharegpt-like" prompt lengths
(log-normal, mean ~161 tokens, block size 16) it times, per decode step:
  * `append_slot` for every running sequence (a new block every 16 steps per
    sequence, so allocation is in the mix),
  * `blocks_to_append` + `append_slot`, the check/act pair a scheduler runs,
and per operation: `fork` of every sequence (parallel sampling), the next
decode step of the children (copy-on-write of the shared last block), and
`free` of the children. Figures are microseconds per sequence (median and p90
over steps or repeats). Goal (DESIGN.md): <= 2 us per sequence per step. The figure
shows the median (bar) and p90 (whisker) per op, one bar per number of sequences, against
the goal line.

Does not touch JAX or the device: host-side Python only, garbage collector on.

  python -m bench.host_overhead [--quick]  ->  table + bench/results/host_overhead.{json,png}
                                            (--quick: bench/results/tmp/)
"""

import argparse
import pathlib
import statistics
import time

import numpy as np
from tqdm import tqdm

from bench import common
from pagedjax.core.block_manager import BlockManager

GOAL_US = 2.0


def sharegpt_like_prompts(
  rng: np.random.Generator, n: int, *, mean: float = 161.0, sigma: float = 0.8, max_len: int = 2048
) -> list[int]:
  """Long-tailed (log-normal) prompt lengths with the given mean, clipped to [1, max_len]."""
  mu = np.log(mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
  return np.clip(rng.lognormal(mu, sigma, n).round(), 1, max_len).astype(int).tolist()


def _per_seq_us(ns: list[int], num_seqs: int) -> dict[str, float]:
  us = np.asarray(ns) / 1e3 / num_seqs
  return {
    "median_us": float(np.median(us)),
    "p90_us": float(np.percentile(us, 90)),
    "mean_us": float(us.mean()),
    "samples": len(us),
  }


def bench_decode(bm: BlockManager, ids: list[int], steps: int, pbar: tqdm) -> dict:
  """Times `steps` decode steps of append_slot, then of blocks_to_append + append_slot."""
  out = {}
  for name, check in (("append_slot", False), ("blocks_to_append+append_slot", True)):
    ns = []
    blocks_before = bm.num_free_blocks
    for _ in range(steps):
      t0 = time.perf_counter_ns()
      if check:
        for sid in ids:
          if bm.blocks_to_append(sid) <= bm.num_free_blocks:
            bm.append_slot(sid)
      else:
        for sid in ids:
          bm.append_slot(sid)
      ns.append(time.perf_counter_ns() - t0)
      pbar.update(1)
    out[name] = _per_seq_us(ns, len(ids)) | {"new_blocks": blocks_before - bm.num_free_blocks}
  return out


def bench_fork_free(bm: BlockManager, ids: list[int], repeats: int, pbar: tqdm) -> dict:
  """Times fork of every sequence, the children's first (COW) step, and freeing them."""
  fork_ns, cow_ns, free_ns = [], [], []
  cows = 0
  for r in range(repeats):
    children = [("child", r, sid) for sid in ids]
    t0 = time.perf_counter_ns()
    for sid, child in zip(ids, children):
      bm.fork(sid, child)
    t1 = time.perf_counter_ns()
    refs = [bm.append_slot(child) for child in children]
    t2 = time.perf_counter_ns()
    for child in children:
      bm.free(child)
    t3 = time.perf_counter_ns()
    fork_ns.append(t1 - t0)
    cow_ns.append(t2 - t1)
    free_ns.append(t3 - t2)
    cows += sum(ref.cow is not None for ref in refs)
    pbar.update(1)
  blocks_per_seq = statistics.mean(len(bm.block_table(sid)) for sid in ids)
  return {
    "fork": _per_seq_us(fork_ns, len(ids)) | {"blocks_per_seq": blocks_per_seq},
    "append_slot after fork (COW)": _per_seq_us(cow_ns, len(ids))
    | {"cow_fraction": cows / (repeats * len(ids))},
    "free (forked child)": _per_seq_us(free_ns, len(ids)),
  }


def measure(
  num_seqs_list: list[int], steps: int, repeats: int, block_size: int, seed: int
) -> list[dict]:
  """Timing rows for every number of sequences (see the module docstring)."""
  rng = np.random.default_rng(seed)
  rows = []
  with tqdm(
    total=len(num_seqs_list) * (2 * steps + repeats), desc="host overhead", disable=None
  ) as pbar:
    for num_seqs in num_seqs_list:
      prompts = sharegpt_like_prompts(rng, num_seqs)
      # Room for the prompts, 2 * steps + repeats appended tokens each, one COW block each.
      bm = BlockManager(
        sum(-(-(p + 2 * steps + repeats) // block_size) + 1 for p in prompts) + 2 * num_seqs,
        block_size,
      )
      ids = list(range(num_seqs))
      for sid, p in zip(ids, prompts):
        bm.allocate(sid, p)
      for _ in range(block_size):  # warm-up: one block boundary per sequence
        for sid in ids:
          bm.append_slot(sid)
      results = bench_decode(bm, ids, steps, pbar) | bench_fork_free(bm, ids, repeats, pbar)
      stats = bm.stats()
      for op, figures in results.items():
        rows.append({"op": op, "num_seqs": num_seqs, **figures})
      rows.append(
        {
          "op": "final memory",
          "num_seqs": num_seqs,
          "used_device_blocks": stats.used_device_blocks,
          "fragmentation": stats.fragmentation,
          "mean_prompt_len": float(np.mean(prompts)),
        }
      )
  return rows


def _figure(rows: list[dict], path: pathlib.Path) -> None:
  """Median (bar) and p90 (whisker) us per sequence of every op, per number of sequences."""
  plt = common.pyplot()
  timed = [r for r in rows if "median_us" in r]
  ops = list(dict.fromkeys(r["op"] for r in timed))
  cases = list(dict.fromkeys(r["num_seqs"] for r in timed))
  by = {(r["op"], r["num_seqs"]): r for r in timed}
  fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(ops) * len(cases) ** 0.5 + 2), 4.2))
  x = np.arange(len(ops))
  width = 0.8 / len(cases)
  for k, n in enumerate(cases):
    sel = [by.get((op, n)) for op in ops]
    med = [r["median_us"] if r else np.nan for r in sel]
    up = [r["p90_us"] - r["median_us"] if r else 0.0 for r in sel]
    pos = x + (k - (len(cases) - 1) / 2) * width
    bars = ax.bar(pos, med, width, yerr=[np.zeros(len(ops)), up], capsize=3, label=f"{n} seqs")
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
  ax.axhline(GOAL_US, color="k", ls="--", lw=0.8, label=f"goal {GOAL_US:g} us/seq/step")
  ax.set_xticks(x, [op.replace(" (", "\n(").replace("+", "+\n") for op in ops], fontsize=8)
  ax.set_ylim(0, max(GOAL_US, max(r["p90_us"] for r in timed)) * 1.2)
  ax.set_ylabel("us per sequence (bar: median, whisker: p90)")
  ax.set_title("Block manager host cost per decode step / per op")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


def run(
  quick: bool = False,
  out_dir=None,
  *,
  num_seqs: list[int] | None = None,
  steps: int | None = None,
  repeats: int | None = None,
  block_size: int = 16,
  seed: int = 0,
) -> dict:
  """Runs the benchmark; prints the table and writes host_overhead.json / .png.

  Args:
    quick: few steps, a smoke run (~2 s).
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    num_seqs: running sequences per case (None: 256 and 1024).
    steps: timed decode steps per variant (None: 32 quick, 512 full).
    repeats: fork / COW / free repeats (None: 5 quick, 50 full).
    block_size: tokens per block.
    seed: prompt-length seed.

  Returns:
    The report written to JSON.
  """
  num_seqs = num_seqs or [256, 1024]
  steps = steps or (32 if quick else 512)
  repeats = repeats or (5 if quick else 50)
  rows = measure(num_seqs, steps, repeats, block_size, seed)

  print(
    f"\nhost bookkeeping, us per sequence (block_size={block_size}, goal <= {GOAL_US} us/seq/step)"
  )
  print(
    common.format_table(
      ["op", "seqs", "median", "p90", "mean", "note"],
      [
        [
          row["op"],
          row["num_seqs"],
          row["median_us"],
          row["p90_us"],
          row["mean_us"],
          ", ".join(
            f"{k}={row[k]:.3g}"
            for k in ("new_blocks", "blocks_per_seq", "cow_fraction")
            if k in row
          ),
        ]
        for row in rows
        if "median_us" in row
      ],
    )
  )
  step_op = "blocks_to_append+append_slot"
  report = {
    "benchmark": "host_overhead",
    "command": "python -m bench.host_overhead" + (" --quick" if quick else ""),
    "inputs": {
      "num_seqs": num_seqs,
      "steps": steps,
      "repeats": repeats,
      "block_size": block_size,
      "quick": quick,
      "prompt_lengths": "sharegpt-like: log-normal, mean 161, sigma 0.8, clip 2048",
    },
    "seed": seed,
    "goal_us_per_seq_step": GOAL_US,
    "machine": common.machine_info(),
    "headline": {
      f"{step_op} us/seq (median, {row['num_seqs']} seqs)": round(row["median_us"], 3)
      for row in rows
      if row["op"] == step_op
    },
    "figure": "host_overhead.png",
    "results": rows,
  }
  out = common.results_dir(quick, out_dir)
  _figure(rows, out / "host_overhead.png")
  path = common.write_json(out / "host_overhead.json", report)
  print(f"wrote {path} and {out / 'host_overhead.png'}")
  return report


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="few steps: a smoke run (~2 s)")
  parser.add_argument("--num-seqs", type=int, nargs="+", default=None)
  parser.add_argument("--steps", type=int, default=None, help="timed decode steps per variant")
  parser.add_argument("--repeats", type=int, default=None, help="fork/COW/free repeats")
  parser.add_argument("--block-size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-dir", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  return run(
    args.quick,
    args.out_dir,
    num_seqs=args.num_seqs,
    steps=args.steps,
    repeats=args.repeats,
    block_size=args.block_size,
    seed=args.seed,
  )


if __name__ == "__main__":
  main()
