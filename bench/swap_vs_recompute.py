"""Preemption by swapping vs by recomputation: end to end, and per block.

(a) End to end. One seeded "sharegpt-like" trace (bench/workloads.py, lengths scaled to
    the model's context; every 4th request is parallel sampling with n=2, the others
    greedy; `ignore_eos`, so every request generates its trace length) is served by
    `pagedjax.LLM` with a KV cache of a fraction of the blocks the trace needs, once with
    `preemption_mode="recompute"` and once with "swap" (host pool large enough that swap
    never falls back to recompute). Each mode is run once untimed (compiles every shape
    the deterministic schedule uses), then `reps` times on fresh engines, interleaved;
    reported: median wall time of `generate`, preemptions, blocks swapped each way,
    tokens prefilled (recompute re-prefills), compilations during the timed runs. The
    outputs of every run are asserted identical, token for token.
(b) Micro, as in the vLLM paper's Fig. 19(a). For block sizes 8..128 and a fixed
    `num_tokens` (k = num_tokens / block_size blocks, scattered over a cache of
    `cache_tokens` slots): swap-out then swap-in of the k blocks, all layers, K and V,
    between the device cache and the host pool (`pagedjax.runner.kv_cache.swap_out_blocks` /
    `swap_in_blocks`, pinned_host memory where the backend has it), vs recomputing the
    same tokens: one engine prefill of a `num_tokens`-token prompt (`generate` with
    max_tokens=1, so host scheduling and one sampled token are included, as in a real
    recompute). Medians of repeated runs after warm-up, same process; per block and the
    ratio swap / recompute (< 1: swapping is cheaper).

On this CPU backend "device" and "pinned host" are the same DRAM, so a swap is a
gather + copy, not a PCIe transfer: the ratio says nothing about a GPU's.

  python -m bench.swap_vs_recompute          # -> tables + bench/results/swap_vs_recompute.json
  python -m bench.swap_vs_recompute --quick  # smoke run -> bench/results/tmp/
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams
from pagedjax.weights import checkpoint
from pagedjax.runner import kv_cache as kvc

SEED = 0
BLOCK_SIZE = 16  # end to end
MODES = ("recompute", "swap")
MICRO_BLOCK_SIZES = (8, 16, 32, 64, 128)
# jax.monitoring event recorded once per XLA compilation (jax._src.dispatch).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
NOTES = [
  (
    "End to end: same trace, same device blocks, same max_num_seqs in both modes; wall time is "
    "generate() on a fresh engine after an untimed warm-up run of the identical workload, so "
    "compilation is excluded (xla_compiles_timed counts any that happen); median of the "
    "timed runs."
  ),
  (
    "Micro: swap = swap_out_blocks + swap_in_blocks of k blocks (all layers, K and V, "
    "block_until_ready after each); recompute = one engine step prefilling num_tokens tokens "
    "(generate with max_tokens=1: scheduling, plan building, the jitted paged forward, sampling). "
    "Per-block figures divide both by k = num_tokens / block_size."
  ),
  (
    "On the CPU backend device and pinned_host memory are the same DRAM: a swap is an in-memory "
    "gather + scatter, far cheaper than a GPU's PCIe transfer, and recompute runs the model on "
    "2 shared cores; on a GPU the balance differs (vLLM, Fig. 19: swapping is slow at small "
    "block sizes, recompute does not depend on block size)."
  ),
  (
    "xla_compiles_warmup counts every XLA compilation of the warm-up run. In swap mode some "
    "step shapes compile twice: init_kv_cache's arrays are uncommitted, the cache coming back "
    "from swap_in_blocks is committed to the device, and jit compiles again for it (no retrace, "
    "so num_compilations does not show it). One-off, excluded from the timed runs."
  ),
  "The machine is shared: compare figures within one run (see load_avg_1m_5m_15m).",
]


def _median_s(fn, *, warmup: int, reps: int) -> float:
  """Median wall seconds of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


@contextlib.contextmanager
def count_xla_compiles():
  """Counts XLA compilations in the block (a jit cache hit that still compiles included)."""
  counter = {"n": 0}

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
      counter["n"] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# ----------------------------------------------------------------------- end to end
def e2e_workload(
  num_requests: int, *, seed: int, max_seq_len: int, max_output: int | None = None
) -> tuple[list, list, dict]:
  """The trace's prompts, one SamplingParams each (outputs capped at max_output), its summary."""
  trace = make_trace("sharegpt-like", num_requests, max_seq_len=max_seq_len, seed=seed)
  outs = [min(o, max_output or o) for o in trace.output_lens]
  params = [
    SamplingParams(n=2, temperature=1.0, seed=seed + i, max_tokens=o, ignore_eos=True)
    if i % 4 == 3
    else SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
    for i, o in enumerate(outs)
  ]
  return trace.prompts, params, trace.describe() | {"max_output_cap": max_output}


def serve(
  mode: str, prompts, params, *, num_blocks: int, num_host_blocks: int, max_num_seqs: int
) -> tuple[float, list, dict]:
  """Serves the workload on a fresh engine; returns (wall s, token ids, memory_stats)."""
  llm = LLM(  # the paper's recompute: no prefix cache to re-prefill from
    enable_prefix_caching=False,
    num_blocks=num_blocks,
    block_size=BLOCK_SIZE,
    num_host_blocks=num_host_blocks,
    max_num_seqs=max_num_seqs,
    preemption_mode=mode,
    attention_impl="xla",
  )
  start = time.perf_counter()
  outs = llm.generate(prompts, params)
  wall = time.perf_counter() - start
  tokens = [[c.token_ids for c in o.outputs] for o in outs]
  return wall, tokens, llm.memory_stats()


def end_to_end(
  *,
  num_requests: int,
  memory_fraction: float,
  max_num_seqs: int,
  reps: int,
  seed: int,
  max_seq_len: int,
  max_output: int | None = None,
) -> dict:
  """Part (a): both preemption modes on one workload under the same memory pressure."""
  prompts, params, workload = e2e_workload(
    num_requests, seed=seed, max_seq_len=max_seq_len, max_output=max_output
  )
  need = [p.n * -(-(len(x) + p.max_tokens) // BLOCK_SIZE) for x, p in zip(prompts, params)]
  # At least the largest request (else it could never run); else a fraction of the total.
  num_blocks = max(max(need), int(memory_fraction * sum(need)))
  cfg = {"num_blocks": num_blocks, "num_host_blocks": sum(need), "max_num_seqs": max_num_seqs}
  runs = {m: [] for m in MODES}
  warmup_compiles = {}
  reference = None
  with tqdm(total=(reps + 1) * len(MODES), desc="swap vs recompute (e2e)", disable=None) as bar:
    for rep in range(reps + 1):  # round 0 is the untimed warm-up
      for mode in MODES:
        with count_xla_compiles() as compiles:
          wall, tokens, stats = serve(mode, prompts, params, **cfg)
        reference = tokens if reference is None else reference
        if tokens != reference:
          raise AssertionError(f"{mode} (round {rep}) produced other tokens than recompute")
        if rep == 0:
          warmup_compiles[mode] = compiles["n"]
        else:
          runs[mode].append((wall, stats, compiles["n"]))
        bar.update(1)
  modes = {}
  for mode, rs in runs.items():
    stats = rs[-1][1]  # the schedule is deterministic: every run has the same counters
    modes[mode] = {
      "wall_s_median": float(np.median([w for w, _, _ in rs])),
      "wall_s_runs": [w for w, _, _ in rs],
      "xla_compiles_warmup": warmup_compiles[mode],
      "xla_compiles_timed": sum(c for _, _, c in rs),
      **{
        k: stats[k]
        for k in (
          "num_preemptions",
          "num_preemptions_recompute",
          "num_preemptions_swap",
          "num_blocks_swapped_out",
          "num_blocks_swapped_in",
          "num_prefill_tokens",
          "num_generated_tokens",
          "num_steps",
          "num_prefill_steps",
          "num_decode_steps",
          "peak_used_blocks",
        )
      },
      "leaked_blocks": stats["used_device_blocks"] + stats["used_host_blocks"],
    }
  return {
    "workload": workload
    | {
      "params": "every 4th request n=2 temperature 1 (seeded), others "
      "greedy; ignore_eos; max_tokens = trace output length"
    },
    "blocks_needed_without_preemption": sum(need),
    "memory_fraction": memory_fraction,
    "block_size": BLOCK_SIZE,
    **cfg,
    "timed_reps_per_mode": reps,
    "outputs_identical": True,  # asserted above for every run, warm-up included
    "num_output_sequences": sum(len(t) for t in reference),
    "modes": modes,
    "swap_over_recompute_wall": modes["swap"]["wall_s_median"]
    / modes["recompute"]["wall_s_median"],
  }


# -------------------------------------------------------------------------- micro
def swap_cost(
  model_cfg,
  block_size: int,
  *,
  num_tokens: int,
  cache_tokens: int,
  warmup: int,
  reps: int,
  rng: np.random.Generator,
) -> dict:
  """Median seconds to swap out and to swap in num_tokens / block_size scattered blocks."""
  k = num_tokens // block_size
  cache = kvc.init_kv_cache(
    num_layers=model_cfg.num_layers,
    num_kv_heads=model_cfg.num_kv_heads,
    num_blocks=cache_tokens // block_size,
    block_size=block_size,
    head_dim=model_cfg.head_dim,
    dtype=np.float32,
  )
  pool = kvc.init_host_pool(cache, k)
  dev_ids = rng.choice(cache.num_blocks, k, replace=False).astype(np.int32)
  host_ids = np.arange(k, dtype=np.int32)
  state = {"cache": cache, "pool": pool}

  def out():
    state["pool"] = jax.block_until_ready(
      kvc.swap_out_blocks(state["cache"], state["pool"], dev_ids, host_ids)
    )

  def into():
    state["cache"] = jax.block_until_ready(
      kvc.swap_in_blocks(state["cache"], state["pool"], host_ids, dev_ids)
    )

  return {
    "swap_out_s": _median_s(out, warmup=warmup, reps=reps),
    "swap_in_s": _median_s(into, warmup=warmup, reps=reps),
    "host_pool_memory_kind": pool.memory_kind,
  }


def recompute_cost(
  block_size: int,
  *,
  num_tokens: int,
  cache_tokens: int,
  warmup: int,
  reps: int,
  rng: np.random.Generator,
) -> float:
  """Median seconds of one engine prefill of a num_tokens prompt (generate, max_tokens=1)."""
  llm = LLM(  # every repeat computes the prefill: no cache hits
    enable_prefix_caching=False,
    num_blocks=cache_tokens // block_size,
    block_size=block_size,
    max_num_seqs=1,
    attention_impl="xla",
  )
  prompt = rng.integers(0, 256, num_tokens).tolist()
  params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
  return _median_s(lambda: llm.generate(prompt, params), warmup=warmup, reps=reps)


def micro(
  model_cfg,
  *,
  block_sizes,
  num_tokens: int,
  cache_tokens: int,
  swap_reps: int,
  recompute_reps: int,
  seed: int,
) -> list[dict]:
  """Part (b): per-block swap cost vs recompute cost across block sizes."""
  rng = np.random.default_rng(seed)
  rows = []
  for bs in tqdm(block_sizes, desc="swap vs recompute (micro)", disable=None):
    k = num_tokens // bs
    sw = swap_cost(
      model_cfg,
      bs,
      num_tokens=num_tokens,
      cache_tokens=cache_tokens,
      warmup=3,
      reps=swap_reps,
      rng=rng,
    )
    rec = recompute_cost(
      bs, num_tokens=num_tokens, cache_tokens=cache_tokens, warmup=2, reps=recompute_reps, rng=rng
    )
    swap_s = sw["swap_out_s"] + sw["swap_in_s"]
    rows.append(
      {
        "block_size": bs,
        "num_blocks_moved": k,
        "bytes_per_block": 2
        * model_cfg.num_layers
        * model_cfg.num_kv_heads
        * bs
        * model_cfg.head_dim
        * 4,
        **sw,
        "swap_s": swap_s,
        "recompute_s": rec,
        "swap_ms_per_block": 1e3 * swap_s / k,
        "swap_out_ms_per_block": 1e3 * sw["swap_out_s"] / k,
        "swap_in_ms_per_block": 1e3 * sw["swap_in_s"] / k,
        "recompute_ms_per_block": 1e3 * rec / k,
        "swap_over_recompute": swap_s / rec,
      }
    )
  return rows


def measure(quick: bool = False, *, seed: int = SEED) -> dict:
  """Runs (a) and (b).

  Args:
    quick: a smoke run (3 short requests, 2 sequences per step, block size 16 only).
    seed: seeds the trace, the sampling and the block ids.

  Returns:
    The JSON-ready report.
  """
  model_cfg = checkpoint.load(None)[0]
  info = common.machine_info()
  # quick: few requests, short outputs, few sequences per step: few distinct shapes to compile.
  e2e_args = {
    "num_requests": 3 if quick else 24,
    "memory_fraction": 0.35,
    "max_num_seqs": 2 if quick else 32,
    "reps": 1 if quick else 3,
    "max_output": 32 if quick else None,
  }
  micro_args = {
    "block_sizes": (16,) if quick else MICRO_BLOCK_SIZES,
    "num_tokens": 128 if quick else 256,
    "cache_tokens": 2048 if quick else 8192,
    "swap_reps": 5 if quick else 50,
    "recompute_reps": 2 if quick else 9,
  }
  e2e = end_to_end(**e2e_args, seed=seed, max_seq_len=model_cfg.max_seq_len)
  rows = micro(model_cfg, **micro_args, seed=seed)
  info["load_avg_at_end"] = common.machine_info()["load_avg_1m_5m_15m"]
  headline = {
    "e2e wall swap / recompute": e2e["swap_over_recompute_wall"],
    "e2e preemptions (recompute, swap)": ", ".join(
      str(e2e["modes"][m]["num_preemptions"]) for m in MODES
    ),
    "e2e outputs identical": e2e["outputs_identical"],
  } | {f"swap / recompute per block, bs={r['block_size']}": r["swap_over_recompute"] for r in rows}
  return {
    "benchmark": "swap_vs_recompute",
    "command": "python -m bench.swap_vs_recompute" + (" --quick" if quick else ""),
    "inputs": {
      "quick": quick,
      "end_to_end": e2e_args,
      "micro": micro_args | {"block_sizes": list(micro_args["block_sizes"])},
      "attention_impl": "xla",
      "dtype": "float32",
    },
    "seed": seed,
    "machine": info,
    "headline": headline,
    "end_to_end": e2e,
    "micro": rows,
    "figures": ["swap_vs_recompute.png"],
    "notes": NOTES,
  }


def format_tables(doc: dict) -> str:
  """The end-to-end table and the per-block micro table."""
  e = doc["end_to_end"]
  e2e_rows = [
    [
      mode,
      m["wall_s_median"],
      m["num_preemptions"],
      m["num_blocks_swapped_out"],
      m["num_blocks_swapped_in"],
      m["num_prefill_tokens"],
      m["num_steps"],
    ]
    for mode, m in e["modes"].items()
  ]
  micro_rows = [
    [
      r["block_size"],
      r["num_blocks_moved"],
      r["swap_out_ms_per_block"],
      r["swap_in_ms_per_block"],
      r["swap_ms_per_block"],
      r["recompute_ms_per_block"],
      r["swap_over_recompute"],
    ]
    for r in doc["micro"]
  ]
  mi = doc["inputs"]["micro"]
  return "\n".join(
    [
      (
        f"(a) end to end: {e['workload']['num_requests']} sharegpt-like requests, "
        f"{e['num_blocks']} of the {e['blocks_needed_without_preemption']} blocks needed "
        f"(block size {e['block_size']}); outputs identical: {e['outputs_identical']}"
      ),
      common.format_table(
        ["mode", "wall s", "preemptions", "blocks out", "blocks in", "prefill tokens", "steps"],
        e2e_rows,
      ),
      "",
      f"(b) micro: {mi['num_tokens']} tokens = k blocks; ms per block, median",
      common.format_table(
        ["block size", "k", "swap out", "swap in", "swap", "recompute", "swap / recompute"],
        micro_rows,
      ),
    ]
  )


def plot(doc: dict, path: pathlib.Path) -> None:
  """Left: per-block cost vs block size (both curves); right: end-to-end wall time."""
  plt = common.pyplot()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
  rows = doc["micro"]
  bs = [r["block_size"] for r in rows]
  for key, label, style in (
    ("swap_ms_per_block", "swap out + in", "o-"),
    ("swap_out_ms_per_block", "swap out", "x:"),
    ("swap_in_ms_per_block", "swap in", "+:"),
    ("recompute_ms_per_block", "recompute (prefill)", "s-"),
  ):
    ax.plot(bs, [r[key] for r in rows], style, label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(bs, [str(b) for b in bs])
  ax.set_xlabel("block size (tokens)")
  ax.set_ylabel("ms per block (median)")
  ax.set_title(f"Per-block cost, {doc['inputs']['micro']['num_tokens']} tokens moved / recomputed")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  e = doc["end_to_end"]
  modes = list(e["modes"])
  walls = [e["modes"][m]["wall_s_median"] for m in modes]
  bars = bx.bar(modes, walls, color=["tab:red", "tab:green"])
  for bar, m in zip(bars, modes):
    s = e["modes"][m]
    bx.annotate(
      f"{s['num_preemptions']} preemptions\n{s['num_blocks_swapped_out']} blocks out\n"
      f"{s['num_prefill_tokens']} prefill tok",
      (bar.get_x() + bar.get_width() / 2, bar.get_height()),
      ha="center",
      va="bottom",
      fontsize=7,
    )
  bx.set_ylim(0, max(walls) * 1.35)
  bx.set_ylabel("wall time (s, median)")
  bx.set_title(f"End to end, {e['num_blocks']}/{e['blocks_needed_without_preemption']} blocks")
  load = doc["machine"]["load_avg_1m_5m_15m"][0]
  fig.suptitle(f"Swap vs recompute ({jax.default_backend()} backend, load {load:.1f})")
  fig.tight_layout()
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, seed: int = SEED) -> dict:
  """Measures, prints the tables, writes swap_vs_recompute.json and .png.

  Args:
    quick: smoke run (see `measure`).
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    seed: seeds the trace, the sampling and the block ids.

  Returns:
    The report written to JSON.
  """
  doc = measure(quick, seed=seed)
  out = common.results_dir(quick, out_dir)
  print()
  print(format_tables(doc))
  print(
    f"load average {doc['machine']['load_avg_1m_5m_15m']} -> {doc['machine']['load_avg_at_end']}"
  )
  plot(doc, out / "swap_vs_recompute.png")
  path = common.write_json(out / "swap_vs_recompute.json", doc)
  print(f"wrote {path} and {out / 'swap_vs_recompute.png'}")
  return doc


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny smoke run")
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--out-dir", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  return run(args.quick, args.out_dir, seed=args.seed)


if __name__ == "__main__":
  main()
