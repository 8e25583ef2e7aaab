"""The block-size trade-off: internal fragmentation vs decode attention time, sizes 8..128.

Fragmentation: one seeded "sharegpt-like" trace (`bench/workloads.py`, scaled to the
bundled model's 512-token context) is served by `pagedjax.LLM` at block size 16 (greedy,
ignore_eos, all requests at t=0, a pool large enough that nothing is preempted); after
every step the token count of each live sequence is recorded. With no preemption and no
sharing the schedule does not depend on the block size, and the block manager gives a
sequence of n tokens exactly ceil(n / B) blocks, so the internal fragmentation at any
block size B follows from those counts:
  fragmentation % = 100 * sum_steps sum_seqs (ceil(n/B)*B - n) / sum_steps sum_seqs ceil(n/B)*B.
That replay is checked against the engine's own `memory_stats()` at block size 16 and,
in the full run, by serving the trace again at block size 64 (the JSON's "engine_check").

Attention: `pagedjax.runner.attention.paged_decode_attention` (impl="xla") on the same logical
K/V at every block size (the bundled model's heads: 8 query, 4 kv, head_dim 32; batch 8
at a 512-token context; pages scattered by a random permutation), median of --runs calls.
Larger blocks mean fewer, longer gathers. Not measured: the Pallas kernel (GPU only).

  python -m bench.fragmentation [--quick]  ->  bench/results/fragmentation.{json,png}
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bench import common
from bench.memory_waste import make_engine, serve_and_sample
from bench.workloads import make_trace
from pagedjax.runner.attention import paged_decode_attention

NAME = "fragmentation"
BLOCK_SIZES = (8, 16, 32, 64, 128)
ENGINE_BLOCK_SIZE = 16
CHECK_BLOCK_SIZE = 64  # full run: the engine serves the trace again at this size


def replay_fragmentation(lengths: list[list[int]], block_size: int) -> dict:
  """Internal fragmentation of per-step sequence lengths at `block_size` (see module doc)."""
  n = np.concatenate([np.asarray(step, np.int64) for step in lengths if step])
  reserved = -(-n // block_size) * block_size
  return {
    "fragmentation_pct": 100.0 * float(1 - n.sum() / reserved.sum()),
    "mean_empty_slots_per_seq": float((reserved - n).mean()),
  }


def engine_fragmentation(trace, block_size: int) -> float:
  """Serves `trace` at `block_size`; the engine's own time-averaged fragmentation %."""
  sampled = serve_and_sample(make_engine([trace], block_size), trace)
  return 100.0 * (1 - sampled["filled"] / sampled["reserved"]["paged"])


def time_attention(block_size: int, *, batch: int, context: int, runs: int, seed: int) -> float:
  """Median seconds of one xla paged decode attention call over the same logical K/V."""
  heads, kv_heads, head_dim = 8, 4, 32  # the bundled model's attention shape
  rng = np.random.default_rng(seed)
  # The same logical K/V [B, Hkv, S, D] for every block size; only its paging differs.
  k = rng.standard_normal((batch, kv_heads, context, head_dim), np.float32)
  v = rng.standard_normal((batch, kv_heads, context, head_dim), np.float32)
  q = jnp.asarray(rng.standard_normal((batch, heads, head_dim), np.float32))
  per_seq = context // block_size
  perm = rng.permutation(batch * per_seq)
  tables = perm.reshape(batch, per_seq).astype(np.int32)  # [B, P]

  def pages(x):  # [B, Hkv, S, D] -> [Hkv, N, bs, D] placed at the table's block ids
    x = x.reshape(batch, kv_heads, per_seq, block_size, head_dim).transpose(1, 0, 2, 3, 4)
    out = np.empty((kv_heads, batch * per_seq, block_size, head_dim), np.float32)
    out[:, tables.reshape(-1)] = x.reshape(kv_heads, batch * per_seq, block_size, head_dim)
    return jnp.asarray(out)

  fn = functools.partial(
    paged_decode_attention,
    q,
    pages(k),
    pages(v),
    jnp.asarray(tables),
    jnp.full((batch,), context, jnp.int32),
    sm_scale=head_dim**-0.5,
    impl="xla",
  )
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def plot(rows: list[dict], attention: dict, path) -> None:
  """Bars: fragmentation % per block size; line on a twin axis: attention ms."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  x = np.arange(len(rows))
  bars = ax.bar(x, [r["fragmentation_pct"] for r in rows], 0.6, color="tab:blue", alpha=0.8)
  ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
  ax.set_xticks(x, [str(r["block_size"]) for r in rows])
  ax.set(xlabel="block size (tokens)", ylabel="internal fragmentation, % of reserved slots")
  ax.yaxis.label.set_color("tab:blue")
  ax2 = ax.twinx()
  ax2.plot(x, [r["attention_ms"] for r in rows], "o-", color="tab:red")
  ax2.set_ylabel(
    f"decode attention ms (xla, batch {attention['batch']}, ctx {attention['context']})",
    color="tab:red",
  )
  ax2.set_ylim(bottom=0)
  ax.set_title("Block size: memory waste vs attention time")
  common.save_figure(fig, path)


def run(
  quick: bool = False, out_dir=None, *, num_requests: int | None = None, seed: int = 0
) -> dict:
  """Runs the experiment; writes fragmentation.json and .png.

  Args:
    quick: small smoke run (the quick memory_waste trace, few timing runs, no engine check
      at a second block size).
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    num_requests: requests in the trace (None: 8 quick, 24 full).
    seed: trace and K/V seed.

  Returns:
    The report written to JSON.
  """
  num_requests = num_requests or (8 if quick else 24)
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  attention = {"batch": 8, "context": 512, "runs": 5 if quick else 30}
  trace = make_trace("sharegpt-like", num_requests, max_seq_len=512, seed=seed)
  check_sizes = (ENGINE_BLOCK_SIZE,) if quick else (ENGINE_BLOCK_SIZE, CHECK_BLOCK_SIZE)
  with tqdm(total=len(check_sizes) + len(BLOCK_SIZES), desc=NAME, disable=None) as bar:
    sampled = serve_and_sample(make_engine([trace], ENGINE_BLOCK_SIZE), trace)
    engine_check = {
      ENGINE_BLOCK_SIZE: 100.0 * (1 - sampled["filled"] / sampled["reserved"]["paged"])
    }
    bar.update(1)
    for bs in check_sizes[1:]:
      engine_check[bs] = engine_fragmentation(trace, bs)
      bar.update(1)
    rows = []
    for bs in BLOCK_SIZES:
      row = {"block_size": bs, **replay_fragmentation(sampled["lengths"], bs)}
      row["attention_ms"] = 1e3 * time_attention(bs, seed=seed, **attention)
      rows.append(row)
      bar.update(1)
  by_size = {r["block_size"]: r for r in rows}
  out = common.results_dir(quick, out_dir)
  plot(rows, attention, out / f"{NAME}.png")
  report = {
    "benchmark": NAME,
    "command": "python -m bench.fragmentation" + (" --quick" if quick else ""),
    "inputs": {
      "num_requests": num_requests,
      "seed": seed,
      "quick": quick,
      "engine_block_size": ENGINE_BLOCK_SIZE,
      "attention": attention | {"heads": 8, "kv_heads": 4, "head_dim": 32, "impl": "xla"},
    },
    "trace": trace.describe(),
    "steps": len(sampled["lengths"]),
    "engine_check": {
      str(bs): {"engine_pct": pct, "replay_pct": by_size[bs]["fragmentation_pct"]}
      for bs, pct in engine_check.items()
    },
    "machine": common.machine_info(),
    "headline": {
      f"fragmentation % at block {bs}": round(by_size[bs]["fragmentation_pct"], 2)
      for bs in (16, 128)
    }
    | {f"attention ms at block {bs}": round(by_size[bs]["attention_ms"], 3) for bs in (8, 16, 128)},
    "results": rows,
  }
  common.write_json(out / f"{NAME}.json", report)
  print(f"\nblock-size trade-off ({trace.name} x{trace.scale:g}, {report['steps']} engine steps):")
  print(
    common.format_table(
      ["block size", "fragmentation %", "empty slots/seq", "attention ms"],
      [
        [r["block_size"], r["fragmentation_pct"], r["mean_empty_slots_per_seq"], r["attention_ms"]]
        for r in rows
      ],
    )
  )
  print(f"wrote {out / NAME}.json")
  return report


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()
