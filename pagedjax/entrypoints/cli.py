"""What `main.py` runs: build the engine from a config and serve, or train the bundled model.

Kept out of main.py so it is importable and testable; main.py only parses flags.
"""

from __future__ import annotations

import time

import ml_collections

from pagedjax.entrypoints.llm import LLM
from pagedjax.sampling_params import SamplingParams


def build_llm(config: ml_collections.ConfigDict) -> LLM:
  e = config.engine
  return LLM(config.model or None, max_model_len=e.max_model_len or None,
             num_blocks=e.num_blocks or None, block_size=e.block_size,
             num_host_blocks=None if e.num_host_blocks < 0 else e.num_host_blocks,
             max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
             preemption_mode=e.preemption_mode, attention_impl=e.attention_impl, dtype=e.dtype,
             kv_cache_memory_mb=e.kv_cache_memory_mb, seed=e.seed)


def memory_report(stats: dict, elapsed_s: float) -> str:
  used = stats["num_blocks"] - stats["num_free_blocks"]
  lines = [
      f"blocks: {stats['num_blocks']} x {stats['block_size']} tokens, used now {used}, "
      f"free {stats['num_free_blocks']}, peak used {stats['peak_used_blocks']}",
      f"preemptions: {stats['num_preemptions']} (recompute {stats['num_preemptions_recompute']}, "
      f"swap {stats['num_preemptions_swap']})",
      f"compiled programs: {stats['num_compilations']}",
      f"steps: {stats['num_steps']} ({stats['num_prefill_steps']} prefill, "
      f"{stats['num_decode_steps']} decode)",
      f"tokens: {stats['num_prefill_tokens']} prompt, {stats['num_generated_tokens']} generated, "
      f"{stats['num_generated_tokens'] / max(elapsed_s, 1e-9):.1f} generated tokens/s "
      f"(wall {elapsed_s:.2f} s, compilation included)",
  ]
  if "peak_waste_pct" in stats:
    lines.append(f"KV waste at peak (reserved but unfilled slots): {stats['peak_waste_pct']:.1f}%")
  return "\n".join(lines)


def serve(config: ml_collections.ConfigDict, prompts=None) -> list:
  """Serves the config's prompts (or `prompts`) and prints generations and a memory report."""
  llm = build_llm(config)
  prompts = list(prompts or config.prompts)
  s = config.sampling
  params = [SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                           top_p=s.top_p, seed=None if s.seed < 0 else s.seed + i)
            for i in range(len(prompts))]
  start = time.perf_counter()
  outputs = llm.generate(prompts, params)
  elapsed = time.perf_counter() - start
  for out in outputs:
    print(f"--- prompt ({len(out.prompt_token_ids)} tokens): {out.prompt!r}")
    c = out.outputs[0]
    print(f"    -> [{len(c.token_ids)} tokens, {c.finish_reason}] {c.text!r}")
  print("--- memory report")
  print(memory_report(llm.memory_stats(), elapsed))
  return outputs


def train(config: ml_collections.ConfigDict, out_dir: str | None = None) -> dict:
  """Trains the bundled model (pagedjax/weights/train.py); writes it to out_dir.

  out_dir defaults to config.train.output_dir, else the package's own assets
  directory: the run that reproduces the shipped weights.
  """
  from pagedjax.weights import train as train_lib
  from pagedjax.weights.checkpoint import bundled_model_dir

  c = config.train
  c.output_dir = out_dir or c.output_dir or bundled_model_dir()
  metrics = train_lib.train(c)
  print(f"wrote {c.output_dir}: val bits/byte {metrics.get('val_bpb')}")
  return metrics
