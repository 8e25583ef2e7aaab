"""Benchmark: paged decode attention vs the best contiguous layout of the same K/V.

For each (context, dtype) the same logical K/V (batch 32, 8 query heads, 8 kv heads,
head_dim 64, every sequence at full context) is stored twice: as pages of 16 tokens
scattered by a random permutation through a pool with a block table per sequence
(`pagedjax.runner.attention`, impl="xla"), and contiguously in several dense layouts. Each
function is timed (median of --runs, calls interleaved round by round in one process)
and the table reports the paged / best-contiguous ratio and the achieved K/V read
bandwidth. On a GPU backend the Pallas kernel (impl="pallas") is timed as well. The figure
plots, against the context length, the time per call and the achieved bandwidth of every
function (one line per function and dtype) and the paged / best-contiguous ratio.

Timings on a shared machine are noisy: compare the ratios within one run (the JSON
records the load average), not absolute times across runs.

  python -m bench.attention            # full grid -> bench/results/attention.{json,png}
  python -m bench.attention --quick    # small smoke run -> bench/results/tmp/
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bench import common
from pagedjax.runner import cpu_attention
from pagedjax.runner.attention import paged_decode_attention


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


def _figure(rows: list[dict], path: pathlib.Path) -> None:
  """ms per call, achieved GB/s and paged / best-contiguous ratio vs context length."""
  plt = common.pyplot()
  fig, (ax_t, ax_bw, ax_r) = plt.subplots(1, 3, figsize=(15, 4.2))
  names = list(rows[0]["seconds"])  # contiguous layouts, then the paged impls
  colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  styles = {"float32": "-", "bfloat16": "--"}
  dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
  impls = [n.removeprefix("paged_") for n in names if n.startswith("paged_")]
  for dtype in dtypes:
    sel = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["context"])
    ctx = [r["context"] for r in sel]
    ls = styles.get(dtype, ":")
    for name in names:
      paged = name.startswith("paged_")
      kw = dict(color=colors[name], ls=ls, marker="o" if paged else ".", lw=2 if paged else 1)
      ax_t.plot(ctx, [r["seconds"][name] * 1e3 for r in sel], label=f"{name} {dtype}", **kw)
      ax_bw.plot(ctx, [r["gbytes_per_s"][name] for r in sel], **kw)
    for impl in impls:
      ax_r.plot(ctx, [r[f"ratio_{impl}"] for r in sel], color=colors[f"paged_{impl}"], ls=ls,
                marker="o", label=f"paged {impl} {dtype}")
  ax_r.axhline(1.0, color="k", lw=0.8, ls=":", label="= best contiguous")
  ax_t.set(yscale="log", ylabel="ms per call (median)", title="Decode attention time")
  ax_bw.set(ylabel="achieved K/V read GB/s", title="Achieved bandwidth", ylim=(0, None))
  ax_r.set(ylabel="paged / best contiguous time", title="Cost of paging", ylim=(0, None))
  contexts = sorted({r["context"] for r in rows})
  for ax in (ax_t, ax_bw, ax_r):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens, every sequence full)")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  ax_t.legend(fontsize=7, ncol=2)
  ax_r.legend(fontsize=7)
  common.save_figure(fig, path)


def run(
  quick: bool = False,
  out_dir=None,
  *,
  runs: int | None = None,
  seed: int = 0,
  contexts: list[int] | None = None,
) -> dict:
  """Runs the benchmark; prints the table and writes attention.json / .png.

  Args:
    quick: batch 8 at context 256, 5 runs: a smoke run.
    out_dir: output folder (None: bench/results, or bench/results/tmp when quick).
    runs: timed calls per function (None: 30, quick 5).
    seed: data and page-permutation seed.
    contexts: context lengths (None: 1024 and 4096, quick 256).

  Returns:
    The report written to JSON.
  """
  shape = {"batch": 32, "heads": 8, "kv_heads": 8, "head_dim": 64, "page_size": 16}
  runs = runs or (5 if quick else 30)
  if quick:
    shape["batch"] = 8
  contexts = contexts or ((256,) if quick else (1024, 4096))
  dtypes = ("float32", "bfloat16")
  impls = ["xla"] + (["pallas"] if jax.default_backend() == "gpu" else
                     ["cpu"] if cpu_attention.available() else [])
  machine = common.machine_info()

  rows = []
  for context, dtype in tqdm([(c, d) for c in contexts for d in dtypes], desc="attention"):
    q, k_pages, v_pages, tables, lengths, layouts = _case(
      seed, context=context, dtype=jnp.dtype(dtype), **shape
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
    for f in fns.values():  # all agree before anything is timed
      np.testing.assert_allclose(np.asarray(f(), np.float32), want, atol=2e-2)
    secs = _time_all(fns, runs)
    del layouts, fns
    kv_bytes = (
      2
      * shape["batch"]
      * context
      * shape["kv_heads"]
      * shape["head_dim"]
      * jnp.dtype(dtype).itemsize
    )
    best = min((n for n in secs if n.startswith("contiguous")), key=secs.get)
    row = {
      "context": context,
      "dtype": dtype,
      "kv_bytes": kv_bytes,
      "seconds": secs,
      "best_contiguous": best,
      "gbytes_per_s": {n: kv_bytes / s / 1e9 for n, s in secs.items()},
    }
    row.update({f"ratio_{impl}": secs[f"paged_{impl}"] / secs[best] for impl in impls})
    rows.append(row)

  print(
    f"\nbackend={machine.get('backend')} batch={shape['batch']} heads={shape['heads']} "
    f"kv_heads={shape['kv_heads']} head_dim={shape['head_dim']} "
    f"page_size={shape['page_size']} runs={runs} load={machine['load_avg_1m_5m_15m']}"
  )
  header = ["context", "dtype", "best contiguous", "ms", "GB/s", "paged xla ms", "ratio", "GB/s"]
  for impl in impls[1:]:
    header += [f"{impl} ms", "ratio"]
  table = []
  for r in rows:
    best, s = r["best_contiguous"], r["seconds"]
    line = [r["context"], r["dtype"], best.removeprefix("contiguous_"), s[best] * 1e3]
    line += [r["gbytes_per_s"][best], s["paged_xla"] * 1e3, r["ratio_xla"]]
    line += [r["gbytes_per_s"]["paged_xla"]]
    for impl in impls[1:]:
      line += [s[f"paged_{impl}"] * 1e3, r[f"ratio_{impl}"]]
    table.append(line)
  print(common.format_table(header, table))
  report = {
    "benchmark": "attention",
    "command": "python -m bench.attention" + (" --quick" if quick else ""),
    "shape": shape,
    "seed": seed,
    "runs": runs,
    "quick": quick,
    "machine": machine,
    "lengths": "all sequences at full context",
    "block_tables": "random permutation of the pool",
    "headline": {
      f"paged {impl} / best contiguous ({r['dtype']}, ctx {r['context']})":
        round(r[f"ratio_{impl}"], 2)
      for r in rows for impl in impls
    },
    "figure": "attention.png",
    "results": rows,
  }
  out = common.results_dir(quick, out_dir)
  _figure(rows, out / "attention.png")
  path = common.write_json(out / "attention.json", report)
  print(f"wrote {path} and {out / 'attention.png'}")
  return report


def main(argv: list[str] | None = None) -> dict:
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
  parser.add_argument("--out-dir", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  return run(args.quick, args.out_dir, runs=args.runs, seed=args.seed, contexts=args.contexts)


if __name__ == "__main__":
  main()
