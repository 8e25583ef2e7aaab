"""GPU checks that bench/gpu_check.sh runs on a lent GPU machine (never in CI).

  python -m bench.gpu_check exactness OUT_DIR   # engine with attention_impl="pallas"
  python -m bench.gpu_check bandwidth OUT_DIR   # decode / ragged kernels vs a d2d copy
  python -m bench.gpu_check tensor_parallel OUT_DIR  # k = 1 vs all devices (multi-GPU)

exactness: the Pallas engine's greedy tokens against the dense no-cache forward, and
against the xla engine on a mix of chunked prompts, decodes, n > 1 and beams (float32),
also with multi-step decoding;
bfloat16 is reported as token agreement, not asserted. bandwidth: achieved HBM bandwidth
(K/V bytes read / median time) of the compiled decode and ragged kernels at a long
context, next to a device-to-device copy of the same bytes measured in the same run.
Each writes a JSON under OUT_DIR and exits non-zero on a failed exactness check.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench import common


def _write(out_dir: pathlib.Path, name: str, doc: dict) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
  print(json.dumps(doc, indent=1))


def exactness(out_dir: pathlib.Path) -> int:
  from pagedjax import LLM, SamplingParams
  from pagedjax.runner.model import greedy_generate_dense
  from pagedjax.weights.checkpoint import load_bundled_model
  from pagedjax.weights.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  model = load_bundled_model()[1]
  prompts = ["The Python ", "def f(x):\n    return ", "A" * 300, "The try statement "]
  greedy = SamplingParams(max_tokens=12, temperature=0.0)
  mix = [SamplingParams(max_tokens=12, temperature=0.0),
         SamplingParams(n=3, max_tokens=10, temperature=0.8, seed=1),
         SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
         SamplingParams(use_beam_search=True, beam_width=3, temperature=0.0, max_tokens=8)]
  doc: dict = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
  failures = []
  dense = [greedy_generate_dense(model, tok.encode(p), 12, num_valid_tokens=tok.vocab_size,
                                 stop_token_ids=(tok.eos_id,)) for p in prompts]
  for budget in (32, 2048):
    llm = LLM(attention_impl="pallas", num_blocks=256, max_num_batched_tokens=budget)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    ok = got == dense
    doc[f"pallas_vs_dense_budget_{budget}"] = ok
    if not ok:
      failures.append(f"pallas engine (budget {budget}) != dense forward: {got} vs {dense}")
  toks = lambda outs: [[c.token_ids for c in o.outputs] for o in outs]  # noqa: E731
  ref = toks(LLM(attention_impl="xla", num_blocks=256).generate(prompts, mix))
  for mode in ("recompute", "swap"):
    llm = LLM(attention_impl="pallas", num_blocks=40, max_num_batched_tokens=48,
              preemption_mode=mode)
    got = toks(llm.generate(prompts, mix))
    ok = got == ref
    doc[f"pallas_vs_xla_mix_{mode}"] = {"identical": ok,
                                        "preemptions": llm.memory_stats()["num_preemptions"]}
    if not ok:
      failures.append(f"pallas ({mode}) != xla on the mix")
  # Multi-step decoding: the kernels inside the loop of decode steps.
  llm = LLM(attention_impl="pallas", num_blocks=256, num_scheduler_steps=4)
  ok = toks(llm.generate(prompts, mix)) == ref
  doc["pallas_multi_step_vs_xla_mix"] = {"identical": ok,
                                         "multi_steps": llm.memory_stats()["num_multi_steps"]}
  if not ok:
    failures.append("pallas (num_scheduler_steps=4) != xla on the mix")
  b16 = [o.outputs[0].token_ids for o in LLM(attention_impl="pallas", dtype="bfloat16",
                                              num_blocks=256).generate(prompts, greedy)]
  same = sum(a == b for x, y in zip(b16, dense) for a, b in zip(x, y))
  doc["bf16_pallas_token_agreement_with_f32_dense"] = same / sum(len(d) for d in dense)
  doc["failures"] = failures
  _write(out_dir, "gpu_exactness", doc)
  return 1 if failures else 0


def bandwidth(out_dir: pathlib.Path) -> int:
  from pallas_kernels.paged_attention import paged_attention
  from pallas_kernels.ragged_paged_attention import ragged_paged_attention

  rng = np.random.default_rng(0)
  doc: dict = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "rows": []}
  hkv, h, d, bs = 8, 32, 128, 16
  for dtype in (jnp.bfloat16, jnp.float32):
    for seqs, ctx in ((64, 4096), (8, 16384)):
      pages_per_seq = ctx // bs
      n = seqs * pages_per_seq
      k = jnp.asarray(rng.standard_normal((hkv, n, bs, d)), dtype)
      v = jnp.asarray(rng.standard_normal((hkv, n, bs, d)), dtype)
      tables = jnp.asarray(rng.permutation(n).reshape(seqs, pages_per_seq), jnp.int32)
      lens = jnp.full((seqs,), ctx, jnp.int32)
      q = jnp.asarray(rng.standard_normal((seqs, h, d)), dtype)
      kv_bytes = 2 * k.nbytes
      decode = jax.jit(lambda q, k, v, t, ln: paged_attention(q, k, v, t, ln, sm_scale=d**-0.5))
      t_dec = common.median_time(decode, q, k, v, tables, lens, reps=50)
      cu = jnp.arange(seqs + 1, dtype=jnp.int32)
      ragged = jax.jit(lambda q, k, v, ln, t, cu: ragged_paged_attention(
          q, k, v, ln, t, cu, jnp.asarray([seqs], jnp.int32), sm_scale=d**-0.5))
      t_rag = common.median_time(ragged, q, k, v, lens, tables, cu, reps=50)
      copy = jax.jit(lambda k, v: (k + 0, v + 0))  # reads and writes the same bytes
      t_copy = common.median_time(copy, k, v, reps=50)
      row = {"dtype": jnp.dtype(dtype).name, "seqs": seqs, "context": ctx,
             "kv_gb": kv_bytes / 1e9, "decode_ms": t_dec * 1e3, "ragged_ms": t_rag * 1e3,
             "decode_gb_s": kv_bytes / t_dec / 1e9, "ragged_gb_s": kv_bytes / t_rag / 1e9,
             # a copy reads and writes: 2 x the bytes per pass
             "d2d_copy_gb_s": 2 * kv_bytes / t_copy / 1e9}
      row["decode_vs_copy"] = row["decode_gb_s"] / row["d2d_copy_gb_s"]
      row["ragged_vs_copy"] = row["ragged_gb_s"] / row["d2d_copy_gb_s"]
      doc["rows"].append(row)
  _write(out_dir, "gpu_bandwidth", doc)
  return 0


def tensor_parallel(out_dir: pathlib.Path) -> int:
  """k = 1 vs every device (the largest k the bundled model shards over): same greedy
  tokens, decode throughput of each, per-device KV bytes and the step's collectives."""
  import time

  from pagedjax import LLM, SamplingParams
  from pagedjax.runner import sharding

  n = jax.device_count()
  k = max((k for k in (1, 2, 4, 8) if k <= n), default=1)
  doc: dict = {"backend": jax.default_backend(), "devices": n, "k": k}
  if k == 1:
    doc["skipped"] = "one device: nothing to shard over"
    _write(out_dir, "gpu_tensor_parallel", doc)
    return 0
  prompts = ["The Python ", "def f(x):\n    return ", "A" * 300, "The try statement "] * 16
  params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
  rows, outs = [], {}
  for size in (1, k):
    impl = "pallas" if jax.default_backend() == "gpu" else "xla"  # (CPU: a smoke run)
    llm = LLM(attention_impl=impl, num_blocks=1024, tensor_parallel_size=size)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0))  # compile
    start = time.perf_counter()
    got = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    outs[size] = [o.outputs[0].token_ids for o in got]
    st = llm.memory_stats()
    comm = [sharding.collectives(c.as_text()) for _, c in llm.runner.compiled_programs()]
    rows.append({"k": size, "wall_s": wall,
                 "output_tokens_per_s": sum(map(len, outs[size])) / wall,
                 "bytes_per_block_per_device": st["bytes_per_block_per_device"],
                 "kv_cache_bytes_per_device": st["kv_cache_bytes_per_device"],
                 "collectives": comm})
  doc["rows"] = rows
  doc["outputs_identical"] = outs[1] == outs[k]
  _write(out_dir, "gpu_tensor_parallel", doc)
  return 0 if doc["outputs_identical"] else 1


if __name__ == "__main__":
  what, out = sys.argv[1], pathlib.Path(sys.argv[2])
  sys.exit({"exactness": exactness, "bandwidth": bandwidth,
            "tensor_parallel": tensor_parallel}[what](out))
