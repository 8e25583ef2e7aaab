"""Benchmark: paged decode attention vs the best contiguous layout of the same K/V.

For each (context, dtype) the same logical K/V (batch 32, 8 query heads, 8 kv heads,
head_dim 64, every sequence at full context) is stored twice: as pages of 16 tokens
scattered by a random permutation through a pool with a block table per sequence
(`pagedjax.attention`, impl="xla"), and contiguously in several dense layouts. Each
function is timed (median of --runs, calls interleaved round by round in one process)
and the table reports the paged / best-contiguous ratio and the achieved K/V read
bandwidth. On a GPU backend the Pallas kernel (impl="pallas") is timed as well.

Timings on a shared machine are noisy: compare the ratios within one run (the JSON
records the load average), not absolute times across runs.

  python bench/attention.py            # full grid -> bench/results/attention.json
  python bench/attention.py --quick    # small smoke run -> bench/results/tmp/
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pagedjax.attention import paged_decode_attention

RESULTS = pathlib.Path(__file__).parent / "results"


def _contiguous_decode(q, k, v, lengths, *, sm_scale, layout):
  """Dense decode on contiguous K/V in `layout` ("bhsd", "hbsd" or "bshd")."""
  b, h, d = q.shape
  heads = layout.index("h")
  hkv = k.shape[heads]
  qg = q.reshape(b, hkv, h // hkv, d)
  kv = layout.replace("h", "k")  # einsum letters: k = kv head axis
  s = jnp.einsum(f"bkgd,{kv}->bkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
  mask = jnp.arange(s.shape[-1])[None, None, None] < lengths[:, None, None, None]
  s = jnp.where(mask, s, -jnp.inf)
  p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  o = jnp.einsum(f"bkgs,{kv}->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (o / p.sum(-1)[..., None]).reshape(b, h, d).astype(q.dtype)


def _case(seed, *, batch, heads, kv_heads, head_dim, context, page_size, dtype):
  rng = np.random.default_rng(seed)
  pages_per_seq = context // page_size
  num_pages = batch * pages_per_seq
  q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
  k_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), dtype)
  v_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), dtype)
  tables = rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
  lengths = jnp.full((batch,), context, jnp.int32)

  def dense(pages):  # the same logical K/V, [B, S, Hkv, D]
    x = pages[:, tables].reshape(kv_heads, batch, context, head_dim)
    return x.transpose(1, 2, 0, 3)

  k, v = dense(k_pages), dense(v_pages)
  layouts = {
    "bshd": (k, v),
    "bhsd": (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)),
    "hbsd": (k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)),
  }
  return q, k_pages, v_pages, jnp.asarray(tables), lengths, layouts


def _time_all(fns: dict, runs: int) -> dict:
  """Median seconds per call of each zero-arg fn, calls interleaved round by round."""
  for f in fns.values():
    jax.block_until_ready(f())  # compile + warm up
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--runs", type=int, default=None, help="timed calls per function")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--contexts",
    type=int,
    nargs="+",
    default=None,
    help="context lengths (default 1024 4096; --quick: 256)",
  )
  args = parser.parse_args()
  shape = dict(batch=32, heads=8, kv_heads=8, head_dim=64, page_size=16)
  contexts, runs = (1024, 4096), args.runs or 30
  if args.quick:
    shape["batch"], contexts, runs = 8, (256,), args.runs or 5
  contexts = args.contexts or contexts
  dtypes = ("float32", "bfloat16")
  impls = ["xla"] + (["pallas"] if jax.default_backend() == "gpu" else [])
  info = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    machine=platform.machine(),
    processor=platform.processor(),
    cpu_count=os.cpu_count(),
    load_average_at_start=os.getloadavg(),
  )

  rows = []
  for context, dtype in tqdm([(c, d) for c in contexts for d in dtypes], desc="attention"):
    q, k_pages, v_pages, tables, lengths, layouts = _case(
      args.seed, context=context, dtype=jnp.dtype(dtype), **shape
    )
    scale = shape["head_dim"] ** -0.5
    fns = {}
    for layout, (k, v) in layouts.items():
      f = jax.jit(functools.partial(_contiguous_decode, sm_scale=scale, layout=layout))
      fns[f"contiguous_{layout}"] = functools.partial(f, q, k, v, lengths)
    for impl in impls:
      fns[f"paged_{impl}"] = functools.partial(
        paged_decode_attention, q, k_pages, v_pages, tables, lengths, sm_scale=scale, impl=impl
      )
    want = np.asarray(fns["contiguous_bhsd"](), np.float32)
    for name, f in fns.items():  # all agree before anything is timed
      np.testing.assert_allclose(np.asarray(f(), np.float32), want, atol=2e-2)
    secs = _time_all(fns, runs)
    del layouts, fns
    kv_bytes = (
      2
      * shape["batch"]
      * context
      * shape["kv_heads"]
      * shape["head_dim"]
      * (jnp.dtype(dtype).itemsize)
    )
    best = min((n for n in secs if n.startswith("contiguous")), key=secs.get)
    row = dict(
      context=context,
      dtype=dtype,
      kv_bytes=kv_bytes,
      seconds=secs,
      best_contiguous=best,
      gbytes_per_s={n: kv_bytes / s / 1e9 for n, s in secs.items()},
    )
    row.update({f"ratio_{impl}": secs[f"paged_{impl}"] / secs[best] for impl in impls})
    rows.append(row)

  print(
    f"\nbackend={info['backend']} batch={shape['batch']} heads={shape['heads']} "
    f"kv_heads={shape['kv_heads']} head_dim={shape['head_dim']} "
    f"page_size={shape['page_size']} runs={runs} load={info['load_average_at_start']}"
  )
  print(
    f"{'context':>7} {'dtype':>8} {'best contiguous':>22} {'paged xla':>12} {'ratio':>6} "
    f"{'paged GB/s':>10}" + ("  pallas ms  ratio" if "pallas" in impls else "")
  )
  for r in rows:
    best, s = r["best_contiguous"], r["seconds"]
    line = (
      f"{r['context']:>7} {r['dtype']:>8} {best[11:]:>5} {s[best] * 1e3:9.2f} ms "
      f"({r['gbytes_per_s'][best]:4.1f} GB/s) {s['paged_xla'] * 1e3:9.2f} ms "
      f"{r['ratio_xla']:6.2f} {r['gbytes_per_s']['paged_xla']:10.2f}"
    )
    if "pallas" in impls:
      line += f"  {s['paged_pallas'] * 1e3:9.3f} {r['ratio_pallas']:6.2f}"
    print(line)
  out = RESULTS / ("tmp/attention_quick.json" if args.quick else "attention.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(
      dict(
        shape=shape,
        seed=args.seed,
        runs=runs,
        machine=info,
        lengths="all sequences at full context",
        block_tables="random permutation of the pool",
        results=rows,
      ),
      indent=1,
    )
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
