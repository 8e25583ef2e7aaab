"""LLM: the serving engine's API (vLLM's offline `generate` and streaming `add_request` / `step`).

A thin layer: it validates requests at the boundary, tokenizes, and runs each step as
three calls, `scheduler.schedule()` -> `runner.submit()` / `runner.fetch()` ->
`scheduler.update_from_output()`, then checks stop strings on the text and builds
`RequestOutput`s. With async scheduling (default) the next step is scheduled and
submitted between a step's submit and its fetch, so that the host's work of one step
overlaps the device's work of the other. The scheduler
(pagedjax.core) owns every block decision; the model runner (pagedjax.runner) owns the
device state and the jitted step.

A bad request is the requester's problem only: invalid input raises ValueError /
TypeError naming the field before anything changes; a failure while processing one
request inside a step ends that request alone (finish_reason "error", `error` set, its
blocks freed); a failure of the whole device step fails the requests of that step,
rebuilds device state if it was lost, and leaves the engine serving.
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Mapping
from collections.abc import Sequence as TypingSequence

import jax
import numpy as np

from pagedjax.core import beam_search
from pagedjax.core.block_manager import BlockManager
from pagedjax.core.scheduler import Scheduler, StepResult, max_blocks_needed
from pagedjax.core.sequence import Sequence, SequenceGroup
from pagedjax.entrypoints.detokenizer import IncrementalDetokenizer
from pagedjax.outputs import CompletionOutput, Logprob, RequestOutput
from pagedjax.runner import cpu_attention, kv_cache
from pagedjax.runner import sharding as sharding_lib
from pagedjax.runner import step as step_lib
from pagedjax.runner.model_runner import MAX_BANNED, DeviceSampling, ModelRunner
from pagedjax.runner.model_runner import IMPLS as _RUNNER_IMPLS
from pagedjax.sampling_params import RequestOutputKind, SamplingParams, seed_words
from pagedjax.weights import checkpoint

ATTENTION_IMPLS = ("auto", *_RUNNER_IMPLS)
DTYPES = ("float32", "bfloat16")
# kv_cache_dtype (vLLM's names; "auto": the model's dtype) -> the pages' dtype.
KV_CACHE_DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "int8": "int8",
                   "fp8": "float8_e4m3fn"}
# swap_dtype: "auto" swaps blocks as the device stores them; int8 / fp8 store an
# unquantized pool's blocks quantized in the host pool.
SWAP_DTYPES = {"auto": None, "int8": "int8", "fp8": "float8_e4m3fn"}
_CUMULATIVE = RequestOutputKind.CUMULATIVE


def _check_int(name, value, minimum, *, none_ok=False):
  if value is None and none_ok:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  return value


def resolve_attention_impl(attention_impl: str) -> str:
  """"auto" -> "pallas" on GPU; on CPU "cpu" where its native kernel builds, else "xla".
  "cpu" is built here (a BuildError saying why, rather than mid-step)."""
  if attention_impl == "auto":
    return ("pallas" if jax.default_backend() == "gpu" else
            "cpu" if cpu_attention.available() else "xla")
  if attention_impl == "cpu":
    cpu_attention.library_path()
  return attention_impl


def _check_kv_dtype_for_impl(kv_cache_dtype: str, dtype: str, impl: str) -> None:
  """The Pallas kernels take float pages of q's dtype, or int8 / fp8 pages with scales;
  Triton lowers fp8 casts on compute capability >= 8.9 only."""
  if impl not in ("pallas", "pallas_interpret"):
    return
  if kv_cache_dtype in ("float32", "bfloat16") and kv_cache_dtype != dtype:
    raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} with dtype {dtype!r}: the Pallas "
                     f"kernels need float pages of the compute dtype (use 'auto', 'int8' or "
                     f"'fp8', or attention_impl='xla')")
  if kv_cache_dtype == "fp8" and impl == "pallas":
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is not None and tuple(int(x) for x in str(cc).split(".")[:2]) < (8, 9):
      raise ValueError(f"kv_cache_dtype 'fp8' needs a GPU of compute capability >= 8.9 for the "
                       f"Pallas kernels, this one has {cc} (use 'int8')")


class LLM:
  """A paged-KV serving engine shaped like vLLM's `LLM`.

  Args:
    model: None for the bundled model, or a directory: pagedjax's own format
      (`checkpoint.save_model`) or a Hugging Face checkpoint (see pagedjax/weights/hf.py).
    max_model_len: context limit in tokens (None: the model's, capped at 4096 for
      Hugging Face checkpoints).
    num_blocks: KV blocks on the device; None sizes the cache from kv_cache_memory_mb.
    block_size: tokens per KV block (a power of two).
    num_host_blocks: blocks in the host swap pool (None: same as num_blocks).
    max_num_seqs: most sequences in one step (at most max_num_batched_tokens).
    max_num_batched_tokens: token budget of one step (decodes + prefill chunks), at
      least one block.
    enable_chunked_prefill: split long prompts across steps (default); False computes a
      fresh prompt in one step and refuses prompts longer than the budget.
    enable_prefix_caching: reuse the KV of full blocks already computed for the same
      tokens (and cache salt) by any request: system prompts, few-shot prefixes, chat
      histories, re-prefills after preemption (see core.block_manager). Outputs are
      unchanged; `reset_prefix_cache()` drops the cache.
    preemption_mode: "recompute" or "swap" when blocks run out.
    attention_impl: "auto" (pallas on GPU; on CPU "cpu" where its native kernel builds,
      else "xla"), "xla", "cpu" (the xla path's tiles, decodes and prefill chunks, in a
      native XLA:CPU kernel, pagedjax.runner.cpu_attention), "pallas", "pallas_interpret".
    dtype: compute dtype (and the KV cache's under kv_cache_dtype="auto"), "float32" or
      "bfloat16".
    kv_cache_dtype: "auto" (= dtype), "float32", "bfloat16", or quantized: "int8" or
      "fp8" (float8_e4m3fn), each token's K and V vector per kv head stored in 8 bits with
      a float32 scale, quantized on write inside the step; kv_cache_memory_mb then buys
      proportionally more blocks (`memory_stats()["bytes_per_block"]`).
    swap_dtype: "auto" (swapped blocks kept as the device pool stores them), "int8" or
      "fp8": an unquantized pool's swapped-out blocks are stored quantized in the host
      pool (less host memory and copy traffic; swap-in dequantizes, so a swapped request's
      outputs change by that rounding). A quantized pool always swaps as it is.
    async_swap: issue swaps without waiting for them to land (default); False waits for
      each (the synchronous baseline: same outputs, host stalls).
    kv_cache_memory_mb: KV budget per device used when num_blocks is None (as vLLM sizes
      its cache per GPU): under tensor parallelism each device holds 1/k of every block,
      so k devices buy up to k times the blocks.
    tensor_parallel_size: devices the model and the KV pool are sharded over, by
      attention heads (Megatron-style; see pagedjax.runner.sharding): a 1-D mesh of the
      first k devices. It must divide num_heads and the MLP width, and divide num_kv_heads
      or be a multiple of it (kv heads are then replicated). Outputs match k = 1 up to
      float reduction order.
    mesh: instead of the first k devices, a 1-D `jax.sharding.Mesh` with axis "tp"
      (e.g. spanning processes under jax.distributed); tensor_parallel_size must then be
      1 or its size.
    seed: seeds requests that do not set SamplingParams.seed.
    skip_tokenizer_init: do not load the tokenizer: token-id prompts only, empty text.
    kv_reservation: None (paging), or the paper's Orca baselines as admission policies
      of this engine, for benchmarks: "max", "pow2" or "oracle" reserve each request's
      context, power-of-two or true length at admission (see core.scheduler).
    num_scheduler_steps: vLLM's multi-step scheduling: when nothing waits and every
      running request decodes (no beam search), one step runs up to this many decode
      steps in one device program, with one round of scheduling and host bookkeeping
      (1: every decode step is scheduled). Same tokens; streamed outputs then arrive up
      to this many tokens at a time.
    async_scheduling: vLLM's async scheduling: each step is scheduled and dispatched
      while the step before it still runs on the device (its sampled tokens feed the new
      step on the device), and the host applies the earlier step's results meanwhile, so
      scheduling and output bookkeeping overlap the device step. Same tokens; a request
      that stops wastes at most one step's row. Falls back to a scheduled-after-results
      step when beams or a fresh n > 1 prompt must fork on the host, under block
      pressure (preemption decides on known tokens) and with num_scheduler_steps > 1.
  """

  def __init__(self, model: str | None = None, *, max_model_len: int | None = None,
               num_blocks: int | None = None, block_size: int = 16,
               num_host_blocks: int | None = None, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 2048, enable_chunked_prefill: bool = True,
               enable_prefix_caching: bool = True,
               preemption_mode: str = "recompute", attention_impl: str = "auto",
               dtype: str = "float32", kv_cache_dtype: str = "auto", swap_dtype: str = "auto",
               async_swap: bool = True, kv_cache_memory_mb: float = 64.0, seed: int = 0,
               skip_tokenizer_init: bool = False, kv_reservation: str | None = None,
               tensor_parallel_size: int = 1, mesh: jax.sharding.Mesh | None = None,
               num_scheduler_steps: int = 1, async_scheduling: bool = True):
    _check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("kv_cache_dtype", kv_cache_dtype, tuple(KV_CACHE_DTYPES))
    _check_choice("swap_dtype", swap_dtype, tuple(SWAP_DTYPES))
    if not isinstance(async_swap, bool):
      raise TypeError(f"async_swap must be a bool, got {async_swap!r}")
    if not isinstance(async_scheduling, bool):
      raise TypeError(f"async_scheduling must be a bool, got {async_scheduling!r}")
    if kv_cache_dtype in ("int8", "fp8") and swap_dtype not in ("auto", kv_cache_dtype):
      raise ValueError(f"a {kv_cache_dtype} KV cache swaps as {kv_cache_dtype}; swap_dtype must be "
                       f"'auto' or {kv_cache_dtype!r}, got {swap_dtype!r}")
    _check_choice("preemption_mode", preemption_mode, ("recompute", "swap"))
    block_size = _check_int("block_size", block_size, 1)
    if block_size & (block_size - 1):
      raise ValueError(f"block_size must be a power of two, got {block_size}")
    max_num_seqs = _check_int("max_num_seqs", max_num_seqs, 1)
    max_num_batched_tokens = _check_int("max_num_batched_tokens", max_num_batched_tokens,
                                        block_size)
    _check_int("num_blocks", num_blocks, 1, none_ok=True)
    _check_int("num_host_blocks", num_host_blocks, 0, none_ok=True)
    _check_int("seed", seed, 0)
    num_scheduler_steps = _check_int("num_scheduler_steps", num_scheduler_steps, 1)
    if not isinstance(enable_chunked_prefill, bool):
      raise TypeError(f"enable_chunked_prefill must be a bool, got {enable_chunked_prefill!r}")
    if not isinstance(enable_prefix_caching, bool):
      raise TypeError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
    if isinstance(kv_cache_memory_mb, bool) or not isinstance(kv_cache_memory_mb, numbers.Real) \
        or not 0 < kv_cache_memory_mb < float("inf"):
      raise ValueError(f"kv_cache_memory_mb must be a positive number, got {kv_cache_memory_mb!r}")
    tensor_parallel_size = _check_int("tensor_parallel_size", tensor_parallel_size, 1)
    if mesh is not None:
      if not isinstance(mesh, jax.sharding.Mesh) or mesh.axis_names != (sharding_lib.AXIS,):
        raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh with axis "
                         f"{sharding_lib.AXIS!r}, got {mesh!r}")
      if tensor_parallel_size not in (1, mesh.size):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but the mesh has "
                         f"{mesh.size} devices")
      tensor_parallel_size = mesh.size
    attention_impl = resolve_attention_impl(attention_impl)
    _check_kv_dtype_for_impl(kv_cache_dtype, dtype, attention_impl)
    cfg, module, self.tokenizer = checkpoint.load(model, max_seq_len=max_model_len,
                                                  **({"skip_tokenizer_init": True}
                                                     if skip_tokenizer_init else {}))
    self.model_config = cfg
    sharding_lib.check_tensor_parallel_size(
        tensor_parallel_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        hidden_dim=cfg.hidden_dim, num_devices=jax.device_count())
    if mesh is None and tensor_parallel_size > 1:
      mesh = sharding_lib.make_mesh(tensor_parallel_size)
    self.tensor_parallel_size = tensor_parallel_size
    self.block_size = block_size
    self.max_model_len = cfg.max_seq_len
    # Sequences per step cannot exceed tokens per step (each decodes one token).
    self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
    self.max_num_batched_tokens = max_num_batched_tokens
    self.enable_chunked_prefill = enable_chunked_prefill
    self.attention_impl = attention_impl
    self.kv_cache_dtype = kv_cache_dtype
    self.runner_kwargs = dict(block_size=block_size, max_model_len=cfg.max_seq_len, dtype=dtype,
                              attention_impl=attention_impl,
                              vocab_size=self.tokenizer.vocab_size,
                              kv_cache_dtype=KV_CACHE_DTYPES[kv_cache_dtype],
                              swap_dtype=SWAP_DTYPES[swap_dtype], async_swap=async_swap,
                              mesh=mesh, num_scheduler_steps=num_scheduler_steps)
    heads_per_device = sharding_lib.kv_heads_per_device(cfg.num_kv_heads, tensor_parallel_size)
    bytes_per_block = kv_cache.block_bytes(cfg.num_layers, heads_per_device, block_size,
                                           cfg.head_dim, KV_CACHE_DTYPES[kv_cache_dtype] or dtype)
    if num_blocks is None:
      num_blocks = max(1, int(kv_cache_memory_mb * 2**20) // bytes_per_block)
    num_host_blocks = num_blocks if num_host_blocks is None else num_host_blocks
    self.runner = ModelRunner(module, num_blocks=num_blocks, num_host_blocks=num_host_blocks,
                              max_num_seqs=self.max_num_seqs, **self.runner_kwargs)
    self.enable_prefix_caching = enable_prefix_caching
    self.bm = BlockManager(num_blocks, block_size, num_host_blocks, watermark=0.01,
                           enable_caching=enable_prefix_caching,
                           lossy_swap=self.runner.lossy_swap)
    self.scheduler = Scheduler(self.bm, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens,
                               max_model_len=cfg.max_seq_len,
                               eos_token_ids=self.tokenizer.eos_token_ids,
                               preemption_mode=preemption_mode,
                               enable_chunked_prefill=enable_chunked_prefill,
                               reservation=kv_reservation,
                               num_scheduler_steps=num_scheduler_steps)
    self.async_scheduling = async_scheduling
    # Async scheduling: the step dispatched but not yet applied, and its device handle.
    self._inflight: tuple | None = None
    self._request_counter = itertools.count()
    self._arrivals = itertools.count()
    self._seed_rng = np.random.default_rng(seed)
    self._groups: dict[str, SequenceGroup] = {}
    # Outputs of streamed requests that finished while generate() ran the engine.
    self._pending: dict[str, RequestOutput] = {}
    self._peak = {"used_blocks": 0, "waste_pct": 0.0}
    self._stats = {"num_steps": 0, "num_prefill_steps": 0, "num_decode_steps": 0,
                   "num_multi_steps": 0, "num_ahead_steps": 0,
                   "num_generated_tokens": 0, "num_prefill_tokens": 0,
                   "num_batched_tokens": 0, "num_failed_requests": 0,
                   "num_failed_steps": 0, "step_time_s": 0.0, "device_time_s": 0.0}

  # --------------------------------------------------------------- requests
  def _tokenize(self, prompt) -> tuple[str | None, list[int], str | None]:
    """(text, token ids, cache salt) of a prompt in any accepted form."""
    salt = None
    if isinstance(prompt, Mapping):
      known = {"prompt", "prompt_token_ids", "cache_salt"}
      unknown = set(prompt) - known
      if unknown:
        raise ValueError(f"prompt dict has unknown keys {sorted(unknown)}; known: {sorted(known)}")
      if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
      salt = prompt.get("cache_salt")
      if salt is not None and (not isinstance(salt, str) or not salt):
        raise TypeError(f"cache_salt must be a non-empty string, got {salt!r}")
      if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
          raise TypeError(f"prompt must be a string, got {type(prompt['prompt']).__name__}")
        prompt = prompt["prompt"]
      else:
        prompt = prompt["prompt_token_ids"]
        if isinstance(prompt, str):
          raise TypeError("prompt_token_ids must be a list of ints, got a string")
    if isinstance(prompt, str):
      if not prompt:
        raise ValueError("prompt is empty")
      if not getattr(self.tokenizer, "has_text", True):
        raise ValueError("this model was loaded without a tokenizer: send prompt_token_ids")
      return prompt, self.tokenizer.encode(prompt), salt
    if isinstance(prompt, np.ndarray):
      if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"a numpy prompt must be a 1-D integer array, got {prompt.dtype} "
                        f"{prompt.shape}")
      prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
      raise TypeError(f"prompt must be a string, a list of token ids, a numpy int array or a "
                      f"dict, got {type(prompt).__name__}")
    for t in prompt:
      if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"prompt token ids must be ints, got {t!r} ({type(t).__name__})")
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError("prompt_token_ids is empty")
    bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
    if bad:
      raise ValueError(f"token ids outside the vocabulary [0, {self.tokenizer.vocab_size}): "
                       f"{bad[:8]}")
    return None, ids, salt

  def _check_params(self, params: SamplingParams, prompt_len: int) -> None:
    """The checks that need the model, the cache or the budget."""
    vocab = self.tokenizer.vocab_size
    width = params.width
    if width > self.max_num_seqs:
      raise ValueError(f"a request of {width} sequences (n / beam_width) can never be scheduled "
                       f"with max_num_seqs={self.max_num_seqs}")
    if params.use_beam_search:
      if 2 * params.beam_width > step_lib.NUM_TOP_LOGPROBS:
        raise ValueError(f"beam_width must be <= {step_lib.NUM_TOP_LOGPROBS // 2}, "
                         f"got {params.beam_width}")
      if params.stop or params.stop_token_ids:
        raise ValueError("stop strings / stop_token_ids are not supported with beam search")
      if params.logprobs is not None:
        raise ValueError("logprobs is not supported with beam search")
    if params.logprobs is not None and params.logprobs > step_lib.NUM_TOP_LOGPROBS:
      raise ValueError(f"logprobs must be <= {step_lib.NUM_TOP_LOGPROBS}, got {params.logprobs}")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
      raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
    max_stop_ids = MAX_BANNED - len(self.tokenizer.eos_token_ids)
    if params.min_tokens and len(params.stop_token_ids) > max_stop_ids:
      raise ValueError(f"with min_tokens, at most {max_stop_ids} stop_token_ids, got "
                       f"{len(params.stop_token_ids)}")
    if params.stop and not getattr(self.tokenizer, "has_text", True):
      raise ValueError("stop strings need a tokenizer; this model was loaded without one")
    if prompt_len >= self.max_model_len:
      raise ValueError(f"prompt of {prompt_len} tokens does not leave room to generate within "
                       f"the model's context of {self.max_model_len} tokens")
    if not self.enable_chunked_prefill and prompt_len > self.max_num_batched_tokens:
      raise ValueError(f"prompt of {prompt_len} tokens exceeds max_num_batched_tokens="
                       f"{self.max_num_batched_tokens} with enable_chunked_prefill=False")
    need = max_blocks_needed(prompt_len, params.max_tokens, width, block_size=self.block_size,
                             max_model_len=self.max_model_len)
    reserved = self.scheduler.reserved_blocks(prompt_len, params.max_tokens, width)
    if reserved > self.bm.num_blocks:
      raise ValueError(f"kv_reservation={self.scheduler.reservation!r} reserves {reserved} KV "
                       f"blocks for this request but the cache has {self.bm.num_blocks}")
    if need > self.bm.num_blocks:
      raise ValueError(f"request needs up to {need} KV blocks ({prompt_len} prompt tokens + "
                       f"{params.max_tokens} max_tokens x {width} sequences, the prompt's full "
                       f"blocks shared) but the cache has {self.bm.num_blocks}: it can never fit")

  def _device_sampling(self, params: SamplingParams, seed: int) -> DeviceSampling:
    bans = ()
    if params.min_tokens:
      bans = tuple(params.stop_token_ids) + (
          () if params.ignore_eos else tuple(self.tokenizer.eos_token_ids))
    return DeviceSampling(seed_words(seed), params.temperature,
                          min(params.top_k, self.tokenizer.vocab_size), params.top_p,
                          params.min_tokens, bans,
                          wants_top=bool(params.logprobs) or params.use_beam_search)

  def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None) -> str:
    """Queues one request; raises ValueError / TypeError (naming the value) and changes
    nothing if it is bad.

    Args:
      request_id: unique id (None: one is made); any value is used as str(value).
      prompt: a string, a list / tuple / 1-D numpy array of token ids, or a dict
        {"prompt": text} or {"prompt_token_ids": ids}, optionally with "cache_salt".
      params: SamplingParams (default: SamplingParams()).

    Returns:
      The request id.
    """
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
      raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    text, ids, salt = self._tokenize(prompt)
    self._check_params(params, len(ids))
    request_id = str(next(self._request_counter)) if request_id is None else str(request_id)
    if request_id in self._groups or request_id in self._pending:
      raise ValueError(f"request_id {request_id!r} is already in use")
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**63))
    group = SequenceGroup(request_id, ids, params, arrival=next(self._arrivals), seed=seed,
                          prompt=text, cache_salt=salt)
    group.device_sampling = self._device_sampling(params, seed)
    group.arrival_time = time.perf_counter()
    self._groups[request_id] = group
    self.scheduler.add(group)
    return request_id

  def abort_request(self, request_id) -> bool:
    """Ends a request wherever it is and frees its blocks; returns whether it was found."""
    request_id = str(request_id)
    self._pending.pop(request_id, None)
    group = self.scheduler.abort(request_id)
    self._groups.pop(request_id, None)
    return group is not None

  def has_unfinished_requests(self) -> bool:
    return self.scheduler.has_unfinished() or bool(self._pending)

  # ------------------------------------------------------------------ steps
  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns the outputs of the requests it advanced (and of
    streamed requests that finished while `generate` was running); a request whose
    `output_kind` is FINAL_ONLY only when it finished."""
    pending = list(self._pending.values())
    self._pending.clear()
    if not self.scheduler.has_unfinished():
      self._inflight = None  # a step ahead of requests that all ended (its rows are moot)
      return pending
    return pending + [self._output(g) for g in self._step()
                      if g.params.output_kind is _CUMULATIVE or g.is_finished]

  def _step(self) -> list[SequenceGroup]:
    """One engine step; returns the groups it advanced or failed."""
    if self.async_scheduling:
      return self._step_async()
    start = time.perf_counter()
    so = self._schedule()
    failed: list[SequenceGroup] = []
    out = None
    try:
      handle = self._submit(so)
      if handle is not None:
        out = self._fetch(so, handle)
    except Exception as e:  # noqa: BLE001  (the engine must survive a failed step)
      failed = self._recover(so, e)
      out = None
    groups = []
    if out is not None:
      groups = self.scheduler.update_from_output(so, StepResult(*out), on_error=self._failed,
                                                 after_token=self._check_stop_strings)
    self._account(so, start)
    return self._touched(groups, failed)

  def _step_async(self) -> list[SequenceGroup]:
    """One step under async scheduling: completes the step in flight (dispatching the
    first if none is), after scheduling and dispatching the next one behind it."""
    start = time.perf_counter()
    failed: list[SequenceGroup] = []
    if self._inflight is None:
      so = self._schedule()
      try:
        handle = self._submit(so)
      except Exception as e:  # noqa: BLE001
        failed = self._recover(so, e)
        self._account(so, start)
        return self._touched(failed)
      if handle is None:  # block copies only
        self._account(so, start)
        return []
    else:
      so, handle = self._inflight
      self._inflight = None
    # The next step, scheduled and dispatched while this one runs.
    nxt = self.scheduler.schedule(ahead_of=so)
    nxt_handle, nxt_error = None, None
    if nxt is not None:
      try:
        nxt_handle = self._submit(nxt, handle)
        self._stats["num_ahead_steps"] += 1
      except Exception as e:  # noqa: BLE001  (handled after this step's results)
        nxt_error = e
    groups: list[SequenceGroup] = []
    try:
      out = self._fetch(so, handle)
    except Exception as e:  # noqa: BLE001
      failed = self._recover(so, e)
      if nxt is not None:
        self._discard(nxt, nxt_handle)
        nxt = None
    else:
      # Rows of sequences that ended while this step ran ahead of their stop: dropped.
      moot = sum(len(s.sample_indices) for s in so.seqs if s.seq.is_finished)
      groups = self.scheduler.update_from_output(
          so, StepResult(*out), on_error=self._failed, after_token=self._check_stop_strings,
          ahead=None if nxt_handle is None else nxt)
      if nxt_error is not None:
        failed = self._recover(nxt, nxt_error)
      elif nxt is not None and self.scheduler.has_unfinished():
        self._inflight = (nxt, nxt_handle)  # (else every request it served has ended)
      self._stats["num_generated_tokens"] -= moot
    self._account(so, start)
    return self._touched(groups, failed)

  def _schedule(self):
    so = self.scheduler.schedule()
    if not so.seqs and not so.swap_out and not so.swap_in and self.scheduler.has_unfinished():
      # Every request fits the cache alone (checked at add), so an empty step with work
      # left is a scheduler bug: say so instead of spinning.
      raise RuntimeError(f"the scheduler made no progress: {len(self.scheduler.waiting)} "
                         f"waiting, {len(self.scheduler.running)} running, "
                         f"{len(self.scheduler.swapped)} swapped")
    return so

  def _submit(self, so, prev=None):
    """Block copies, then the step's dispatch (None when it has no sequences)."""
    self.runner.copy_blocks(so)
    if not so.seqs:
      return None
    t0 = time.perf_counter()
    handle = self.runner.submit(so, prev)
    self._stats["device_time_s"] += time.perf_counter() - t0
    return handle

  def _fetch(self, so, handle):
    t0 = time.perf_counter()
    try:
      return self.runner.fetch(so, handle)
    finally:
      self._stats["device_time_s"] += time.perf_counter() - t0

  def _discard(self, so, handle) -> None:
    """Drops a step scheduled ahead of one that failed (its fed tokens are lost): its
    requests not failed with that step are computed again, unchanged (recompute)."""
    self.bm.uncache(so.cached_blocks)
    if handle is not None:
      try:
        self.runner.fetch(so, handle)
      except Exception:  # noqa: BLE001  (its pages are then reported lost)
        pass
    self._rebuild_lost_state([g for g in so.groups if not g.is_finished])

  def _touched(self, groups: list[SequenceGroup],
               failed: list[SequenceGroup] = ()) -> list[SequenceGroup]:
    """The groups a step advanced (each once) and those it failed; forgets finished ones."""
    if failed:  # (a failed group may be one the step advanced too)
      groups = list({g.request_id: g for g in groups + failed}.values())
    for g in groups:
      if g.is_finished:
        self._groups.pop(g.request_id, None)
    return groups

  def _recover(self, so, error: Exception) -> list[SequenceGroup]:
    """After a failed device step: fail its requests, rebuild lost state, keep serving."""
    self._stats["num_failed_steps"] += 1
    # Blocks this step was to fill hold no valid K/V.
    self.bm.uncache(so.cached_blocks)
    failed = so.groups
    for group in failed:
      self.scheduler.finish_group(group, "error")
      self._failed(group, error)
    # Swap-outs of this step may not have landed.
    self._rebuild_lost_state([g for g in so.preempted if g in self.scheduler.swapped])
    return failed

  def _rebuild_lost_state(self, redo: list[SequenceGroup]) -> None:
    """Fresh pools for those a failed call deleted; recomputes `redo` and every group
    whose K/V a lost pool held (a lost device pool also empties the prefix cache)."""
    lost_device, lost_host = self.runner.state_is_lost()
    self.runner.reset(device=lost_device, host=lost_host)
    if lost_device:
      self.bm.reset_prefix_cache()
    if lost_host:
      redo = redo + self.scheduler.swapped
    if lost_device:
      redo = redo + self.scheduler.running
    for group in dict.fromkeys(redo):
      self.scheduler.recompute(group)

  def _failed(self, group: SequenceGroup, error: Exception) -> None:
    group.error = f"{type(error).__name__}: {error}"
    self._stats["num_failed_requests"] += 1

  def _check_stop_strings(self, group: SequenceGroup) -> None:
    """Ends sequences whose new text contains a stop string (the text before it is kept).
    Runs after each new token, for sequences that just finished too (their last token
    may complete a stop string)."""
    p = group.params
    if p.use_beam_search or not p.stop:
      return
    longest = max(len(s) for s in p.stop)
    for seq in group.seqs:
      # Running sequences, and those that just hit max_tokens: the token that ended one
      # may complete a stop string (then it ends by "stop", the stop string cut).
      if seq.finish_reason not in (None, "length"):
        continue
      n = len(seq.output_token_ids)
      if n == seq.num_stop_checked:
        continue  # no new token since the last check
      seq.num_stop_checked = n
      text = self._stream_text(seq)
      # Search where a new match can start: the new text plus the longest stop before it.
      # Before min_tokens the text is tracked but not searched (as vLLM: a stop string
      # that ended before min_tokens does not count later).
      tail_from = max(0, seq.num_text_chars - longest)
      seq.num_text_chars = len(text)
      if n < p.min_tokens:
        continue
      for s in p.stop:
        at = text.find(s, tail_from)
        if at >= 0:
          seq.output_text = text[:at]
          if seq.finish_reason is None:
            self.scheduler.finish_seq(seq, "stop", s)
          else:  # finished by length this step, blocks already freed
            seq.finish_reason, seq.stop_reason = "stop", s
          break

  def _account(self, so, start: float) -> None:
    st = self._stats
    st["num_steps"] += 1
    # A step with any prefill chunk counts as a prefill step; decode-only steps as decode.
    prefill, prompt_tokens, rows = False, 0, 0  # (one pass: this runs every step)
    for s in so.seqs:
      n = len(s.token_ids)
      if s.start < len(s.seq.prompt_token_ids):
        prefill = True
        prompt_tokens += n
      elif n > 1:
        prefill = True
      rows += len(s.sample_indices)
    st["num_prefill_steps" if prefill else "num_decode_steps"] += 1
    if so.num_steps > 1:
      # Each inner step a sequence kept fed one token and drew one (those drawn after a
      # stop were dropped, and are not counted).
      kept = sum(s.seq.num_computed_tokens - s.start for s in so.seqs)
      st["num_multi_steps"] += 1
      st["num_generated_tokens"] += kept
      st["num_batched_tokens"] += kept
    else:
      st["num_generated_tokens"] += rows
      st["num_batched_tokens"] += so.num_batched_tokens
    st["num_prefill_tokens"] += prompt_tokens
    used = self.bm.device_allocator.num_used_blocks
    if used > self._peak["used_blocks"]:
      # Internal fragmentation at the high-water mark (O(sequences); a long run reaches
      # a new peak most steps).
      bs = self.bm.block_size
      self._peak = {"used_blocks": used,
                    "waste_pct": 100.0 * self.bm.num_empty_slots() / (used * bs)}
    st["step_time_s"] += time.perf_counter() - start

  # ---------------------------------------------------------------- outputs
  def _decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids) if getattr(self.tokenizer, "has_text", True) else ""

  def _stream_text(self, seq: Sequence) -> str:
    """The running sequence's text so far, decoded incrementally (O(new tokens))."""
    if seq.detokenizer is None:
      seq.detokenizer = IncrementalDetokenizer(self._decode)
    return seq.detokenizer.update(seq.output_token_ids)

  def _text(self, seq: Sequence) -> str:
    """A sample's output text: the text before a stop string, the full decode of a
    finished output (computed once), the incremental text of a running one."""
    if seq.output_text is not None:
      return seq.output_text
    if not getattr(self.tokenizer, "has_text", True):
      return ""
    if seq.is_finished:
      seq.output_text = self.tokenizer.decode(seq.output_token_ids)
      return seq.output_text
    return self._stream_text(seq)

  def _output(self, group: SequenceGroup) -> RequestOutput:
    """The group's RequestOutput; if building it fails (e.g. detokenization), the request
    ends with finish_reason "error" and an output without text; the others go on."""
    try:
      return self._request_output(group)
    except Exception as e:  # noqa: BLE001  (isolation: one request's failure is its own)
      self.scheduler.finish_group(group, "error")
      for seq in group.seqs:
        seq.finish_reason, seq.stop_reason = "error", None
      self._groups.pop(group.request_id, None)
      self._failed(group, e)
      return self._request_output(group, decode=False)

  def _logprobs(self, seq: Sequence, decode) -> list[dict[int, Logprob]]:
    """Per generated token {token_id: Logprob}; built once per token (cached on the seq)."""
    out = seq.logprob_dicts if decode == self._decode else []
    new = zip(seq.output_token_ids[len(out):], seq.output_logprobs[len(out):],
              seq.output_ranks[len(out):], seq.output_top_logprobs[len(out):])
    for tok, lp, rank, top in new:
      d = {t: Logprob(l, i + 1, decode([t])) for i, (t, l) in enumerate(top)}
      if tok not in d:
        d[tok] = Logprob(lp, rank, decode([tok]))
      out.append(d)
    return list(out)

  def _request_output(self, group: SequenceGroup, *, decode: bool = True) -> RequestOutput:
    p = group.params
    _decode = self._decode if decode else (lambda ids: "")
    if p.use_beam_search:
      if group.is_finished and group.hypotheses:
        hyps = beam_search.best(group.hypotheses, p.n)
      else:  # running beams, best first, as provisional outputs
        hyps = beam_search.best([beam_search.Hypothesis(
            list(s.output_token_ids), s.cumulative_logprob, None,
            beam_search.beam_score(s.cumulative_logprob, len(s.output_token_ids),
                                   p.length_penalty)) for s in group.seqs], p.n)
      reason = "error" if group.error else None
      outs = [CompletionOutput(index=i, text=_decode(h.token_ids), token_ids=h.token_ids,
                               cumulative_logprob=h.cumulative_logprob,
                               finish_reason=reason or h.finish_reason)
              for i, h in enumerate(hyps)]
    else:
      outs = [CompletionOutput(
          index=i,
          text=self._text(s) if decode else "",
          token_ids=list(s.output_token_ids), cumulative_logprob=s.cumulative_logprob,
          logprobs=self._logprobs(s, _decode) if p.logprobs is not None else None,
          finish_reason=s.finish_reason, stop_reason=s.stop_reason)
          for i, s in enumerate(group.seqs)]
    return RequestOutput(group.request_id, group.prompt, list(group.prompt_token_ids), outs,
                         group.is_finished, group.error)

  # ---------------------------------------------------------------- offline
  def generate(self, prompts, sampling_params: SamplingParams | TypingSequence[SamplingParams] | None = None,
               *, use_tqdm: bool = False) -> list[RequestOutput]:
    """Generates for every prompt with continuous batching; outputs in prompt order.

    Requests added with `add_request` before the call are served alongside; those that
    finish meanwhile are returned by the next `step()`.

    Args:
      prompts: one prompt (a string, token ids, a numpy int array or a prompt dict) or a
        list of them.
      sampling_params: one SamplingParams for all prompts, or one per prompt.
      use_tqdm: show a progress bar over finished requests.

    Returns:
      One RequestOutput per prompt (a request that failed inside a step has
      finish_reason "error" and `error` set).
    """
    single = (isinstance(prompts, (str, Mapping, np.ndarray))
              or (isinstance(prompts, (list, tuple)) and prompts
                  and isinstance(prompts[0], numbers.Integral)))
    prompts = [prompts] if single else prompts
    if not isinstance(prompts, (list, tuple)):
      raise TypeError(f"prompts must be a prompt or a list of prompts, got "
                      f"{type(prompts).__name__}")
    if not prompts:
      raise ValueError("prompts is empty")
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      params = [sampling_params] * len(prompts)
    else:
      params = list(sampling_params)
      if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
    ids = []
    try:
      for prompt, p in zip(prompts, params):
        ids.append(self.add_request(None, prompt, p))
    except Exception:
      for rid in ids:  # a rejected prompt leaves nothing of this call behind
        self.abort_request(rid)
      raise
    final: dict[str, RequestOutput] = {}
    bar = None
    if use_tqdm:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(ids), desc="requests")
    wanted = set(ids)
    try:
      while wanted - final.keys():
        for group in self._step():  # outputs are built only for finished requests
          if not group.is_finished:
            continue
          out = self._output(group)
          if group.request_id in wanted:
            final[group.request_id] = out
            if bar is not None:
              bar.update(1)
          else:
            self._pending[group.request_id] = out
    finally:
      if bar is not None:
        bar.close()
    return [final[r] for r in ids]

  def precompile(self) -> int:
    """Compiles (by running on padding) every step program this engine's budget and
    max_num_seqs can reach, so that serving never stalls on a compilation (as vLLM
    captures its graphs at start-up). attention_impl "xla" only; returns how many
    programs ran (programs are shared per process, so a second engine costs little)."""
    return self.runner.precompile(self.max_num_batched_tokens)

  def reset_prefix_cache(self) -> int:
    """Drops every prefix-cache entry (vLLM's name): unreferenced cached blocks become
    free, blocks held by running requests stay theirs; returns the blocks freed."""
    return self.bm.reset_prefix_cache()

  # ------------------------------------------------------------------ stats
  @property
  def num_compilations(self) -> int:
    """Distinct step programs this engine has run; each is compiled at most once per process."""
    return len(self.runner.programs)

  def memory_stats(self) -> dict:
    """Block-pool, preemption, compilation and throughput counters as a flat dict."""
    stats = dict(self.bm.stats().as_dict())
    sched = self.scheduler
    stats.update(
        num_blocks=self.bm.num_blocks, num_free_blocks=self.bm.num_free_blocks,
        block_size=self.block_size, bytes_per_block=self.runner.bytes_per_block,
        tensor_parallel_size=self.tensor_parallel_size,
        bytes_per_block_per_device=self.runner.bytes_per_block_per_device,
        kv_cache_bytes_per_device=sharding_lib.per_device_nbytes(self.runner.kv),
        kv_cache_dtype=str(self.runner.kv.dtype),
        host_bytes_per_block=self.runner.host_bytes_per_block,
        swap_dtype=self.runner.host_dtype,
        **self.runner.swap_stats,
        num_preemptions=sum(sched.num_preemptions.values()),
        num_preemptions_recompute=sched.num_preemptions["recompute"],
        num_preemptions_swap=sched.num_preemptions["swap"],
        num_blocks_swapped_out=sched.num_blocks_swapped["out"],
        num_blocks_swapped_in=sched.num_blocks_swapped["in"],
        num_running_seqs=sum(len(g.live_seqs) for g in sched.running),
        enable_prefix_caching=self.enable_prefix_caching,
        prefix_cache_queries=self.bm.prefix_cache_queries,
        prefix_cache_hits=self.bm.prefix_cache_hits,
        num_cached_blocks=self.bm.num_cached_blocks,
        num_evictable_blocks=self.bm.device_allocator.num_evictable_blocks,
        num_evicted_blocks=self.bm.num_evicted_blocks,
        num_waiting_requests=len(sched.waiting), num_swapped_requests=len(sched.swapped),
        peak_waste_pct=self._peak["waste_pct"],
        num_compilations=self.num_compilations, process_step_traces=step_lib.TRACES["step"],
        **self._stats)
    return stats
