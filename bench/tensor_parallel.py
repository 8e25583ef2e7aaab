"""Tensor parallelism: per-device KV memory, the context a fixed per-device budget holds, and the bytes each step communicates.

  python -m bench.tensor_parallel [--quick] [--num-requests N] [--seed S]

For k = 1, 2, 4, 8 devices (CPU devices forced with XLA_FLAGS when this machine has fewer:
the run re-executes itself in a subprocess with 8), the bundled model is served with
`tensor_parallel_size=k` and the same KV budget *per device*:

* memory: bytes of one block on each device (its kv heads' shard), blocks and KV tokens
  the budget holds, bytes actually allocated per device (read off the arrays' shards),
  and how many full-context sequences fit; the bundled model has 4 kv heads, so k = 8
  replicates each on two devices and holds no more than k = 4 (as in vLLM);
* communication: the collectives of every compiled step program, from its HLO (op count
  and result bytes on one device), against the Megatron count 2 x layers all-reduces of
  [tokens, dim] per step; no all-gather (the pool never moves);
* a sharegpt-like trace served at that budget: peak running sequences, preemptions and,
  for the record only, tokens/s (forced CPU devices share this machine's 2 cores, so k > 1
  is slower here: the figure means nothing for real accelerators);
* exactness: every k's greedy outputs against k = 1's.

Writes bench/results/tensor_parallel.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

NAME = "tensor_parallel"
SIZES = (1, 2, 4, 8)
BLOCK = 16


def _measure(quick: bool, num_requests: int | None, seed: int) -> dict:
  import jax
  from tqdm import tqdm

  from bench import common
  from bench.workloads import make_trace
  from pagedjax import LLM
  from pagedjax.intmath import ceil_div
  from pagedjax.runner import sharding

  sizes = [k for k in SIZES if k <= jax.device_count()]
  budget_mb = 1.0 if quick else 4.0
  cfg = None
  rows, comm_rows, outputs = [], [], {}
  trace = None
  for k in tqdm(sizes, desc=NAME):
    make = lambda: LLM(tensor_parallel_size=k, kv_cache_memory_mb=budget_mb,  # noqa: E731
                       num_host_blocks=0, block_size=BLOCK)
    llm = make()
    cfg = llm.model_config
    if trace is None:
      n = num_requests or (4 if quick else 48)
      max_len = 128 if quick else cfg.max_seq_len
      trace = make_trace("sharegpt-like", n, max_seq_len=max_len, seed=seed,
                         scale=cfg.max_seq_len / 2048)
    if not quick:
      common.serve_trace(llm, trace)  # warm-up: compile every program the trace reaches
      llm = make()
    res = common.serve_trace(llm, trace)
    st = llm.memory_stats()
    outputs[k] = res["outputs"]
    blocks_per_seq = ceil_div(cfg.max_seq_len, BLOCK)
    rows.append({
        "tensor_parallel_size": k,
        "kv_heads_per_device": sharding.kv_heads_per_device(cfg.num_kv_heads, k),
        "kv_cache_memory_mb_per_device": budget_mb,
        "bytes_per_block_per_device": st["bytes_per_block_per_device"],
        "bytes_per_block_all_devices": st["bytes_per_block"],
        "num_blocks": st["num_blocks"],
        "kv_tokens_in_budget": st["num_blocks"] * BLOCK,
        "full_context_seqs": st["num_blocks"] // blocks_per_seq,
        "allocated_mib_per_device": st["kv_cache_bytes_per_device"] / 2**20,
        "peak_running_seqs": res["peak_running_seqs"],
        "num_preemptions": st["num_preemptions"],
        "output_tokens_per_s": res["output_tokens_per_s"],
        "num_compilations": st["num_compilations"],
        "outputs_equal_k1": res["outputs"] == outputs[1],
    })
    if k == 1:
      continue
    for key, compiled in llm.runner.compiled_programs():
      ops = sharding.collectives(compiled.as_text())
      t_cap = key[0]
      expected = 2 * cfg.num_layers * t_cap * cfg.dim * 4  # float32 [T, dim] per all-reduce
      ar = ops.get("all-reduce", {"count": 0, "bytes": 0})
      comm_rows.append({
          "tensor_parallel_size": k, "program": str(key), "tokens": t_cap,
          "all_reduce_count": ar["count"], "all_reduce_bytes": ar["bytes"],
          "bytes_per_token": ar["bytes"] / t_cap, "megatron_bytes": expected,
          "other_collectives": sorted(set(ops) - {"all-reduce"}),
      })
  comm_rows.sort(key=lambda r: (r["tensor_parallel_size"], r["tokens"]))
  return {"rows": rows, "comm_rows": comm_rows, "trace": trace.describe(),
          "budget_mb": budget_mb, "num_layers": cfg.num_layers, "dim": cfg.dim,
          "num_kv_heads": cfg.num_kv_heads, "max_seq_len": cfg.max_seq_len,
          "devices": jax.device_count(), "machine": common.machine_info()}


def _figure(rep, path):
  from bench import common

  plt = common.pyplot()
  rows, comm = rep["memory"], rep["communication"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  ax = axes[0]
  ks = [str(r["tensor_parallel_size"]) for r in rows]
  ax.bar(ks, [r["kv_tokens_in_budget"] for r in rows], color="tab:blue",
         label="KV tokens the budget holds")
  ax.set_xlabel("tensor_parallel_size k")
  ax.set_ylabel("tokens")
  ax2 = ax.twinx()
  ax2.plot(ks, [r["bytes_per_block_per_device"] / 1024 for r in rows], "o-", color="tab:red",
           label="KiB per block per device")
  ax2.set_ylabel("KiB per block per device", color="tab:red")
  ax.set_title(f"{rep['inputs']['kv_cache_memory_mb_per_device']:g} MiB of KV per device "
               f"({rep['inputs']['num_kv_heads']} kv heads)")
  ax.legend(loc="upper left", fontsize=8)
  ax = axes[1]
  for i, k in enumerate(sorted({r["tensor_parallel_size"] for r in comm})):
    rs = [r for r in comm if r["tensor_parallel_size"] == k]
    ax.plot([r["tokens"] for r in rs], [r["all_reduce_bytes"] / 2**20 for r in rs], "o",
            ms=11 - 3 * i, label=f"k={k} (compiled HLO)")  # equal values: nested markers
  toks = sorted({r["tokens"] for r in comm})
  ax.plot(toks, [2 * rep["inputs"]["num_layers"] * t * rep["inputs"]["dim"] * 4 / 2**20
                 for t in toks], "k--", label="2 x layers x tokens x dim x 4 B")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("tokens in the step (bucket)")
  ax.set_ylabel("all-reduce MiB per step per device")
  ax.set_title("bytes communicated per step")
  ax.legend(fontsize=8)
  fig.tight_layout()
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, num_requests: int | None = None,
        seed: int = 0) -> dict:
  """Runs the experiment (in a subprocess with 8 CPU devices when this process has fewer);
  prints the tables, writes JSON and the figure."""
  import jax

  from bench import common

  out = common.results_dir(quick, out_dir)
  if jax.device_count() < max(SIZES) and jax.default_backend() == "cpu":
    with tempfile.TemporaryDirectory() as tmp:
      env = dict(os.environ)
      env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no executables shared across device counts
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={max(SIZES)}").strip()
      root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
      cmd = [sys.executable, "-m", "bench.tensor_parallel", "--_measure-to", f"{tmp}/m.json",
             "--seed", str(seed)] + (["--quick"] if quick else []) + (
             ["--num-requests", str(num_requests)] if num_requests else [])
      subprocess.run(cmd, env=env, check=True, cwd=root)
      with open(f"{tmp}/m.json") as f:
        m = json.load(f)
  else:
    m = _measure(quick, num_requests, seed)
  rows, comm = m["rows"], m["comm_rows"]
  print(common.format_table(
      ["k", "kv heads/dev", "B/block/dev", "blocks", "KV tokens", "full-ctx seqs",
       "alloc MiB/dev", "peak seqs", "preempt", "tok/s", "== k=1"],
      [[r["tensor_parallel_size"], r["kv_heads_per_device"], r["bytes_per_block_per_device"],
        r["num_blocks"], r["kv_tokens_in_budget"], r["full_context_seqs"],
        r["allocated_mib_per_device"], r["peak_running_seqs"], r["num_preemptions"],
        r["output_tokens_per_s"], str(r["outputs_equal_k1"])] for r in rows]))
  print(common.format_table(
      ["k", "program", "tokens", "all-reduces", "bytes", "bytes/token", "megatron bytes",
       "other collectives"],
      [[r["tensor_parallel_size"], r["program"], r["tokens"], r["all_reduce_count"],
        r["all_reduce_bytes"], r["bytes_per_token"], r["megatron_bytes"],
        ",".join(r["other_collectives"]) or "-"] for r in comm]))
  by_k = {r["tensor_parallel_size"]: r for r in rows}
  kmax = max(by_k)
  report = {
      "benchmark": NAME,
      "command": "python -m bench.tensor_parallel" + (" --quick" if quick else ""),
      "inputs": {"seed": seed, "quick": quick, "trace": m["trace"], "block_size": BLOCK,
                 "kv_cache_memory_mb_per_device": m["budget_mb"], "num_layers": m["num_layers"],
                 "dim": m["dim"], "num_kv_heads": m["num_kv_heads"],
                 "max_seq_len": m["max_seq_len"], "devices": m["devices"]},
      "machine": m["machine"],
      "headline": {
          f"KV tokens per {m['budget_mb']:g} MiB/device, k=" + "/".join(map(str, by_k)): [
              by_k[k]["kv_tokens_in_budget"] for k in by_k],
          "all-reduce bytes per token per step": sorted({r["bytes_per_token"] for r in comm}),
          "non-all-reduce collectives": sorted({c for r in comm for c in r["other_collectives"]}),
          f"outputs equal to k=1 for every k up to {kmax}": all(r["outputs_equal_k1"]
                                                               for r in rows),
      },
      "memory": rows, "communication": comm, "figure": f"{NAME}.png",
      "notes": [
          "kv_cache_memory_mb is per device (as vLLM sizes its cache per GPU); each device "
          "holds its kv heads' shard of every block, so blocks grow with k until k reaches "
          "the kv heads, after which heads are replicated and blocks stop growing.",
          "allocated_mib_per_device: the page arrays are padded to a multiple of 64 blocks "
          "(programs shared across nearby pool sizes), so it can exceed the budget.",
          "Collective bytes: result size of each op on one device, from the compiled HLO.",
          "tokens/s: forced CPU devices share 2 cores; k > 1 is slower here by construction.",
      ],
  }
  _figure(report, out / f"{NAME}.png")
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--num-requests", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--_measure-to", dest="measure_to", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure_to:  # the subprocess with forced devices
    m = _measure(args.quick, args.num_requests, args.seed)
    with open(args.measure_to, "w") as f:
      json.dump(m, f)
    return m
  return run(args.quick, num_requests=args.num_requests, seed=args.seed)


if __name__ == "__main__":
  main()
