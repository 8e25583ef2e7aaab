"""Quantized KV cache: accuracy, capacity, throughput and swap traffic per KV dtype, in one run.

KV dtypes compared (`LLM(kv_cache_dtype=...)`): "auto" (float32, the reference),
"bfloat16", "int8" and "fp8" (float8_e4m3fn); the 8-bit pages carry one float32 scale per
token and kv head. Sections:

  * attention error: causal attention over K/V rounded to each dtype vs float32, on
    unit-normal K/V and on the bundled model's real q/K/V of held-out text (every layer),
    for per-token scales (what the engine stores) and per-block scales (one per 16 tokens
    and kv head, computed over the whole block: the best case of a per-block scale);
    plus the engine's xla path on quantized pages vs attention on their dequantized values
    (the exactness of the path itself, expected ~1e-7);
  * bits per byte of the bundled model on its held-out text (the training script's metric:
    non-overlapping 256-token windows) with K/V rounded to each dtype. Computed by the
    dense forward with K/V quantized and dequantized per token, which is what the paged
    path computes (tests/test_kv_quantization.py: quantized pages == their dequantized
    values within 1e-5);
  * greedy agreement of the engine with a quantized cache vs the float32 cache on prompts
    cut from the held-out text: fraction of identical tokens (position by position) and
    the first divergence per prompt;
  * capacity and throughput at a fixed KV budget (`kv_cache_memory_mb`): blocks, blocks per
    MiB, the most sequences running at once and output tokens/s on a sharegpt-like trace
    (warmed up first: compile time excluded);
  * swap: the same trace on a tight pool with swap preemption: bytes swapped, host bytes
    per block, and the host time spent in swap calls with async_swap on vs off (the
    synchronous baseline waits for every copy), outputs compared.

  python -m bench.kv_quantization [--quick]  ->  bench/results/kv_quantization.{json,png}
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from bench import common
from bench.workloads import make_trace
from pagedjax import LLM, SamplingParams
from pagedjax.runner import attention
from pagedjax.runner import kv_cache as kvc
from pagedjax.weights import checkpoint, train

NAME = "kv_quantization"
KV_DTYPES = ("auto", "bfloat16", "int8", "fp8")
QUICK_DTYPES = ("auto", "int8")  # --quick: engines compile per KV dtype; float32 vs int8 only
_JNP = {"bfloat16": jnp.bfloat16, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
BLOCK = 16
SWAP_BLOCKS = 32  # the swap runs' device pool: 512 tokens, the context of one request


def fake_quant(x, kv_dtype: str, granularity: str = "token"):
  """x [B, T, Hkv, D] rounded to kv_dtype and back (float32). granularity "token": one
  scale per token and kv head (the engine's); "block": one per BLOCK tokens and kv head."""
  if kv_dtype == "auto":
    return x
  if kv_dtype == "bfloat16":
    return x.astype(jnp.bfloat16).astype(jnp.float32)
  dtype = _JNP[kv_dtype]
  if granularity == "token":
    return kvc.dequantize_kv(*kvc.quantize_kv(x, dtype))
  b, t, h, d = x.shape
  pad = -t % BLOCK
  xb = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, BLOCK, h, d)
  xb = xb.transpose(0, 1, 3, 2, 4).reshape(b, -1, h, BLOCK * d)  # a block's vectors together
  y = kvc.dequantize_kv(*kvc.quantize_kv(xb, dtype))
  y = y.reshape(b, -1, h, BLOCK, d).transpose(0, 1, 3, 2, 4).reshape(b, t + pad, h, d)
  return y[:, :t]


def _attend(q, k, v, sm_scale):
  # Dense causal attention, q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D] float32.
  b, t = q.shape[:2]
  ctx = jnp.zeros((b,), jnp.int32)
  return attention.prefill_attention_reference(q, k, v, ctx, jnp.full((b,), t, jnp.int32),
                                               sm_scale=sm_scale)


def forward(model, tokens, kv_dtype: str = "auto", granularity: str = "token", capture=None):
  """The bundled model's dense forward with every layer's K/V rounded by `fake_quant`;
  tokens [B, T] -> logits [B, T, V]. `capture`: a list that receives (q, k, v) per layer."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  x = model.embed_tokens(tokens)
  for layer in model.layers:
    attn = layer.attn
    q, k, v = attn.qkv(layer.attn_norm(x), positions)
    if capture is not None:
      capture.append((q, k, v))
    k, v = fake_quant(k, kv_dtype, granularity), fake_quant(v, kv_dtype, granularity)
    x = x + attn.out(_attend(q, k, v, attn.sm_scale))
    x = x + layer.mlp(layer.mlp_norm(x))
  return model.logits(x)


def _errors(q, k, v, sm_scale, kv_dtype, granularity):
  ref = _attend(q, k, v, sm_scale)
  got = _attend(q, fake_quant(k, kv_dtype, granularity), fake_quant(v, kv_dtype, granularity),
                sm_scale)
  err = jnp.abs(got - ref)
  return float(err.max()), float(err.mean()), float(err.mean() / jnp.abs(ref).mean())


def attention_errors(model, val_tokens, quick: bool) -> tuple[list[dict], float]:
  cfg = model.cfg
  t = 128 if quick else 256
  real = []
  forward(model, jnp.asarray(val_tokens[None, :t]), capture=real)
  key = jax.random.key(0)
  kq, kk, kv = jax.random.split(key, 3)
  rand = [(jax.random.normal(kq, (2, t, cfg.num_heads, cfg.head_dim)),
           jax.random.normal(kk, (2, t, cfg.num_kv_heads, cfg.head_dim)),
           jax.random.normal(kv, (2, t, cfg.num_kv_heads, cfg.head_dim)))]
  rows = []
  for source, qkv in (("unit-normal", rand), ("bundled model", real)):
    for kv_dtype in KV_DTYPES[1:]:
      for gran in (("token",) if kv_dtype == "bfloat16" else ("token", "block")):
        errs = np.array([_errors(q, k, v, cfg.head_dim**-0.5, kv_dtype, gran) for q, k, v in qkv])
        rows.append({"kv": source, "kv_cache_dtype": kv_dtype, "scales": gran if kv_dtype != "bfloat16" else "-",
                     "max_abs_err": float(errs[:, 0].max()), "mean_abs_err": float(errs[:, 1].mean()),
                     "mean_rel_err": float(errs[:, 2].mean())})
  # The engine's xla path on quantized pages vs attention on their dequantized values.
  path_err = 0.0
  rng = np.random.default_rng(0)
  for dtype in (jnp.int8, jnp.float8_e4m3fn):
    k = jax.random.normal(kk, (cfg.num_kv_heads, 32, BLOCK, cfg.head_dim))
    v = jax.random.normal(kv, k.shape)
    (kq8, ks), (vq8, vs) = kvc.quantize_kv(k, dtype), kvc.quantize_kv(v, dtype)
    tables = jnp.asarray(rng.permutation(32)[:32].reshape(4, 8), jnp.int32)
    q = jax.random.normal(kq, (4, cfg.num_heads, cfg.head_dim))
    lengths = jnp.array([1, 16, 77, 128], jnp.int32)
    st = kvc._BIT_STORAGE.get(jnp.dtype(dtype), jnp.dtype(dtype))
    got = attention.paged_decode_attention(q, kvc.to_storage(kq8, st), kvc.to_storage(vq8, st),
                                           tables, lengths, sm_scale=0.2, k_scales=ks, v_scales=vs)
    want = attention.paged_decode_attention(q, kvc.dequantize_kv(kq8, ks),
                                            kvc.dequantize_kv(vq8, vs), tables, lengths,
                                            sm_scale=0.2)
    path_err = max(path_err, float(jnp.abs(got - want).max()))
  return rows, path_err


def bits_per_byte(model, val_tokens, quick: bool, dtypes) -> list[dict]:
  seq_len = 256
  n = 2 if quick else (len(val_tokens) - 1) // seq_len
  toks = val_tokens[: n * seq_len + 1]
  rows = []
  for kv_dtype in tqdm(dtypes, desc="bits per byte", leave=False):
    for gran in (("token",) if kv_dtype in ("auto", "bfloat16") else ("token", "block")):
      fn = jax.jit(lambda x, y, d=kv_dtype, g=gran: optax.softmax_cross_entropy_with_integer_labels(
          forward(model, x, d, g), y).sum(-1))
      bpb = train.bits_per_byte(lambda _, x, y, fn=fn: fn(x, y), None, toks, 8, seq_len)
      rows.append({"kv_cache_dtype": kv_dtype, "scales": gran if kv_dtype in ("int8", "fp8") else "-",
                   "bits_per_byte": bpb, "windows": n, "val_bytes": int((toks[1:] < 256).sum())})
  return rows


def agreement(val_tokens, quick: bool, dtypes) -> list[dict]:
  num, plen, gen = (2, 16, 8) if quick else (16, 64, 96)
  rng = np.random.default_rng(1)
  starts = rng.integers(0, len(val_tokens) - plen, num)
  prompts = [[int(t) for t in val_tokens[s:s + plen]] for s in starts]
  # logprobs=2: the float32 run's top-2 margin says how close a flipped token was to a tie
  params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True, logprobs=2)
  outs, margins = {}, None
  for kv_dtype in tqdm(dtypes, desc="agreement", leave=False):
    llm = LLM(kv_cache_dtype=kv_dtype, num_blocks=num * 8, max_num_seqs=num)
    res = llm.generate(prompts, params)
    outs[kv_dtype] = [o.outputs[0].token_ids for o in res]
    if kv_dtype == "auto":
      margins = [[_margin(lp) for lp in o.outputs[0].logprobs] for o in res]
  rows = []
  for kv_dtype in dtypes[1:]:
    same, first, margin = [], [], []
    for a, b, m in zip(outs[kv_dtype], outs["auto"], margins):
      eq = np.asarray(a) == np.asarray(b)
      same.append(eq.mean())
      first.append(int(np.argmin(eq)) if not eq.all() else len(eq))
      if not eq.all():
        margin.append(m[first[-1]])
    rows.append({"kv_cache_dtype": kv_dtype, "prompts": num, "tokens_per_prompt": gen,
                 "identical_token_fraction": float(np.mean(same)),
                 "prompts_fully_identical": int(sum(f == gen for f in first)),
                 "mean_first_divergence": float(np.mean(first)),
                 "min_first_divergence": int(min(first)),
                 # float32 top-2 logprob gap at each first divergence (small: a near-tie)
                 "float32_top2_margin_at_divergence": [round(x, 4) for x in margin]})
  return rows


def _margin(logprobs: dict) -> float:
  top = sorted((v.logprob for v in logprobs.values()), reverse=True)
  return float(top[0] - top[1]) if len(top) > 1 else float("inf")


def capacity(trace, budget_mb: float, quick: bool, dtypes) -> list[dict]:
  rows = []
  for kv_dtype in tqdm(dtypes, desc="capacity", leave=False):
    make = lambda: LLM(kv_cache_dtype=kv_dtype, kv_cache_memory_mb=budget_mb,  # noqa: E731
                       num_host_blocks=0)
    if not quick:
      common.serve_trace(make(), trace)  # warm-up: compile every program this trace reaches
    llm = make()
    res = common.serve_trace(llm, trace)
    st = llm.memory_stats()
    rows.append({"kv_cache_dtype": kv_dtype, "kv_cache_memory_mb": budget_mb,
                 "bytes_per_block": st["bytes_per_block"], "num_blocks": st["num_blocks"],
                 "blocks_per_mib": 2**20 / st["bytes_per_block"],
                 "tokens_in_budget": st["num_blocks"] * st["block_size"],
                 "peak_running_seqs": res["peak_running_seqs"],
                 "num_preemptions": st["num_preemptions"], "wall_s": res["wall_s"],
                 "output_tokens_per_s": res["output_tokens_per_s"]})
  base = rows[0]["output_tokens_per_s"]
  for r in rows:
    r["throughput_vs_float32"] = r["output_tokens_per_s"] / base
  return rows


def swap(trace, num_blocks: int, quick: bool) -> list[dict]:
  rows = []
  systems = [("auto", "auto"), ("auto", "int8"), ("auto", "fp8"), ("int8", "auto"), ("fp8", "auto")]
  if quick:
    systems = [("auto", "int8")]
  for kv_dtype, swap_dtype in tqdm(systems, desc="swap", leave=False):
    got = {}
    for async_swap in (True, False):
      make = lambda: LLM(kv_cache_dtype=kv_dtype, swap_dtype=swap_dtype,  # noqa: E731
                         async_swap=async_swap, num_blocks=num_blocks, preemption_mode="swap")
      if not quick:
        common.serve_trace(make(), trace)  # warm-up (the swap programs too)
      llm = make()
      res = common.serve_trace(llm, trace)
      st = llm.memory_stats()
      got[async_swap] = res["outputs"]
      rows.append({"kv_cache_dtype": kv_dtype, "swap_dtype": st["swap_dtype"],
                   "async_swap": async_swap, "num_preemptions_swap": st["num_preemptions_swap"],
                   "blocks_swapped": st["num_blocks_swapped_out"] + st["num_blocks_swapped_in"],
                   "host_bytes_per_block": st["host_bytes_per_block"],
                   "swap_mib": (st["swap_out_bytes"] + st["swap_in_bytes"]) / 2**20,
                   "swap_call_time_s": st["swap_time_s"], "wall_s": res["wall_s"],
                   "output_tokens_per_s": res["output_tokens_per_s"]})
    rows[-1]["outputs_equal_async"] = rows[-2]["outputs_equal_async"] = got[True] == got[False]
  return rows


def run(quick: bool = False, out_dir=None, *, num_requests: int | None = None,
        seed: int = 0) -> dict:
  """Runs every section; prints tables, writes JSON and a figure."""
  cfg, model, tok = checkpoint.load(None)
  _, val = train.split_tokens(train.load_corpus_tokens(), train.default_train_config().val_fraction)
  sections = tqdm(total=5, desc=NAME)
  att_rows, path_err = attention_errors(model, val, quick)
  sections.update()
  dtypes = QUICK_DTYPES if quick else KV_DTYPES
  bpb_rows = bits_per_byte(model, val, quick, dtypes)
  sections.update()
  agree_rows = agreement(val, quick, dtypes)
  sections.update()
  n = num_requests or (3 if quick else 48)
  # --quick: requests clipped to 128 tokens on pools of 16 float32 blocks (padded pools of
  # one size: the smoke run compiles few programs); the full run: the model's context.
  max_len = 128 if quick else cfg.max_seq_len
  scale = cfg.max_seq_len / 2048  # the paper's lengths scaled to the model, as elsewhere
  trace = make_trace("sharegpt-like", n, max_seq_len=max_len, seed=seed, scale=scale)
  budget_mb = 1.0 if quick else 2.0  # float32: 32 blocks, the longest request just fits
  cap_rows = capacity(trace, budget_mb, quick, dtypes)
  sections.update()
  swap_trace = make_trace("sharegpt-like", 6 if quick else 16, max_seq_len=max_len,
                          seed=seed + 1, scale=scale)
  swap_blocks = 12 if quick else SWAP_BLOCKS
  swap_rows = swap(swap_trace, swap_blocks, quick)
  sections.update()
  sections.close()

  def table(rows, cols):
    print(common.format_table(cols, [[r[c] for c in cols] for r in rows]))

  table(att_rows, ["kv", "kv_cache_dtype", "scales", "max_abs_err", "mean_abs_err", "mean_rel_err"])
  print(f"xla path on quantized pages vs their dequantized values: max abs err {path_err:.2e}")
  table(bpb_rows, ["kv_cache_dtype", "scales", "bits_per_byte", "windows"])
  table(agree_rows, ["kv_cache_dtype", "identical_token_fraction", "prompts_fully_identical",
                     "mean_first_divergence", "min_first_divergence",
                     "float32_top2_margin_at_divergence"])
  table(cap_rows, ["kv_cache_dtype", "bytes_per_block", "num_blocks", "blocks_per_mib",
                   "peak_running_seqs", "num_preemptions", "output_tokens_per_s",
                   "throughput_vs_float32"])
  table(swap_rows, ["kv_cache_dtype", "swap_dtype", "async_swap", "num_preemptions_swap",
                    "blocks_swapped", "host_bytes_per_block", "swap_mib", "swap_call_time_s",
                    "output_tokens_per_s", "outputs_equal_async"])
  out = common.results_dir(quick, out_dir)
  _figure(att_rows, bpb_rows, cap_rows, swap_rows, out / f"{NAME}.png")
  bpb = {f"{r['kv_cache_dtype']}/{r['scales']}": r["bits_per_byte"] for r in bpb_rows}
  cap = {r["kv_cache_dtype"]: r for r in cap_rows}
  agree = {r["kv_cache_dtype"]: r["identical_token_fraction"] for r in agree_rows}
  quantized = [d for d in dtypes if d in ("int8", "fp8")]
  report = {
      "benchmark": NAME,
      "command": "python -m bench.kv_quantization" + (" --quick" if quick else ""),
      "inputs": {"seed": seed, "quick": quick, "trace": trace.describe(),
                 "kv_cache_memory_mb": budget_mb, "swap_trace": swap_trace.describe(),
                 "swap_num_blocks": swap_blocks, "block_size": BLOCK},
      "machine": common.machine_info(),
      "headline": {
          "int8 blocks per MiB vs float32": round(cap["int8"]["blocks_per_mib"]
                                                  / cap["auto"]["blocks_per_mib"], 3),
          f"bits per byte float32 / {' / '.join(quantized)}": [
              round(bpb["auto/-"], 4), *(round(bpb[f"{d}/token"], 4) for d in quantized)],
          f"greedy identical tokens {' / '.join(quantized)}": [round(agree[d], 3)
                                                              for d in quantized],
          "xla path vs dequantized max err": path_err,
      },
      "attention_error": att_rows, "xla_path_vs_dequantized_max_abs_err": path_err,
      "bits_per_byte": bpb_rows, "agreement": agree_rows, "capacity": cap_rows, "swap": swap_rows,
      "figure": f"{NAME}.png",
      "notes": [
          "Attention error: dense causal attention with K/V rounded to the dtype vs float32.",
          "Bits per byte: dense forward with K/V quantized-dequantized per token, the values "
          "the paged path attends over (equal within 1e-5, tested).",
          "Capacity / swap runs are warmed up on the same trace first (compile time excluded).",
          "swap_call_time_s: host time inside swap calls; with async_swap the copies run "
          "behind it, without they are waited for.",
          "Shared machine: compare rows within one run only.",
      ],
  }
  path = common.write_json(out / f"{NAME}.json", report)
  print(f"wrote {path}")
  return report


def _figure(att_rows, bpb_rows, cap_rows, swap_rows, path):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  ax = axes[0]
  real = [r for r in att_rows if r["kv"] == "bundled model"]
  labels = [f"{r['kv_cache_dtype']}\n{r['scales']}" for r in real]
  ax.bar(labels, [r["mean_rel_err"] for r in real], color="tab:blue")
  ax.set_yscale("log")
  ax.set_title("attention error on the model's K/V\n(mean |err| / mean |out|)")
  ax = axes[1]
  labels = [f"{r['kv_cache_dtype']}\n{r['scales']}" for r in bpb_rows]
  vals = [r["bits_per_byte"] for r in bpb_rows]
  ax.bar(labels, vals, color="tab:green")
  ax.set_ylim(min(vals) * 0.995, max(vals) * 1.003)
  ax.set_title("held-out bits per byte")
  ax = axes[2]
  names = [r["kv_cache_dtype"] for r in cap_rows]
  x = np.arange(len(names))
  ax.bar(x - 0.2, [r["num_blocks"] for r in cap_rows], 0.4, label="blocks in budget")
  ax.bar(x + 0.2, [r["peak_running_seqs"] for r in cap_rows], 0.4, label="peak running seqs")
  ax.set_xticks(x, names)
  ax.legend(fontsize=8)
  ax.set_title(f"at {cap_rows[0]['kv_cache_memory_mb']:g} MiB of KV")
  ax = axes[3]
  sys_names = sorted({(r["kv_cache_dtype"], r["swap_dtype"]) for r in swap_rows},
                     key=lambda s: [(r["kv_cache_dtype"], r["swap_dtype"]) for r in swap_rows].index(s))
  x = np.arange(len(sys_names))
  for off, flag, label in ((-0.2, True, "async"), (0.2, False, "sync")):
    ax.bar(x + off, [next(r["swap_call_time_s"] for r in swap_rows
                          if (r["kv_cache_dtype"], r["swap_dtype"]) == s and r["async_swap"] == flag)
                     for s in sys_names], 0.4, label=f"{label} swap")
  ax.set_xticks(x, [f"kv {k}\nswap {s}" for k, s in sys_names], fontsize=7)
  ax.set_ylabel("host s in swap calls")
  ax.legend(fontsize=8)
  ax.set_title("swap stalls")
  fig.tight_layout()
  common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
  return common.trace_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
  main()
