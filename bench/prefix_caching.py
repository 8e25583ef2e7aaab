"""Prefix caching on vs off: shared-prefix (the vLLM paper's WMT16 few-shot experiment),
multi-turn chat, and a no-sharing control, in one run.

Workloads (seeded; greedy, ignore_eos, token-id prompts over the bundled byte model):
  * "1-shot" / "5-shot": every request is one common few-shot prefix followed by its own
    sentence, generating its translation (paper section 7.4: ~80 and ~341 prefix tokens;
    the sentence and translation lengths are ours: log-normal, mean 30 tokens each).
    Two length scales: the paper's ("x1", they fit the 512-token context) and x0.25,
    the model's context / 2048, as the other traces are scaled. All requests arrive at
    t=0 (offline, like the paper's throughput runs). "KV-bound": the x1 workloads again
    with a 128-block pool, so that, as in the paper's runs, KV memory limits how many
    requests run at once and the shared prefix's blocks buy concurrency.
  * "chat": conversations of several turns; each turn resends the whole history (earlier
    prompts and the model's own replies) plus a new user message (mean 40 tokens; replies
    of 30 tokens). Turn k of every conversation is submitted together once turn k-1 of
    all of them has finished.
  * "no sharing": sharegpt-like random prompts (bench/workloads.py): what caching costs
    when nothing is shared.
Per workload and system (`LLM(enable_prefix_caching=...)`, otherwise identical and at its
defaults), after a warm-up run of the same workload on a throw-away engine (compiled
programs are shared per process): wall time, output tokens/s, mean / p50 TTFT (time from
submission to a request's first token, through the streaming `step()` API), prefill
tokens computed, and the cache's hit rate (prefix_cache_hits / prefix_cache_queries, in
tokens). "Shareable" is the hit rate an unbounded cache would reach on the same
submission order (every full block of an earlier prompt, or of an earlier turn's prompt
and reply, with the last token of each prompt always computed): the goal is measured >=
0.95 x shareable. Outputs with caching on and off are compared token by token.

  python -m bench.prefix_caching [--quick]  ->  bench/results/prefix_caching.{json,png}
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams

NAME = "prefix_caching"
BLOCK_SIZE = 16
PAPER_PREFIX = {"1-shot": 80, "5-shot": 341}  # vLLM paper, section 7.4
PAPER_GAIN = {"1-shot": 1.67, "5-shot": 3.58}
SENTENCE_MEAN = 30
CHAT_USER_MEAN, CHAT_REPLY = 40, 30
GOAL_HIT_FRACTION = 0.95
# The paper's runs are KV-memory bound (a 13B model on one A100): sharing the prefix's blocks
# lets more requests run at once, which is most of its gain. "KV-bound" rows rerun the x1
# workloads with a pool of this many blocks (2048 tokens: about 5 unshared 5-shot requests).
KV_BOUND_BLOCKS = 128


def _lognormal(rng, mean: float, n: int, lo: int = 1) -> list[int]:
  sigma = 0.5
  x = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
  return [max(lo, int(round(v))) for v in x]


def _ids(rng, n: int) -> list[int]:
  return rng.integers(0, 256, n).tolist()


def shared_prefix_workload(shots: str, scale: float, n: int, seed: int, max_len: int):
  rng = np.random.default_rng(seed)
  prefix = _ids(rng, max(1, round(PAPER_PREFIX[shots] * scale)))
  ins = _lognormal(rng, SENTENCE_MEAN * scale, n)
  outs = _lognormal(rng, SENTENCE_MEAN * scale, n)
  prompts = [prefix + _ids(rng, i) for i in ins]
  outs = [max(1, min(o, max_len - len(p))) for p, o in zip(prompts, outs)]
  return {"rounds": [list(zip(prompts, outs))], "prefix_tokens": len(prefix)}


def no_sharing_workload(n: int, seed: int, max_len: int):
  trace = make_trace("sharegpt-like", n, max_seq_len=max_len, seed=seed)
  return {"rounds": [list(zip(trace.prompts, trace.output_lens))], "prefix_tokens": 0}


class Chat:
  """Multi-turn conversations: the next turn's prompt is built from the last replies."""

  def __init__(self, conversations: int, turns: int, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    self.turns = turns
    self.user = [[_ids(rng, u) for u in _lognormal(rng, CHAT_USER_MEAN * scale, turns)]
                 for _ in range(conversations)]
    self.reply = max(1, round(CHAT_REPLY * scale))

  def first_round(self):
    return [(msgs[0], self.reply) for msgs in self.user]

  def next_round(self, turn: int, prompts, replies):
    return [(p + r + msgs[turn], self.reply) for p, r, msgs in zip(prompts, replies, self.user)]


def shareable_hits(rounds_tokens) -> tuple[int, int]:
  """(queried, hit) tokens of an unbounded cache over the submission order.

  rounds_tokens: per round, per request, (prompt ids, generated ids).
  """
  bs = BLOCK_SIZE
  seen: set[tuple[int, ...]] = set()
  queried = hit = 0
  for round_ in rounds_tokens:
    for prompt, _ in round_:
      queried += len(prompt)
      k = 0
      while k < (len(prompt) - 1) // bs and tuple(prompt[:(k + 1) * bs]) in seen:
        k += 1
      hit += k * bs
      seen.update(tuple(prompt[:(j + 1) * bs]) for j in range(len(prompt) // bs))
    for prompt, out in round_:  # the fed tokens' blocks (prompt + all but the last output)
      fed = prompt + out[:-1]
      seen.update(tuple(fed[:(j + 1) * bs]) for j in range(len(fed) // bs))
  return queried, hit


def serve(llm: LLM, requests) -> dict:
  """Submits every (prompt, max_tokens) now and steps until done; TTFT per request."""
  start = time.perf_counter()
  ids = [llm.add_request(None, p, SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True))
         for p, o in requests]
  first: dict[str, float] = {}
  outs: dict[str, list[int]] = {}
  while llm.has_unfinished_requests():
    for o in llm.step():
      if o.request_id not in first and o.outputs[0].token_ids:
        first[o.request_id] = time.perf_counter() - start
      if o.finished:
        outs[o.request_id] = o.outputs[0].token_ids
  return {"wall_s": time.perf_counter() - start, "ttft_s": [first[i] for i in ids],
          "outputs": [outs[i] for i in ids]}


def run_workload(name: str, make, caching: bool, *, warmup: bool, num_blocks: int | None):
  """Serves a workload (all rounds) on a fresh engine; returns measurements and outputs."""
  def engine():
    return LLM(block_size=BLOCK_SIZE, enable_prefix_caching=caching, num_blocks=num_blocks)

  if warmup:
    _serve_rounds(engine(), make())
  llm = engine()
  res = _serve_rounds(llm, make())
  st = llm.memory_stats()
  out_tokens = sum(len(o) for r in res["outputs"] for o in r)
  ttft = np.concatenate([np.asarray(t) for t in res["ttft_s"]])
  return {
      "workload": name, "prefix_caching": caching, "wall_s": res["wall_s"],
      "output_tokens_per_s": out_tokens / res["wall_s"],
      "mean_ttft_s": float(ttft.mean()), "p50_ttft_s": float(np.median(ttft)),
      "num_prefill_tokens": st["num_prefill_tokens"],
      "prefix_cache_queries": st["prefix_cache_queries"],
      "prefix_cache_hits": st["prefix_cache_hits"],
      "hit_rate": st["prefix_cache_hits"] / max(1, st["prefix_cache_queries"]),
      "num_evicted_blocks": st["num_evicted_blocks"], "num_preemptions": st["num_preemptions"],
      "num_requests": sum(len(r) for r in res["rounds"]),
  }, res


def _serve_rounds(llm: LLM, work) -> dict:
  wall, ttfts, outputs, rounds = 0.0, [], [], []
  requests = work["first"]()
  for turn in range(work["turns"]):
    r = serve(llm, requests)
    wall += r["wall_s"]
    ttfts.append(r["ttft_s"])
    outputs.append(r["outputs"])
    rounds.append([(p, o) for (p, _), o in zip(requests, r["outputs"])])
    if turn + 1 < work["turns"]:
      requests = work["next"](turn + 1, [p for p, _ in requests], r["outputs"])
  return {"wall_s": wall, "ttft_s": ttfts, "outputs": outputs, "rounds": rounds}


def workloads(quick: bool, seed: int, max_len: int, num_requests: int | None = None) -> dict:
  n = num_requests or (6 if quick else 64)
  out = {}
  for scale, tag in ((1.0, "x1"), (0.25, "x0.25")):
    if quick and scale != 1.0:
      continue
    for shots in PAPER_PREFIX:
      w = shared_prefix_workload(shots, scale, n, seed, max_len)
      out[f"{shots} {tag}"] = dict(first=lambda w=w: w["rounds"][0], turns=1, next=None,
                                   prefix_tokens=w["prefix_tokens"], shots=shots)
      if scale == 1.0 and not quick:
        out[f"{shots} x1 KV-bound"] = dict(out[f"{shots} {tag}"], num_blocks=KV_BOUND_BLOCKS)
  chat = Chat(3 if quick else 16, 2 if quick else 4, seed)
  out["chat"] = dict(first=chat.first_round, turns=chat.turns, next=chat.next_round,
                     prefix_tokens=None)
  control = no_sharing_workload(n, seed, max_len)
  out["no sharing"] = dict(first=lambda: control["rounds"][0], turns=1, next=None,
                           prefix_tokens=0)
  return out


def _figure(rows: list[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  names = list(dict.fromkeys(r["workload"] for r in rows))
  get = {(r["workload"], r["prefix_caching"]): r for r in rows}
  x = np.arange(len(names))
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
  for off, caching, color in ((-0.2, False, "tab:gray"), (0.2, True, "tab:blue")):
    a.bar(x + off, [get[(n, caching)]["output_tokens_per_s"] for n in names], 0.4,
          color=color, label=f"prefix caching {'on' if caching else 'off'}")
  for i, n in enumerate(names):
    ratio = get[(n, True)]["output_tokens_per_s"] / get[(n, False)]["output_tokens_per_s"]
    a.text(i + 0.2, get[(n, True)]["output_tokens_per_s"], f"{ratio:.2f}x", ha="center",
           va="bottom", fontsize=8)
  a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
  a.set_ylim(0, 1.3 * max(r["output_tokens_per_s"] for r in rows))
  a.set_ylabel("output tokens / s")
  a.set_title("Throughput, caching on vs off (same engine, same run)")
  a.legend(fontsize=8, ncol=2, loc="upper center")
  b.bar(x - 0.2, [get[(n, True)]["shareable_hit_rate"] for n in names], 0.4, color="tab:gray",
        label="shareable (unbounded cache)")
  b.bar(x + 0.2, [get[(n, True)]["hit_rate"] for n in names], 0.4, color="tab:blue",
        label="measured")
  b.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
  b.set_ylim(0, 1.25)
  b.set_ylabel("prompt tokens served from the cache")
  b.set_title("Hit rate")
  b.legend(fontsize=8, ncol=2, loc="upper center")
  common.save_figure(fig, path)


def run(quick: bool = False, out_dir=None, *, num_requests: int | None = None,
        seed: int = 0) -> dict:
  """Runs every workload with caching off and on; prints, writes JSON and a figure.

  num_requests: requests per single-round workload (default 64; 6 with quick).
  """
  max_len = 512
  work = workloads(quick, seed, max_len, num_requests)
  num_blocks = 256 if quick else None  # None: the engine's default KV budget
  rows, agree = [], {}
  for name, w in tqdm(work.items(), desc="workloads"):
    got = {}
    for caching in (False, True):
      row, res = run_workload(name, lambda w=w: w, caching, warmup=not quick,
                              num_blocks=w.get("num_blocks", num_blocks))
      queried, hit = shareable_hits(res["rounds"])
      row["shareable_hit_rate"] = hit / max(1, queried)
      row["prefix_tokens"] = w["prefix_tokens"]
      rows.append(row)
      got[caching] = res["outputs"]
    agree[name] = got[False] == got[True]
  for name in work:
    off, on = (next(r for r in rows if r["workload"] == name and r["prefix_caching"] == c)
               for c in (False, True))
    on["throughput_ratio"] = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    on["ttft_ratio"] = on["mean_ttft_s"] / off["mean_ttft_s"]
    on["hit_fraction_of_shareable"] = (on["hit_rate"] / on["shareable_hit_rate"]
                                       if on["shareable_hit_rate"] else None)
    on["outputs_identical"] = agree[name]
  cols = ["workload", "prefix_caching", "num_requests", "wall_s", "output_tokens_per_s",
          "mean_ttft_s", "num_prefill_tokens", "hit_rate", "shareable_hit_rate",
          "num_evicted_blocks", "num_preemptions"]
  print(common.format_table(cols, [[r[c] for c in cols] for r in rows]))
  summary = [[r["workload"], r["throughput_ratio"], r["ttft_ratio"], r["hit_fraction_of_shareable"],
              PAPER_GAIN.get(work[r["workload"]].get("shots")), r["outputs_identical"]]
             for r in rows if r["prefix_caching"]]
  print(common.format_table(["workload", "throughput on/off", "TTFT on/off",
                             "hits / shareable", "paper gain", "outputs identical"], summary))
  out = common.results_dir(quick, out_dir)
  _figure(rows, out / f"{NAME}.png")
  on_rows = {r["workload"]: r for r in rows if r["prefix_caching"]}
  report = {
      "benchmark": NAME,
      "command": "python -m bench.prefix_caching" + (" --quick" if quick else ""),
      "inputs": {"seed": seed, "num_requests": num_requests, "block_size": BLOCK_SIZE, "quick": quick,
                 "paper_prefix_tokens": PAPER_PREFIX, "sentence_mean": SENTENCE_MEAN,
                 "chat_user_mean": CHAT_USER_MEAN, "chat_reply": CHAT_REPLY,
                 "kv_bound_num_blocks": KV_BOUND_BLOCKS,
                 "num_blocks": num_blocks or "engine default (kv_cache_memory_mb)"},
      "machine": common.machine_info(),
      "headline": {f"{n} throughput on/off": round(r["throughput_ratio"], 2)
                   for n, r in on_rows.items()}
      | {"chat hits / shareable": round(on_rows["chat"]["hit_fraction_of_shareable"], 3),
         "all outputs identical": all(agree.values())},
      "results": rows,
      "paper_gain": PAPER_GAIN,
      "goal_hit_fraction_of_shareable": GOAL_HIT_FRACTION,
      "figure": f"{NAME}.png",
      "notes": [
          "Each system is warmed up on the identical workload first (compile time excluded).",
          "TTFT: submission of a round to the request's first token, via step().",
          "Shareable: hit rate of an unbounded cache on the same submission order.",
          "Shared machine: compare rows within one run only.",
      ],
  }
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()
