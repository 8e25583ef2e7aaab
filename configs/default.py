"""Default config: the bundled model served with continuous batching on this machine.

Override any field on the command line, e.g.
  python main.py --config.engine.block_size=32 --config.sampling.temperature=0.8
Variants import this file and change a few fields (see configs/*.py).
"""

import ml_collections

from pagedjax.weights import train as train_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model directory; "" loads the bundled model shipped in pagedjax/weights/assets.
  config.model = ""

  config.engine = ml_collections.ConfigDict()
  # Context limit in tokens; 0 uses the model's (Hugging Face checkpoints: capped at 4096).
  config.engine.max_model_len = 0
  # Tokens per KV block (power of two); 16 is vLLM's default and ours.
  config.engine.block_size = 16
  # KV blocks on the device; 0 sizes the cache from kv_cache_memory_mb.
  config.engine.num_blocks = 0
  # KV budget in MiB used when num_blocks is 0.
  config.engine.kv_cache_memory_mb = 64.0
  # Host (swap) pool blocks; -1 means as many as the device pool.
  config.engine.num_host_blocks = -1
  # Most sequences decoded together in one step.
  config.engine.max_num_seqs = 64
  # Token budget of one step: every running sequence's decode token, then prefill
  # chunks (at least block_size).
  config.engine.max_num_batched_tokens = 2048
  # Split long prompts across steps; False prefills a prompt whole (<= the budget).
  config.engine.enable_chunked_prefill = True
  # Reuse the KV of full blocks already computed for the same tokens (prefix caching).
  config.engine.enable_prefix_caching = True
  # What to do when blocks run out: "recompute" or "swap".
  config.engine.preemption_mode = "recompute"
  # Attention path: "auto" (pallas on GPU, xla on CPU), "xla", "pallas", "pallas_interpret".
  config.engine.attention_impl = "auto"
  # Compute dtype (and the KV cache's under kv_cache_dtype "auto"): "float32" or "bfloat16".
  config.engine.dtype = "float32"
  # KV pages: "auto" (= dtype), "float32", "bfloat16", or quantized with per-token scales:
  # "int8", "fp8" (float8_e4m3fn); a quantized cache holds ~3.6x the blocks of float32.
  config.engine.kv_cache_dtype = "auto"
  # Swapped-out blocks in the host pool: "auto" (as the device stores them), "int8", "fp8".
  config.engine.swap_dtype = "auto"
  # Issue swaps without waiting for them (False: wait for each, the synchronous baseline).
  config.engine.async_swap = True
  # Multi-step scheduling (vLLM's num_scheduler_steps): when nothing waits and every
  # request decodes, run up to this many decode steps per scheduled step (one round of
  # host work for all of them; streamed tokens then come in bursts). 1: off.
  config.engine.num_scheduler_steps = 1
  # Async scheduling (vLLM's name): schedule and dispatch each step while the one before
  # runs, its tokens fed on the device; same outputs. False: schedule after each result.
  config.engine.async_scheduling = True
  # Seeds requests that do not set their own.
  config.engine.seed = 0
  # Devices the model and the KV pool are sharded over by attention heads (1: one device).
  # On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 makes 8 devices.
  config.engine.tensor_parallel_size = 1

  # Multi-host: one process per host, each with the same config and prompts (see README);
  # an empty coordinator_address is a single-process run.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # "host:port" of process 0, e.g. 127.0.0.1:12345
  config.distributed.num_processes = 1
  config.distributed.process_id = 0

  config.sampling = ml_collections.ConfigDict()
  # Tokens to generate per prompt.
  config.sampling.max_tokens = 96
  # 0 is greedy.
  config.sampling.temperature = 0.0
  # 0 keeps all tokens.
  config.sampling.top_k = 0
  # Nucleus mass in (0, 1].
  config.sampling.top_p = 1.0
  # Per-request seed (request i uses seed + i); -1 lets the engine draw one.
  config.sampling.seed = 0

  # Prompts served by the main job: different lengths, so batching is visible.
  config.prompts = (
      "The Python ",
      "def ",
      "A class definition ",
      "The try statement specifies exception handlers and/or cleanup code for a group of ",
      "Assignment statements are used to (re)bind names to values and to modify ",
      "The import statement",
      "In the following, ",
      "Built-in functions ",
  )
  # `python main.py --mode=train`: the bundled model's training run (every field is
  # commented in pagedjax/weights/train.py), e.g. --config.train.num_steps=200.
  config.train = train_lib.default_train_config()
  return config
