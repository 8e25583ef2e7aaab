"""Tensor-parallel scenarios, run in a subprocess with forced CPU devices (see test_tensor_parallel.py).

    python tests/tp_worker.py OUT.json [--sizes 1,2,4,8] [--hf DIR ...] [--pallas] [--quick]
    python tests/tp_worker.py OUT.json --process-id I --num-processes N --coordinator ADDR

Each scenario runs one engine per tensor_parallel_size and records, per request output,
the tokens (and for greedy requests the top-2 logprob margin of every step, so that a
difference can be reported with how near a tie it was), the engine's counters, the
shardings of its pools and the collectives of its compiled step programs. The JSON goes
to OUT; the test compares sizes against size 1. --quick runs every size for the core
scenario (recompute preemption) and one or two elsewhere (each engine compiles its own
programs, ~10 s here). With --process-id, this is one process of
a multi-process engine under jax.distributed over every device of every process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _requests():
  from pagedjax import SamplingParams

  prefix = "The paged cache stores keys and values in blocks; "
  prompts = [prefix + "once upon a time", prefix + "the quick brown fox", "Hello world",
             "In a hole in the ground there lived", "def add(a, b):"]
  greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
  seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7, n=2,
                          ignore_eos=True)
  beams = SamplingParams(max_tokens=12, n=2, use_beam_search=True, temperature=0.0,
                         ignore_eos=True)
  return (prompts + prompts[:1] + prompts[2:3],
          [greedy] * len(prompts) + [seeded, beams])


def _margins(completion) -> list[float]:
  out = []
  for step in completion.logprobs or []:
    top = sorted((lp.logprob for lp in step.values()), reverse=True)
    out.append(top[0] - top[1] if len(top) > 1 else float("inf"))
  return out


def _run(llm, prompts, params) -> dict:
  from pagedjax.runner import sharding

  outs = llm.generate(prompts, params)
  stats = llm.memory_stats()
  runner = llm.runner
  collectives, aliased = {}, {}
  if runner.mesh is not None:  # (one device: no mesh, so no collective; compiling costs ~10 s)
    for key, compiled in runner.compiled_programs():
      collectives[str(key)] = sharding.collectives(compiled.as_text())
      aliased[str(key)] = compiled.memory_analysis().alias_size_in_bytes  # per device
  host = runner.host_pool
  return {
    "outputs": [[{"tokens": c.token_ids, "margins": _margins(c)} for c in o.outputs]
                for o in outs],
    "stats": {k: stats[k] for k in (
      "num_preemptions", "num_blocks_swapped_out", "prefix_cache_hits", "num_compilations",
      "num_multi_steps",
      "tensor_parallel_size", "bytes_per_block", "bytes_per_block_per_device",
      "kv_cache_bytes_per_device")},
    "kv_shards": [list(s.data.shape) for s in runner.kv.k_pages.addressable_shards],
    "kv_scale_shards": (None if runner.kv.k_scales is None else
                        [list(s.data.shape) for s in runner.kv.k_scales.addressable_shards]),
    "kv_global": list(runner.kv.k_pages.shape),
    "host_shards": (None if host is None or host.memory_kind != "pinned_host" else
                    [list(s.data.shape) for s in host.k_blocks.addressable_shards]),
    "collectives": collectives,
    "alias_bytes": aliased,
    "num_layers": llm.model_config.num_layers,
  }


def _swap_round_trips(tp: int) -> dict:
  """kv_cache's swap entries on a pool sharded over `tp` devices, for both host pools
  (pinned_host: sharded like the pool; numpy: the fallback, gathered in this process) and
  a float and an int8 cache: {"<dtype>/<memory kind>": blocks came back bit-exact}."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pagedjax.runner import kv_cache as kvc
  from pagedjax.runner import sharding

  where = jax.sharding.NamedSharding(sharding.make_mesh(tp), sharding.KV_SPEC)
  out = {}
  for dtype in ("float32", "int8"):
    for kind in ("pinned_host", "numpy"):
      cache = kvc.init_kv_cache(num_layers=2, num_kv_heads=tp, num_blocks=8, block_size=4,
                                head_dim=8, dtype=dtype, sharding=where)
      x = jnp.asarray(np.random.default_rng(0).standard_normal((6, tp, 8)), jnp.float32)
      cache = kvc.write_kv(cache, 0, x, -x, np.arange(6, dtype=np.int32))
      before = [np.asarray(a) for a in jax.tree.leaves(cache)]
      pool = kvc.swap_out_blocks(cache, kvc.init_host_pool(cache, 4, memory_kind=kind), [0, 1],
                                 [2, 3])
      cache = kvc.swap_in_blocks(kvc.copy_blocks(cache, [5], [0]), pool, [2, 3], [6, 7])
      after = [np.asarray(a) for a in jax.tree.leaves(cache)]
      out[f"{dtype}/{kind}"] = all(np.array_equal(b[:, :, [0, 1]], a[:, :, [6, 7]])
                                   for b, a in zip(before, after)) and (
                                     cache.k_pages.sharding == where)
  return out


def _engine(tp, mesh=None, **kw):
  from pagedjax import LLM

  base = dict(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
              num_host_blocks=64, tensor_parallel_size=tp, mesh=mesh)
  return LLM(**{**base, **kw})


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--sizes", default="1,2,4,8")
  ap.add_argument("--hf", nargs="*", default=[])
  ap.add_argument("--pallas", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--coordinator")
  ap.add_argument("--modes", default="recompute")
  args = ap.parse_args(argv)

  if args.process_id is not None:
    from pagedjax.runner import sharding

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    prompts, params = _requests()
    k = jax.device_count()
    result = {mode: {str(k): _run(_engine(k, preemption_mode=mode), prompts, params)}
              for mode in args.modes.split(",")}
    result.update(process_count=jax.process_count(), device_count=k)
    with open(args.out, "w") as f:
      json.dump(result, f)
    return 0

  sizes = [int(s) for s in args.sizes.split(",")]
  few = lambda *ks: [k for k in sizes if k in (1, *ks)] if args.quick else sizes  # noqa: E731
  prompts, params = _requests()
  result = {}
  # (quick: recompute at 1, 4 (4 > kv heads: replicated, as at 8; k = 4 also runs the
  # int8 and checkpoint scenarios, k = 2 multi-step); swap at 4 only, compared with
  # recompute at 1: preemption changes no token)
  for mode, ks in (("recompute", few(4)), ("swap", [4] if args.quick else sizes)):
    result[mode] = {str(tp): _run(_engine(tp, preemption_mode=mode), prompts, params)
                    for tp in ks}
    print(f"{mode} done", file=sys.stderr, flush=True)
  result["swap_round_trips"] = _swap_round_trips(4)
  # A quantized pool: its scales are sharded like its pages.
  result["int8"] = {str(tp): _run(_engine(tp, kv_cache_dtype="int8"), prompts[:3], params[:3])
                    for tp in few(4)}
  # Multi-step decoding: the pool carried through the loop of decode steps on every
  # device (quick: k = 2 alone, against recompute's one device; no beams, which keep
  # single steps).
  result["multistep"] = {str(tp): _run(_engine(tp, num_scheduler_steps=4), prompts[:6],
                                       params[:6])
                         for tp in ([2] if args.quick else sizes)}
  if args.pallas:
    result["pallas"] = {
      str(tp): _run(_engine(tp, attention_impl="pallas_interpret", max_num_seqs=2),
                    prompts[:2], [params[0]] * 2)
      for tp in (1, 2)}
  for directory in args.hf:
    from pagedjax import SamplingParams

    name = "hf:" + os.path.basename(directory)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    hf_prompts = ["Hello, world!", "Paged attention stores", "def add(a, b):"]
    result[name] = {str(tp): _run(_engine(tp, model=directory, num_blocks=32), hf_prompts,
                                  [greedy] * 3)
                    for tp in ((1, 4) if args.quick else (1, 2, 4))}
  with open(args.out, "w") as f:
    json.dump(result, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
