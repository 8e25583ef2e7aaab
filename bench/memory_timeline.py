"""A picture of the KV block pool through time: paging, sharing and preemption, seen.

A small scripted trace is served by `pagedjax.LLM` on a deliberately tight device pool
with swap preemption: plain greedy requests, one parallel-sampling request (n=3: the
samples share the prompt's blocks, copy-on-write after), one beam-search request
(beams fork and drop, sharing their common prefix), and requests that arrive later
through the streaming API (`add_request` between `step()` calls). After every step it
records, for each device block, the request that owns it (from the block tables of every
resident sequence), whether it is shared (ref count > 1) or free, and the same for the
host (swap) pool, plus the step's events (prefill, swap-out/preemption, swap-in).

Output: a PNG with two panels sharing the step axis (x = step, y = block id, colour =
owning request, a black dot = shared block, light grey = free; top: device pool, bottom:
host pool) and a compact JSON where each step's pool is one string, one character per
block: "." free, an upper-case letter = the owning request, lower-case = that request's
block shared by several of its sequences (a few KB, not arrays).

The trace is greedy / seeded, so the picture is reproducible. Not measured: time.

  python -m bench.memory_timeline [--quick]  ->  bench/results/memory_timeline.{json,png}
"""

from __future__ import annotations

import argparse
import string

import numpy as np
from tqdm import tqdm

from bench import common
from pagedjax import LLM, SamplingParams

NAME = "memory_timeline"
BLOCK_SIZE = 8
NUM_BLOCKS = 24
NUM_HOST_BLOCKS = 16

# (arrival step, label, prompt, params); max_tokens is scaled down in the quick run.
_TRACE = (
  (0, "greedy", "The Python language reference describes ", {"temperature": 0.0}),
  (0, "n=3 samples", "A list is a sequence of items that ", {"n": 3, "temperature": 0.8}),
  (0, "beam x3", "def ", {"use_beam_search": True, "beam_width": 3, "temperature": 0.0}),
  (0, "greedy", "An exception is raised when the ", {"temperature": 0.0}),
  (6, "greedy (late)", "The class statement defines ", {"temperature": 0.0}),
  (12, "greedy (late)", "A for loop iterates over the items of ", {"temperature": 0.0}),
)
_MAX_TOKENS = (56, 24, 16, 48, 40, 32)


def snapshot(llm: LLM, owner_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The pools now: device owners, device shared flags, host owners (-1 = free).

  Args:
    llm: the engine.
    owner_of: request id -> owner index.

  Returns:
    int16 [num_blocks] owner per device block, bool [num_blocks] ref count > 1,
    int16 [num_host_blocks] owner per host block.
  """
  bm = llm.bm
  device = np.full(bm.num_blocks, -1, np.int16)
  host = np.full(bm.num_host_blocks, -1, np.int16)
  for group in llm.scheduler.running + llm.scheduler.swapped:
    for seq in group.seqs:
      if bm.has_seq(seq.seq_id):
        pool = host if bm.is_swapped(seq.seq_id) else device
        pool[bm.block_table(seq.seq_id)] = owner_of[group.request_id]
  shared = np.asarray(bm.device_allocator.ref_counts) > 1
  # Every block in use belongs to a live sequence: the tables account for the whole pool.
  assert (device >= 0).sum() == bm.num_blocks - bm.num_free_blocks
  return device, shared, host


def _encode(owners: np.ndarray, shared: np.ndarray | None = None) -> str:
  chars = []
  for i, o in enumerate(owners):
    if o < 0:
      chars.append(".")
    else:
      c = string.ascii_uppercase[o]
      chars.append(c.lower() if shared is not None and shared[i] else c)
  return "".join(chars)


def record(quick: bool) -> dict:
  """Serves the scripted trace; returns per-step pool strings, counts and events."""
  llm = LLM(
    num_blocks=NUM_BLOCKS,
    block_size=BLOCK_SIZE,
    num_host_blocks=NUM_HOST_BLOCKS,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    preemption_mode="swap",
    attention_impl="xla",
  )
  scale = 0.5 if quick else 1.0
  requests, owner_of, pending = [], {}, []
  for k, ((arrival, label, prompt, params), max_tokens) in enumerate(zip(_TRACE, _MAX_TOKENS)):
    rid = string.ascii_uppercase[k]
    sp = SamplingParams(
      max_tokens=max(4, int(max_tokens * scale)), seed=k, ignore_eos=True, **params
    )
    owner_of[rid] = k
    requests.append({"id": rid, "label": label, "arrival_step": arrival, "prompt": prompt})
    pending.append((arrival, rid, prompt, sp))
  steps, prev = [], llm.memory_stats()
  while pending or llm.has_unfinished_requests():
    for item in [p for p in pending if p[0] <= len(steps)]:
      llm.add_request(item[1], item[2], item[3])
      pending.remove(item)
    llm.step()
    device, shared, host = snapshot(llm, owner_of)
    st = llm.memory_stats()
    events = [
      name
      for name, key in (
        ("prefill", "num_prefill_steps"),
        ("swap-out", "num_blocks_swapped_out"),
        ("swap-in", "num_blocks_swapped_in"),
      )
      if st[key] > prev[key]
    ]
    steps.append(
      {
        "device": _encode(device, shared),
        "host": _encode(host),
        "used": int((device >= 0).sum()),
        "shared": int((shared & (device >= 0)).sum()),
        "host_used": int((host >= 0).sum()),
        "events": events,
      }
    )
    prev = st
  final = llm.memory_stats()
  return {
    "requests": requests,
    "steps": steps,
    "totals": {
      k: final[k]
      for k in (
        "num_steps",
        "num_prefill_steps",
        "num_preemptions_swap",
        "num_blocks_swapped_out",
        "num_blocks_swapped_in",
        "peak_used_blocks",
        "num_compilations",
      )
    },
  }


def _decode_rows(steps: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """[num_blocks, num_steps] owner indices (-1 free) and shared flags from the strings."""
  rows = np.array([list(s[key]) for s in steps]).T  # [blocks, steps] of characters
  owners = np.full(rows.shape, -1, np.int16)
  letters = np.char.upper(rows)
  for k, c in enumerate(string.ascii_uppercase):
    owners[letters == c] = k
  return owners, np.char.islower(rows)


def plot(timeline: dict, path) -> None:
  """Device pool (top) and host pool (bottom) through time, one colour per request."""
  plt = common.pyplot()
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  requests, steps = timeline["requests"], timeline["steps"]
  colours = plt.get_cmap("tab10").colors[: len(requests)]
  cmap = ListedColormap([(0.88, 0.88, 0.88), *colours])  # index 0: free
  fig, (ax_d, ax_h) = plt.subplots(
    2,
    1,
    figsize=(11, 7.5),
    sharex=True,
    gridspec_kw={"height_ratios": [NUM_BLOCKS, 0.6 * NUM_HOST_BLOCKS]},
  )
  x = np.arange(1, len(steps) + 1)
  for ax, key, title in ((ax_d, "device", "device pool"), (ax_h, "host", "host (swap) pool")):
    owners, shared = _decode_rows(steps, key)
    ax.imshow(
      owners + 1,
      cmap=cmap,
      vmin=0,
      vmax=len(requests),
      aspect="auto",
      interpolation="nearest",
      origin="lower",
      extent=(0.5, len(steps) + 0.5, -0.5, owners.shape[0] - 0.5),
    )
    ys, xs = np.nonzero(shared)
    ax.scatter(x[xs], ys, s=4, c="k", marker="o", linewidths=0)
    ax.set(ylabel="block id", title=title)
  for i, s in enumerate(steps):
    for event, colour in (("swap-out", "tab:red"), ("swap-in", "tab:green")):
      if event in s["events"]:
        for ax in (ax_d, ax_h):
          ax.axvline(i + 1, color=colour, lw=1.2, ls="--")
  ax_h.set_xlabel("engine step")
  handles = [
    Patch(color=colours[k], label=f"{r['id']}: {r['label']}") for k, r in enumerate(requests)
  ]
  handles += [
    Patch(color=cmap(0), label="free"),
    plt.Line2D([], [], color="k", marker="o", ls="", ms=3, label="shared (ref count > 1)"),
    plt.Line2D([], [], color="tab:red", ls="--", label="swap-out (preemption)"),
    plt.Line2D([], [], color="tab:green", ls="--", label="swap-in"),
  ]
  ax_d.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.suptitle(
    f"KV block pool through time ({NUM_BLOCKS} device blocks of {BLOCK_SIZE} tokens, swap preemption)"
  )
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None) -> dict:
  """Runs the experiment; writes memory_timeline.json and .png.

  Args:
    quick: shorter outputs (half the max_tokens), same requests and pool.
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).

  Returns:
    The report written to JSON.
  """
  with tqdm(total=1, desc=NAME, disable=None) as bar:
    timeline = record(quick)
    bar.update(1)
  out = common.results_dir(quick, out_dir)
  plot(timeline, out / f"{NAME}.png")
  steps = timeline["steps"]
  totals = timeline["totals"]
  report = {
    "benchmark": NAME,
    "command": "python -m bench.memory_timeline" + (" --quick" if quick else ""),
    "inputs": {
      "quick": quick,
      "block_size": BLOCK_SIZE,
      "num_blocks": NUM_BLOCKS,
      "num_host_blocks": NUM_HOST_BLOCKS,
      "preemption_mode": "swap",
      "max_num_seqs": 8,
    },
    "encoding": "one string per step and pool, one char per block: '.' free, 'A'.. owning "
    "request (requests[k].id), lower case = shared by several of its sequences",
    "machine": common.machine_info(),
    "headline": {
      "steps": len(steps),
      "peak used device blocks": totals["peak_used_blocks"],
      "peak shared blocks": max(s["shared"] for s in steps),
      "swap preemptions": totals["num_preemptions_swap"],
      "blocks swapped out": totals["num_blocks_swapped_out"],
    },
    **timeline,
  }
  common.write_json(out / f"{NAME}.json", report)
  print(f"\nmemory timeline: {len(steps)} steps")
  print(common.format_table(list(report["headline"]), [list(report["headline"].values())]))
  print(f"wrote {out / NAME}.json")
  return report


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="shorter outputs")
  args = parser.parse_args(argv)
  return run(args.quick)


if __name__ == "__main__":
  main()
