"""KV memory waste: contiguous max-length preallocation vs paged blocks, on the real engine.

For each length mix ("sharegpt-like", "alpaca-like" from `bench/workloads.py`) and each
length scale, one seeded trace is served by `pagedjax.LLM` (greedy, ignore_eos, every
request admitted at t=0, a pool large enough that nothing is preempted) through the
streaming API. After every `step()` it samples, on that same schedule:
  * paged: reserved slots = used device blocks x block_size, filled = slots holding a
    token's K/V (`memory_stats()`); the difference is internal fragmentation only;
  * contiguous, "prompt+max_tokens": each live request holds prompt + max_tokens slots
    for its whole lifetime (a server that knows every output length: vLLM's "Oracle");
  * contiguous, "max context": each live request holds the model's context (a server
    that does not: vLLM's "Max").
Waste % = 100 * (1 - sum over steps of filled / sum over steps of reserved), i.e. the
time-averaged share of reserved KV memory that holds no token. KV bytes use the bundled
model's bytes per token slot (K and V, all layers and kv heads).

Two length scales are reported: the workloads' default (paper means x context/2048 =
0.25 on the bundled 512-token model) and the paper's own means (x1, clipped to the
512-token context). Paging wastes at most one partial block per sequence, so its waste %
depends on sequence length / block size: the x1 lengths are the ones the vLLM paper's
"< 4%" refers to. Not measured here: external fragmentation (a paged pool has none) or
time; contiguous servers are not run, their reservations are computed on the paged run's
schedule, which is what makes the comparison per step like for like.

  python -m bench.memory_waste [--quick]  ->  bench/results/memory_waste.{json,png}
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams

NAME = "memory_waste"
GOAL_WASTE_PCT = 4.0  # DESIGN.md: paged waste <= 4% at block size 16
MIXES = ("sharegpt-like", "alpaca-like")
POLICIES = ("paged", "contiguous prompt+max_tokens", "contiguous max context")


def serve_and_sample(llm: LLM, trace) -> dict:
  """Serves `trace` on `llm` step by step; sums reserved and filled slots per policy.

  Args:
    llm: an idle engine with room for every request of the trace at once.
    trace: a `bench.workloads.Trace`.

  Returns:
    {"steps", "reserved": {policy: slot-steps}, "filled": slot-steps,
     "peak_reserved": {policy: slots}, "num_preemptions",
     "lengths": per step, the token slots each live sequence holds (a list of lists)}.
  """
  budget = {}  # request id -> prompt + max_tokens
  for i, (prompt, out_len) in enumerate(zip(trace.prompts, trace.output_lens)):
    rid = llm.add_request(
      f"r{i}", prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    )
    budget[rid] = len(prompt) + out_len
  reserved = dict.fromkeys(POLICIES, 0)
  peak = dict.fromkeys(POLICIES, 0)
  filled = steps = 0
  lengths = []
  while llm.has_unfinished_requests():
    llm.step()
    steps += 1
    stats = llm.bm.stats()
    live = llm.scheduler.running + llm.scheduler.swapped
    now = {
      "paged": stats.used_device_blocks * stats.block_size,
      "contiguous prompt+max_tokens": sum(budget[g.request_id] for g in live),
      "contiguous max context": len(live) * llm.max_model_len,
    }
    for policy, slots in now.items():
      reserved[policy] += slots
      peak[policy] = max(peak[policy], slots)
    # n == 1 everywhere: no block is shared, so stored slots == the live requests' tokens.
    filled += stats.tokens_stored
    lengths.append(
      [llm.bm.num_tokens(s.seq_id) for g in live for s in g.seqs if llm.bm.has_seq(s.seq_id)]
    )
  return {
    "steps": steps,
    "reserved": reserved,
    "filled": filled,
    "peak_reserved": peak,
    "num_preemptions": llm.memory_stats()["num_preemptions"],
    "lengths": lengths,
  }


def make_engine(traces: list, block_size: int) -> LLM:
  """An engine whose pool holds every request of the largest trace at once (no preemption).

  The pool size is a power of two (>= 256 blocks) and max_num_seqs the trace length, so
  runs over traces of one size share one engine geometry and hence the compiled programs.
  """
  need = max(
    sum(-(-(len(p) + o) // block_size) for p, o in zip(t.prompts, t.output_lens)) for t in traces
  )
  return LLM(
    num_blocks=1 << max(need - 1, 255).bit_length(),
    block_size=block_size,
    max_num_seqs=max(len(t.prompts) for t in traces),
    attention_impl="xla",
    num_host_blocks=0,
  )


def _bytes_per_slot(llm: LLM) -> int:
  return llm.runner.bytes_per_block // llm.block_size  # scales included when quantized


def plot(rows: list[dict], path) -> None:
  """Grouped bars: waste % per policy (left), time-averaged allocated vs used MiB (right)."""
  plt = common.pyplot()
  fig, (ax_w, ax_b) = plt.subplots(1, 2, figsize=(12, 4.2))
  labels = [f"{r['mix']}\nx{r['scale']:g}" for r in rows]
  x = np.arange(len(rows))
  width = 0.26
  colors = {"paged": "tab:green", POLICIES[1]: "tab:orange", POLICIES[2]: "tab:red"}
  for k, policy in enumerate(POLICIES):
    waste = [r["policies"][policy]["waste_pct"] for r in rows]
    bars = ax_w.bar(x + (k - 1) * width, waste, width, label=policy, color=colors[policy])
    ax_w.bar_label(bars, fmt="%.1f", fontsize=7)
    alloc = [r["policies"][policy]["mean_allocated_mib"] for r in rows]
    ax_b.bar(x + (k - 1) * width, alloc, width, color=colors[policy], alpha=0.35)
    used = [r["mean_used_mib"] for r in rows]
    ax_b.bar(x + (k - 1) * width, used, width, color=colors[policy], label=policy)
  ax_w.axhline(GOAL_WASTE_PCT, color="k", ls="--", lw=0.8, label=f"goal {GOAL_WASTE_PCT:g}%")
  ax_w.set(
    ylabel="KV waste, % of reserved (time-averaged)", ylim=(0, 125), yticks=range(0, 101, 20)
  )
  ax_b.set(ylabel="KV MiB (pale: allocated, solid: used)")
  for ax in (ax_w, ax_b):
    ax.set_xticks(x, labels, fontsize=8)
  ax_w.legend(fontsize=7, loc="upper left", ncol=2)  # above the bars: ylim leaves room
  ax_w.set_title(f"KV waste, block size {rows[0]['block_size']}")
  ax_b.set_title("Mean KV memory allocated vs holding tokens")
  common.save_figure(fig, path)


def run(
  quick: bool = False, out_dir=None, *, num_requests: int | None = None, seed: int = 0
) -> dict:
  """Runs the experiment; writes memory_waste.json and .png.

  Args:
    quick: small smoke run (fewer requests, the default scale only).
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    num_requests: requests per trace (None: 8 quick, 24 full).
    seed: trace seed.

  Returns:
    The report written to JSON.
  """
  num_requests = num_requests or (8 if quick else 24)
  if num_requests < 1:
    raise ValueError(f"num_requests must be >= 1, got {num_requests}")
  block_size = 16
  scales = (None,) if quick else (None, 1.0)  # None: the workloads' context / 2048
  cases = [(mix, scale) for scale in scales for mix in MIXES]
  traces = [
    make_trace(mix, num_requests, max_seq_len=512, seed=seed, scale=scale) for mix, scale in cases
  ]
  rows = []
  for trace in tqdm(traces, desc=NAME, disable=None):
    llm = make_engine(traces, block_size)
    assert llm.max_model_len == trace.max_seq_len
    sampled = serve_and_sample(llm, trace)
    bps = _bytes_per_slot(llm)
    filled = sampled["filled"]
    policies = {}
    for policy, reserved in sampled["reserved"].items():
      policies[policy] = {
        "waste_pct": 100.0 * (1 - filled / reserved),
        "mean_allocated_mib": reserved * bps / sampled["steps"] / 2**20,
        "peak_allocated_mib": sampled["peak_reserved"][policy] * bps / 2**20,
      }
    rows.append(
      {
        "mix": trace.name,
        "scale": trace.scale,
        "block_size": block_size,
        "num_blocks": llm.bm.num_blocks,
        "steps": sampled["steps"],
        "num_preemptions": sampled["num_preemptions"],
        "mean_used_mib": filled * bps / sampled["steps"] / 2**20,
        "policies": policies,
        "trace": trace.describe(),
      }
    )
  out = common.results_dir(quick, out_dir)
  plot(rows, out / f"{NAME}.png")
  headline = {
    f"paged waste % ({r['mix']} x{r['scale']:g})": round(r["policies"]["paged"]["waste_pct"], 2)
    for r in rows
  }
  headline.update(
    {
      f"contiguous max-context waste % ({r['mix']} x{r['scale']:g})": round(
        r["policies"]["contiguous max context"]["waste_pct"], 2
      )
      for r in rows
    }
  )
  report = {
    "benchmark": NAME,
    "command": "python -m bench.memory_waste" + (" --quick" if quick else ""),
    "inputs": {
      "num_requests": num_requests,
      "seed": seed,
      "block_size": block_size,
      "quick": quick,
      "model": "bundled (512-token context)",
      "bytes_per_token_slot": _bytes_per_slot(llm),
      "sampling": "greedy, ignore_eos, all requests at t=0, no preemption",
    },
    "definition": "waste % = 100 * (1 - sum_steps filled slots / sum_steps reserved slots)",
    "goal_paged_waste_pct": GOAL_WASTE_PCT,
    "machine": common.machine_info(),
    "headline": headline,
    "results": rows,
  }
  common.write_json(out / f"{NAME}.json", report)
  header = ["mix", "scale", "steps", *POLICIES, "used MiB"]
  table = [
    [r["mix"], r["scale"], r["steps"]]
    + [f"{r['policies'][p]['waste_pct']:.1f}%" for p in POLICIES]
    + [round(r["mean_used_mib"], 2)]
    for r in rows
  ]
  print(f"\nKV waste, % of reserved slots (block size {block_size}):")
  print(common.format_table(header, table))
  print(f"wrote {out / NAME}.json")
  return report


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()
