"""What `main.py` runs: build the engine from a config and serve, or train the bundled model.

Kept out of main.py so it is importable and testable; main.py only parses flags.
"""

from __future__ import annotations

import os
import time

import ml_collections

from pagedjax.entrypoints.llm import LLM
from pagedjax.sampling_params import SamplingParams


class ConfigError(ValueError):
  """A config value the engine or the sampling parameters refuse (main.py: one line)."""


def unknown_config_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=...` in argv whose path the config (configs/default.py, or
  the `--config=FILE` given) lacks, as a message naming the valid keys at the level
  that failed; None when every path exists."""
  files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if files:
    from ml_collections.config_flags import config_flags
    config = config_flags._LoadConfigModule("config", files[-1]).get_config()
  else:
    from configs import default
    config = default.get_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, seen = config, "config"
    for key in path:
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) \
            else f"none ({seen} is a {type(node).__name__})"
        return f"unknown config field --{seen}.{key}; valid keys of {seen}: {valid}"
      node, seen = node[key], f"{seen}.{key}"
  return None


def build_llm(config: ml_collections.ConfigDict) -> LLM:
  """The engine for config.model / config.engine; a value it refuses is a ConfigError."""
  try:
    return _build_llm(config)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.engine / config.model: {e}") from e


def _build_llm(config: ml_collections.ConfigDict) -> LLM:
  e = config.engine
  return LLM(config.model or None, max_model_len=e.max_model_len or None,
             num_blocks=e.num_blocks or None, block_size=e.block_size,
             num_host_blocks=None if e.num_host_blocks < 0 else e.num_host_blocks,
             max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
             enable_chunked_prefill=e.enable_chunked_prefill,
             enable_prefix_caching=e.enable_prefix_caching,
             preemption_mode=e.preemption_mode, attention_impl=e.attention_impl, dtype=e.dtype,
             kv_cache_dtype=e.kv_cache_dtype, swap_dtype=e.swap_dtype, async_swap=e.async_swap,
             kv_cache_memory_mb=e.kv_cache_memory_mb, seed=e.seed,
             tensor_parallel_size=e.tensor_parallel_size,
             num_scheduler_steps=e.num_scheduler_steps, async_scheduling=e.async_scheduling)


def init_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed for a multi-host run (config.distributed); a no-op for one process."""
  d = config.distributed
  if not d.coordinator_address:
    return
  if not 0 <= d.process_id < d.num_processes:
    raise ConfigError(f"config.distributed: process_id={d.process_id} must be in "
                      f"[0, num_processes={d.num_processes})")
  from pagedjax.runner import sharding  # noqa: PLC0415

  sharding.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)


def memory_report(stats: dict, elapsed_s: float) -> str:
  used = stats["num_blocks"] - stats["num_free_blocks"]
  lines = [
      f"blocks: {stats['num_blocks']} x {stats['block_size']} tokens, used now {used}, "
      f"free {stats['num_free_blocks']}, peak used {stats['peak_used_blocks']}",
      f"KV cache: {stats['kv_cache_dtype']}, {stats['bytes_per_block']} bytes per block"
      + (f", sharded over {stats['tensor_parallel_size']} devices: "
         f"{stats['bytes_per_block_per_device']} bytes per block and "
         f"{stats['kv_cache_bytes_per_device'] / 2**20:.1f} MiB per device"
         if stats.get("tensor_parallel_size", 1) > 1 else ""),
      f"prefix cache: {stats['prefix_cache_hits']} of {stats['prefix_cache_queries']} prompt "
      f"tokens hit, {stats['num_cached_blocks']} blocks cached, "
      f"{stats['num_evicted_blocks']} evicted",
      f"preemptions: {stats['num_preemptions']} (recompute {stats['num_preemptions_recompute']}, "
      f"swap {stats['num_preemptions_swap']})",
      f"compiled programs: {stats['num_compilations']}",
      f"steps: {stats['num_steps']} ({stats['num_prefill_steps']} prefill, "
      f"{stats['num_decode_steps']} decode"
      + (f", {stats['num_multi_steps']} of them multi-step" if stats.get("num_multi_steps")
         else "") + ")",
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
  try:
    params = [SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, seed=None if s.seed < 0 else s.seed + i)
              for i in range(len(prompts))]
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.sampling: {e}") from e
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


def server(config: ml_collections.ConfigDict, *, host: str, port: int, api_key: str | None,
           served_model_name: str | None = None, max_queued_requests: int = 256,
           precompile: bool = False) -> None:
  """Runs the OpenAI-compatible server (pagedjax/entrypoints/openai) until interrupted."""
  from pagedjax.entrypoints.openai import api_server  # noqa: PLC0415  (server deps only here)

  if not 0 < port < 65536:
    raise ConfigError(f"--port must be in [1, 65535], got {port}")
  if max_queued_requests < 0:
    raise ConfigError(f"--max_queued_requests must be >= 0, got {max_queued_requests}")
  llm = build_llm(config)
  name = served_model_name or (os.path.basename(os.path.normpath(config.model))
                               if config.model else "pagedjax-bundled")
  api_server.run_server(llm, host=host, port=port, api_key=api_key, model_name=name,
                        max_queued_requests=max_queued_requests, precompile=precompile)


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
