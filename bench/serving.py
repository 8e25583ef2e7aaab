"""The paper's serving experiment (vLLM, section 6.2, Figure 12) on this machine.

Requests of a seeded trace (bench/workloads.py: sharegpt-like and alpaca-like, lengths
scaled to the model's context) arrive as a Poisson process at increasing rates and are
served by `pagedjax.LLM` in real time (wall clock): requests are added when their
arrival time has passed, one engine step runs, every new token is timestamped. Greedy,
ignore_eos, max_tokens = the trace's output length, so every system does the same work.

Systems, in the same run on the same KV memory (num_blocks x block_size slots), the same
budget and the same engine: only memory management differs.
  * paged: this engine (blocks on demand, preemption by recompute);
  * orca-oracle / orca-pow2 / orca-max: the paper's Orca baselines as admission policies
    (`LLM(kv_reservation=...)`): each request reserves, at admission, its true length
    (prompt + max_tokens), the next power of two of it, or the model's whole context.
Metrics per (system, rate): normalized latency (end-to-end latency / output tokens, mean
over requests: the paper's metric), TTFT and inter-token latency p50 / p99, throughput.
Summary: the highest rate each system sustains with mean normalized latency below a
threshold (stated: a multiple of the paged engine's at the lowest rate), the rate where
its curve crosses the threshold (interpolated), and their ratios to each baseline.
Separately, chunked prefill on vs off for the paged engine: TTFT.

Compilation: `LLM.precompile()` runs every step program the budget and max_num_seqs can
reach before any timing (programs are shared per process, so once for all systems), and
every system serves the trace once untimed; programs compiled during timed runs (a rare
shape with many short prompts in one step) are counted and reported.

  python -m bench.serving [--quick]  ->  bench/results/serving.{json,png}
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams
from pagedjax.runner import step as step_lib
from pagedjax.weights import checkpoint

NAME = "serving"
SYSTEMS = {"paged": None, "orca-oracle": "oracle", "orca-pow2": "pow2", "orca-max": "max"}
BLOCK_SIZE = 16
THRESHOLD_FACTOR = 3.0  # "sustained": mean normalized latency <= this x paged's at the lowest rate


def _engine(reservation, *, num_blocks: int, max_num_seqs: int, budget: int,
            chunked: bool = True) -> LLM:
  return LLM(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
             max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
             kv_reservation=reservation, preemption_mode="recompute")


def _params(trace) -> list[SamplingParams]:
  return [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
          for o in trace.output_lens]


def serve(llm: LLM, trace, arrivals: np.ndarray) -> dict:
  """Serves the trace with request i arriving at arrivals[i] seconds; per-request times."""
  params = _params(trace)
  n = len(trace.prompts)
  times: dict[str, list[float]] = {str(i): [] for i in range(n)}
  finish: dict[str, float] = {}
  nxt = 0
  start = time.perf_counter()
  while nxt < n or llm.has_unfinished_requests():
    now = time.perf_counter() - start
    while nxt < n and arrivals[nxt] <= now:
      llm.add_request(str(nxt), trace.prompts[nxt], params[nxt])
      nxt += 1
    if not llm.has_unfinished_requests():
      time.sleep(max(0.0, arrivals[nxt] - now))
      continue
    outs = llm.step()
    t = time.perf_counter() - start
    for o in outs:
      got = times[o.request_id]
      got.extend([t] * (len(o.outputs[0].token_ids) - len(got)))
      if o.finished:
        finish[o.request_id] = t
  wall = time.perf_counter() - start
  lat, norm, ttft, itl = [], [], [], []
  for i in range(n):
    rid = str(i)
    lat.append(finish[rid] - arrivals[i])
    norm.append(lat[-1] / trace.output_lens[i])
    ttft.append(times[rid][0] - arrivals[i])
    itl.extend(np.diff(times[rid]).tolist())
  pct = lambda x, q: float(np.percentile(x, q)) if len(x) else 0.0  # noqa: E731
  st = llm.memory_stats()
  return {
      "normalized_latency_s": float(np.mean(norm)), "latency_s_mean": float(np.mean(lat)),
      "ttft_s_p50": pct(ttft, 50), "ttft_s_p99": pct(ttft, 99),
      "itl_s_p50": pct(itl, 50), "itl_s_p99": pct(itl, 99),
      "wall_s": wall, "output_tokens_per_s": sum(trace.output_lens) / wall,
      "num_preemptions": st["num_preemptions"], "num_steps": st["num_steps"],
  }


def _warm(make, trace, first: int) -> None:
  """Compiles the shapes a run will use: the whole trace at once, then a few alone."""
  llm = make()
  llm.generate(trace.prompts, _params(trace))
  for p, sp in list(zip(trace.prompts, _params(trace)))[:first]:
    llm.generate(p, sp)


def _sustained(rows: list[dict], threshold: float) -> float:
  ok = [r["rate"] for r in rows if r["normalized_latency_s"] <= threshold]
  return max(ok) if ok else 0.0


def _crossing(rows: list[dict], threshold: float) -> float | None:
  """The rate where the normalized-latency curve crosses the threshold, interpolated
  linearly in log latency between the two measured rates around it (the grid alone
  moves the sustained rate in steps of a fraction of capacity). None if the curve
  never crosses in the sweep (the system sustains at least its highest rate) or starts
  above it."""
  rows = sorted(rows, key=lambda r: r["rate"])
  for lo, hi in zip(rows, rows[1:]):
    a, b = lo["normalized_latency_s"], hi["normalized_latency_s"]
    if a <= threshold < b:
      f = (np.log(threshold) - np.log(a)) / (np.log(b) - np.log(a))
      return float(lo["rate"] + f * (hi["rate"] - lo["rate"]))
  return None


def _figure(report: dict, path: pathlib.Path) -> None:
  plt = common.pyplot()
  traces = list(report["traces"])
  fig, axes = plt.subplots(1, len(traces), figsize=(5.2 * len(traces), 3.8), squeeze=False)
  for ax, name in zip(axes[0], traces):
    t = report["traces"][name]
    for system, rows in t["systems"].items():
      ax.plot([r["rate"] for r in rows], [r["normalized_latency_s"] for r in rows],
              marker="o", label=system)
    ax.axhline(t["threshold_s"], color="grey", ls="--", lw=0.8, label="threshold")
    ax.set_title(f"{name} ({t['num_requests']} requests)")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, num_requests: int | None = None,
        seed: int = 0) -> dict:
  """Runs the rate sweep for every system and trace; writes serving.json / .png.

  Args:
    quick: a smoke run (few requests, one rate, two systems, one trace).
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    num_requests: requests per trace (None: 160; quick: 6). Enough that queues build
      past a system's capacity: with 40, every system served the sweep's highest rate
      (1.5x the paged engine's capacity) without preemption and the curves did not part.
    seed: trace and arrival seed.
  """
  n = num_requests or (6 if quick else 160)
  num_blocks, max_num_seqs, budget = (64, 4, 64) if quick else (160, 32, 256)
  systems = {k: SYSTEMS[k] for k in (["paged", "orca-max"] if quick else SYSTEMS)}
  trace_names = ["sharegpt-like"] if quick else ["sharegpt-like", "alpaca-like"]
  fractions = [1.5] if quick else [0.25, 0.5, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 2.0]
  max_seq_len = checkpoint.load(None)[0].max_seq_len
  report = {"benchmark": NAME, "command": "python -m bench.serving" + (" --quick" if quick else ""),
            "inputs": {"num_requests": n, "num_blocks": num_blocks, "block_size": BLOCK_SIZE,
                       "kv_token_slots": num_blocks * BLOCK_SIZE, "max_num_seqs": max_num_seqs,
                       "max_num_batched_tokens": budget, "rate_fractions": fractions,
                       "seed": seed, "quick": quick},
            "machine": common.machine_info(), "traces": {}}
  jobs = [(t, s) for t in trace_names for s in systems]
  bar = tqdm(total=len(jobs) * len(fractions) + len(trace_names) * 2, desc=NAME, disable=None)
  for name in trace_names:
    trace = make_trace(name, n, max_seq_len=max_seq_len, seed=seed)
    make = {s: (lambda r=r: _engine(r, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                    budget=budget)) for s, r in systems.items()}
    if not quick:  # every reachable program, once per process (minutes; quick: warm-up only)
      make["paged"]().precompile()
    for s in systems:
      _warm(make[s], trace, first=1 if quick else 4)
    # Capacity: the paged engine's request rate with every request arriving at once.
    start = time.perf_counter()
    make["paged"]().generate(trace.prompts, _params(trace))
    capacity = n / (time.perf_counter() - start)
    rates = [round(f * capacity, 3) for f in fractions]
    rng = np.random.default_rng(seed + 1)
    gaps = [rng.exponential(1.0 / r, n) for r in rates]
    arrivals = [np.concatenate([[0.0], np.cumsum(g[1:])]) for g in gaps]
    res = {}
    compiles = 0
    for s in systems:
      res[s] = []
      for rate, arr in zip(rates, arrivals):
        compiles_before = step_lib.num_executables()
        row = {"rate": rate, **serve(make[s](), trace, arr)}
        compiles += step_lib.num_executables() - compiles_before
        res[s].append(row)
        bar.update(1)
    threshold = THRESHOLD_FACTOR * res["paged"][0]["normalized_latency_s"]
    sustained = {s: _sustained(rows, threshold) for s, rows in res.items()}
    crossing = {s: _crossing(rows, threshold) for s, rows in res.items()}
    # Chunked prefill on vs off (paged), at the highest rate: TTFT.
    chunk = {}
    for chunked in ((True,) if quick else (True, False)):  # quick: the code path, once
      mk = lambda c=chunked: _engine(None, num_blocks=num_blocks, max_num_seqs=max_num_seqs,  # noqa: E731
                                     budget=budget, chunked=c)
      _warm(mk, trace, first=1 if quick else 2)
      chunk["on" if chunked else "off"] = serve(mk(), trace, arrivals[-1])
      bar.update(1)
    report["traces"][name] = {
        "workload": trace.describe(), "num_requests": n, "capacity_req_per_s": capacity,
        "threshold_s": threshold, "systems": res, "sustained_rate": sustained,
        "ratio_paged_over": {s: (sustained["paged"] / v if v else None)
                             for s, v in sustained.items() if s != "paged"},
        "crossing_rate": crossing,
        "ratio_paged_over_at_crossing": {
            s: (crossing["paged"] / v if v and crossing["paged"] else None)
            for s, v in crossing.items() if s != "paged"},
        "chunked_prefill_at_highest_rate": chunk,
        "compiles_during_timed_runs": compiles,
    }
  bar.close()
  for name, t in report["traces"].items():
    print(f"\n{name}: capacity {t['capacity_req_per_s']:.2f} req/s (all at once), threshold "
          f"{t['threshold_s'] * 1e3:.1f} ms/token, compiles during timed runs "
          f"{t['compiles_during_timed_runs']}")
    rows = [[s, r["rate"], r["normalized_latency_s"] * 1e3, r["ttft_s_p50"] * 1e3,
             r["ttft_s_p99"] * 1e3, r["itl_s_p50"] * 1e3, r["itl_s_p99"] * 1e3,
             r["output_tokens_per_s"], r["num_preemptions"]]
            for s, rs in t["systems"].items() for r in rs]
    print(common.format_table(["system", "req/s", "norm lat ms/tok", "TTFT p50 ms",
                               "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "out tok/s",
                               "preempt"], rows))
    print("sustained rate: " + ", ".join(f"{s} {v:.2f}" for s, v in t["sustained_rate"].items())
          + "; paged / baseline: " + ", ".join(
              f"{s} {v:.2f}x" if v else f"{s} n/a" for s, v in t["ratio_paged_over"].items()))
    print("threshold crossing (interpolated): " + ", ".join(
        f"{s} {v:.1f}" if v else f"{s} none in the sweep" for s, v in t["crossing_rate"].items())
          + "; paged / baseline: " + ", ".join(
              f"{s} {v:.2f}x" if v else f"{s} n/a"
              for s, v in t["ratio_paged_over_at_crossing"].items()))
    c = t["chunked_prefill_at_highest_rate"]
    print("chunked prefill " + " / ".join(c) + ": TTFT p50 " + " / ".join(
        f"{r['ttft_s_p50'] * 1e3:.0f}" for r in c.values()) + " ms, p99 " + " / ".join(
        f"{r['ttft_s_p99'] * 1e3:.0f}" for r in c.values()) + " ms")
  first = report["traces"][trace_names[0]]
  report["headline"] = {
      f"sustained req/s {s} ({trace_names[0]})": round(v, 3)
      for s, v in first["sustained_rate"].items()
  } | {f"paged / {s}": round(v, 3) for s, v in first["ratio_paged_over"].items() if v} | {
      f"paged / {s} at the crossing": round(v, 3)
      for s, v in first["ratio_paged_over_at_crossing"].items() if v}
  report["notes"] = [
      "Real wall-clock serving on a shared 2-core CPU: compare systems within one run.",
      f"Sustained rate: highest measured rate with mean normalized latency <= "
      f"{THRESHOLD_FACTOR} x the paged engine's at the lowest rate (per trace); "
      "crossing_rate: where the curve crosses that threshold, interpolated in log latency "
      "between the measured rates around it.",
      "Rates are fractions of the paged engine's all-at-once request rate (capacity).",
      "Orca baselines are admission policies of this engine (same kernels, same budget), "
      "so only memory management differs, as in the paper's comparison.",
  ]
  out = common.results_dir(quick, out_dir)
  _figure(report, out / f"{NAME}.png")
  report["figure"] = f"{NAME}.png"
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()
