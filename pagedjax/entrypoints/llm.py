"""LLM: the serving engine (tokenizer + scheduler + block manager + jitted steps + sampler).

`LLM.generate` is vLLM's offline API; `add_request` / `step` is the streaming
one. Each `step()` asks the scheduler for one step, turns it into a padded
step plan (numpy), applies the block ops (swap-out, swap-in, copy-on-write) to
the device state, runs one jitted program (paged forward + sampling, with the
KV pages donated so they update in place) and appends the drawn tokens.
Shapes are padded to power-of-two buckets so a long run compiles a bounded
number of programs; `memory_stats()["num_compilations"]` counts them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as TypingSequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pagedjax.weights import checkpoint
from pagedjax.core import beam_search
from pagedjax.runner import kv_cache as kvc
from pagedjax.runner import step as step_lib
from pagedjax.core.block_manager import BlockManager
from pagedjax.runner.model import ModelConfig
from pagedjax.outputs import CompletionOutput, RequestOutput
from pagedjax.sampling_params import SamplingParams
from pagedjax.core.scheduler import Scheduler
from pagedjax.core.sequence import Sequence, SequenceGroup, SequenceStatus

ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_MAX_BANNED = 8          # stop-token bans per row (min_tokens); more raise ValueError
_MIN_PREFILL_BUCKET = 16


_POOL_GRANULE = 64       # device / host page arrays are padded to a multiple of this


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _bucket(n: int, cap: int, minimum: int = 1) -> int:
  """Smallest power of two >= n (at least `minimum`), capped at `cap`."""
  b = max(minimum, 1 << max(0, (n - 1).bit_length()))
  return min(b, cap)


class LLM:
  """A paged-KV serving engine shaped like vLLM's `LLM`.

  Args:
    model: None for the bundled model, or a directory: pagedjax's own format
      (`checkpoint.save_model`) or a Hugging Face checkpoint (see pagedjax/weights/hf.py).
    max_model_len: context limit in tokens (None: the model's, capped at 4096
      for Hugging Face checkpoints).
    num_blocks: KV blocks on the device; None sizes the cache from
      `kv_cache_memory_mb`.
    block_size: tokens per KV block.
    num_host_blocks: blocks in the host swap pool (None: same as num_blocks).
    max_num_seqs: most sequences in one step.
    max_num_batched_tokens: most (unpadded) prompt tokens in one prefill step.
    preemption_mode: "recompute" or "swap" when blocks run out.
    attention_impl: "auto" (pallas on GPU, xla otherwise), "xla", "pallas",
      "pallas_interpret".
    dtype: KV cache and compute dtype, "float32" or "bfloat16".
    kv_cache_memory_mb: KV budget used when num_blocks is None.
    seed: seeds requests that do not set SamplingParams.seed.
  """

  def __init__(self, model: str | None = None, *, max_model_len: int | None = None,
               num_blocks: int | None = None,
               block_size: int = 16, num_host_blocks: int | None = None, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 4096, preemption_mode: str = "recompute",
               attention_impl: str = "auto", dtype: str = "float32",
               kv_cache_memory_mb: float = 64.0, seed: int = 0):
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if block_size < 1 or block_size & (block_size - 1):
      raise ValueError(f"block_size must be a power of two, got {block_size}")
    if attention_impl == "auto":
      attention_impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    self.attention_impl = attention_impl
    cfg, module, self.tokenizer = checkpoint.load(model, max_seq_len=max_model_len)
    self.model_config: ModelConfig = cfg
    self.dtype = jnp.dtype(dtype)
    self.block_size = block_size
    self.max_seq_len = cfg.max_seq_len
    self.max_blocks_per_seq = -(-cfg.max_seq_len // block_size)
    if num_blocks is None:
      bytes_per_block = (2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim
                         * self.dtype.itemsize)
      num_blocks = max(1, int(kv_cache_memory_mb * 2**20) // bytes_per_block)
    if num_blocks < 1:
      raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if max_num_batched_tokens < cfg.max_seq_len:
      # A preempted sequence is recomputed in one prefill: it must fit in one step.
      raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= the model's "
                       f"context ({cfg.max_seq_len})")
    num_host_blocks = num_blocks if num_host_blocks is None else num_host_blocks
    self.max_num_seqs = max_num_seqs
    self.bm = BlockManager(num_blocks, block_size, num_host_blocks)
    self.scheduler = Scheduler(self.bm, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens,
                               preemption_mode=preemption_mode)
    # The page arrays are padded to a multiple of _POOL_GRANULE blocks; the manager only
    # hands out the first num_blocks. Engines of nearby sizes then share every compiled
    # step program (the pool's shape is part of each program), at a cost of < 64 blocks.
    self.kv = kvc.init_kv_cache(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                num_blocks=_round_up(num_blocks, _POOL_GRANULE),
                                block_size=block_size, head_dim=cfg.head_dim, dtype=self.dtype)
    self.host_pool = (kvc.init_host_pool(self.kv, _round_up(num_host_blocks, _POOL_GRANULE))
                      if num_host_blocks else None)
    graphdef, params = nnx.split(module)
    self._params = jax.tree.map(lambda x: x.astype(self.dtype) if x.dtype == jnp.float32 else x,
                                params)
    self._graphdef = graphdef
    self._peak_snapshot = {"used_blocks": 0, "empty_slots": 0, "waste_pct": 0.0}
    self._programs: set[tuple] = set()  # distinct step programs (shapes) this engine ran
    self._request_counter = itertools.count()
    self._arrivals = itertools.count()
    self._seed_rng = np.random.default_rng(seed)
    self._groups: dict[str, SequenceGroup] = {}
    self._stats = {"num_steps": 0, "num_prefill_steps": 0, "num_decode_steps": 0,
                   "num_generated_tokens": 0, "num_prefill_tokens": 0, "step_time_s": 0.0}

  # --------------------------------------------------------------- requests
  def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
      if not prompt:
        raise ValueError("prompt is empty")
      return prompt, self.tokenizer.encode(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
      prompt = prompt["prompt_token_ids"]
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError("prompt_token_ids is empty")
    bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
    if bad:
      raise ValueError(f"token ids outside the vocabulary [0, {self.tokenizer.vocab_size}): {bad[:8]}")
    return None, ids

  def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None) -> str:
    """Queues one request; raises ValueError (naming the value) and changes nothing if bad.

    Args:
      request_id: unique id (None: one is made).
      prompt: a string or a list of token ids.
      params: SamplingParams (default: SamplingParams()).

    Returns:
      The request id.
    """
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    width = params.beam_width if params.use_beam_search else params.n
    if width > self.max_num_seqs:
      raise ValueError(f"a request of {width} sequences (n / beam_width) can never be scheduled "
                       f"with max_num_seqs={self.max_num_seqs}")
    if params.use_beam_search:
      if 2 * params.beam_width > step_lib.NUM_TOP_LOGPROBS:
        raise ValueError(f"beam_width must be <= {step_lib.NUM_TOP_LOGPROBS // 2}, "
                         f"got {params.beam_width}")
      if params.stop or params.stop_token_ids:
        raise ValueError("stop strings / stop_token_ids are not supported with beam search")
    text, ids = self._tokenize(prompt)
    if len(ids) >= self.max_seq_len:
      raise ValueError(f"prompt of {len(ids)} tokens does not leave room to generate within the "
                       f"model's context of {self.max_seq_len} tokens")
    max_stop_ids = _MAX_BANNED - len(self.tokenizer.eos_token_ids)
    if len(params.stop_token_ids) > max_stop_ids:
      raise ValueError(f"at most {max_stop_ids} stop_token_ids, got {len(params.stop_token_ids)}")
    need = min(len(ids) + params.max_tokens, self.max_seq_len)
    need_blocks = -(-need // self.block_size) * width
    if need_blocks > self.bm.num_blocks:
      raise ValueError(f"request needs {need_blocks} KV blocks ({need} tokens x {width} "
                       f"sequences) but "
                       f"the whole cache has {self.bm.num_blocks}: it can never fit")
    request_id = str(next(self._request_counter)) if request_id is None else str(request_id)
    if request_id in self._groups:
      raise ValueError(f"request_id {request_id!r} is already in use")
    seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
    group = SequenceGroup(request_id, ids, params, arrival=next(self._arrivals), seed=seed,
                          prompt=text)
    self._groups[request_id] = group
    self.scheduler.add(group)
    return request_id

  def abort_request(self, request_id: str) -> None:
    if self.scheduler.abort(request_id):
      self._groups.pop(request_id, None)

  def has_unfinished_requests(self) -> bool:
    return self.scheduler.has_unfinished()

  # ------------------------------------------------------------------ steps
  def _is_fresh_fork(self, seq: Sequence) -> bool:
    """A parallel-sampling prompt prefilled once, then forked into n samples."""
    group = self._groups[seq.request_id]
    p = group.params
    return p.n > 1 and not p.use_beam_search and len(group.seqs) == 1 and not seq.output_token_ids

  def _build_plan(self, so) -> tuple[dict, dict, list[tuple[Sequence, int]]]:
    """Pads one scheduled step into bucketed numpy arrays.

    Returns:
      (model plan, sampling arrays, sample rows): sample row r draws from logit row
      samp["row_index"][r] for (sequence, sample index) sample_rows[r]; a fresh
      parallel-sampling prompt has n sample rows on its one logit row.
    """
    rows = len(so.seqs)
    b = _bucket(rows, self.max_num_seqs)
    t = (_bucket(max(len(q) for q in so.query_token_ids), self.max_seq_len, _MIN_PREFILL_BUCKET)
         if so.is_prefill else 1)
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    slot_mapping = np.full((b, t), -1, np.int32)
    block_tables = np.zeros((b, self.max_blocks_per_seq), np.int32)
    context_lens = np.zeros((b,), np.int32)
    query_lens = np.zeros((b,), np.int32)
    cow = np.full((2, b), -1, np.int32)
    sample_rows: list[tuple[Sequence, int]] = []
    row_of_sample: list[int] = []
    for i, (seq, ctx, q) in enumerate(zip(so.seqs, so.context_lens, so.query_token_ids)):
      n = len(q)
      tokens[i, :n] = q
      positions[i, :n] = np.arange(ctx, ctx + n)
      if so.is_prefill:
        slot_mapping[i, :n] = self.bm.slot_mapping(seq.seq_id, ctx, ctx + n)
      else:
        slot_mapping[i, 0] = so.decode_slots[i]
      table = self.bm.block_table(seq.seq_id)
      block_tables[i, :len(table)] = table
      context_lens[i] = ctx
      query_lens[i] = n
      if so.is_prefill and self._is_fresh_fork(seq):
        for j in range(self._groups[seq.request_id].params.n):
          sample_rows.append((seq, j))
          row_of_sample.append(i)
      else:
        sample_rows.append((seq, seq.sample_index))
        row_of_sample.append(i)
    r = _bucket(len(sample_rows), 1 << 30)
    samp = {
        "row_index": np.zeros((r,), np.int32), "seeds": np.zeros((r,), np.int32),
        "sample_indices": np.zeros((r,), np.int32), "out_positions": np.zeros((r,), np.int32),
        "temperature": np.zeros((r,), np.float32), "top_k": np.zeros((r,), np.int32),
        "top_p": np.ones((r,), np.float32), "banned_ids": np.full((r, _MAX_BANNED), -1, np.int32),
    }
    samp["row_index"][:len(row_of_sample)] = row_of_sample
    for k, (seq, j) in enumerate(sample_rows):
      group = self._groups[seq.request_id]
      p = group.params
      samp["seeds"][k] = group.seed
      samp["sample_indices"][k] = j
      samp["out_positions"][k] = len(seq.output_token_ids)
      samp["temperature"][k] = p.temperature
      samp["top_k"][k] = p.top_k
      samp["top_p"][k] = p.top_p
      if len(seq.output_token_ids) < p.min_tokens:
        bans = p.stop_token_ids + ([] if p.ignore_eos else list(self.tokenizer.eos_token_ids))
        samp["banned_ids"][k, :len(bans)] = bans
    if so.cow:
      cow[:, :len(so.cow)] = np.asarray(so.cow, np.int32).T
    plan = {"tokens": tokens, "positions": positions, "slot_mapping": slot_mapping,
            "block_tables": block_tables, "context_lens": context_lens, "query_lens": query_lens,
            "cow_src": cow[0], "cow_dst": cow[1]}
    return plan, samp, sample_rows

  def _apply_swaps(self, so) -> None:
    if so.swap_out:
      dev, host = (np.asarray(x, np.int32) for x in zip(*so.swap_out))
      self.host_pool = kvc.swap_out_blocks(self.kv, self.host_pool, dev, host)
    if so.swap_in:
      host, dev = (np.asarray(x, np.int32) for x in zip(*so.swap_in))
      self.kv = kvc.swap_in_blocks(self.kv, self.host_pool, host, dev)

  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns the outputs of the requests it advanced."""
    return [self._request_output(g) for g in self._step()]

  def _step(self) -> list[SequenceGroup]:
    """One engine step; returns the groups it advanced (finished ones are dropped)."""
    start = time.perf_counter()
    so = self.scheduler.schedule()
    self._apply_swaps(so)
    if not so.seqs:
      return []
    plan, samp, sample_rows = self._build_plan(so)
    self._programs.add((so.is_prefill, plan["tokens"].shape, samp["row_index"].shape))
    self.kv, out = step_lib.step(self._params, self.kv, plan, samp, graphdef=self._graphdef,
                                 impl=self.attention_impl, vocab_size=self.tokenizer.vocab_size)
    tokens, logprobs, top_ids, top_lps = jax.device_get(out)
    touched: dict[str, SequenceGroup] = {}
    beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
    # Fresh parallel samples fork off the prompt's blocks before the prompt's own
    # sequence (sample 0) appends its token, so each child starts from the prompt alone.
    row_seqs = [seq if seq.sample_index == j else
                self._fork(self._groups[seq.request_id], seq, sample_index=j)
                for seq, j in sample_rows]
    for r, seq in enumerate(row_seqs):
      group = self._groups[seq.request_id]
      touched[group.request_id] = group
      if group.params.use_beam_search:
        beam_rows.setdefault(group.request_id, []).append((seq, r))
        continue
      seq.append_token(int(tokens[r]), float(logprobs[r]))
      self._check_stop(seq, group)
      if seq.is_finished:
        self.scheduler.finish_seq(seq)
    for rid, rows in beam_rows.items():
      self._beam_step(self._groups[rid], rows, top_ids, top_lps)
    self.scheduler.free_finished_groups()
    used = self.bm.num_blocks - self.bm.num_free_blocks
    if used > self._peak_snapshot["used_blocks"]:
      # Internal fragmentation at the high-water mark (stats() walks the tables: only
      # when a new peak is reached, so at most num_blocks times per engine).
      m = self.bm.stats()
      self._peak_snapshot = {"used_blocks": used, "empty_slots": m.empty_slots,
                             "waste_pct": 100.0 * m.fragmentation}
    st = self._stats
    st["num_steps"] += 1
    st["num_prefill_steps" if so.is_prefill else "num_decode_steps"] += 1
    st["num_generated_tokens"] += len(sample_rows)
    if so.is_prefill:
      st["num_prefill_tokens"] += sum(len(q) for q in so.query_token_ids)
    st["step_time_s"] += time.perf_counter() - start
    for g in touched.values():
      if g.is_finished:
        del self._groups[g.request_id]
    return list(touched.values())

  def _fork(self, group: SequenceGroup, parent: Sequence, *, sample_index: int) -> Sequence:
    """A new running sequence sharing every block of `parent` (copy-on-write later)."""
    child = parent.fork(sample_index=sample_index)
    self.bm.fork(parent.seq_id, child.seq_id)
    group.seqs.append(child)
    return child

  def _beam_step(self, group: SequenceGroup, rows, top_ids, top_lps) -> None:
    """Advances a beam-search group: keep the best beams, fork / free, maybe finish."""
    p = group.params
    seqs = [seq for seq, _ in rows]
    beams = [(seq.output_token_ids, seq.cumulative_logprob) for seq in seqs]
    eos = () if p.ignore_eos else tuple(self.tokenizer.eos_token_ids)
    nxt, finished = beam_search.select(beams, [top_ids[r] for _, r in rows],
                                       [top_lps[r] for _, r in rows], beam_width=p.beam_width,
                                       eos_ids=eos, length_penalty=p.length_penalty)
    group.hypotheses += finished
    # Dropped beams give their blocks (or references) back before the forks take theirs.
    used = {seqs[b].seq_id for b, _, _ in nxt}
    for seq in seqs:
      if seq.seq_id not in used:
        self.scheduler.finish_seq(seq)
        group.seqs.remove(seq)
    # Forks copy the parent's host tokens before any parent appends its own new token.
    targets, kept = [], set()
    for b, tok, lp in nxt:
      parent = seqs[b]
      if parent.seq_id in kept:
        targets.append((self._fork(group, parent, sample_index=0), tok, lp))
      else:
        kept.add(parent.seq_id)
        targets.append((parent, tok, lp))
    running = []
    for seq, tok, lp in targets:
      seq.append_token(tok, lp)
      if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
        group.hypotheses.append(beam_search.Hypothesis(
            list(seq.output_token_ids), seq.cumulative_logprob, "length",
            beam_search.beam_score(seq.cumulative_logprob, len(seq.output_token_ids),
                                   p.length_penalty)))
        self.scheduler.finish_seq(seq)
        group.seqs.remove(seq)
      else:
        running.append(seq)
    if beam_search.is_done(group.hypotheses,
                           [(s.output_token_ids, s.cumulative_logprob) for s in running],
                           beam_width=p.beam_width, length_penalty=p.length_penalty):
      for seq in running:
        self.scheduler.finish_seq(seq)
        group.seqs.remove(seq)

  def _check_stop(self, seq: Sequence, group: SequenceGroup) -> None:
    p = group.params
    tok = seq.output_token_ids[-1]
    num_out = len(seq.output_token_ids)
    reason, stop_reason = None, None
    if num_out >= p.min_tokens:
      if tok in self.tokenizer.eos_token_ids and not p.ignore_eos:
        reason = "stop"
      elif tok in p.stop_token_ids:
        reason, stop_reason = "stop", tok
      elif p.stop:
        # Detokenize only for requests with stop strings; search where a new match can
        # start (the text this token added, plus the longest stop string before it).
        text = self.tokenizer.decode(seq.output_token_ids)
        tail_from = max(0, seq.num_text_chars - max(len(s) for s in p.stop))
        seq.num_text_chars = len(text)
        for s in p.stop:
          at = text.find(s, tail_from)
          if at >= 0:
            reason, stop_reason, seq.output_text = "stop", s, text[:at]
            break
    if reason is None and (num_out >= p.max_tokens or seq.num_tokens >= self.max_seq_len):
      reason = "length"
    if reason is not None:
      seq.status = SequenceStatus.FINISHED
      seq.finish_reason, seq.stop_reason = reason, stop_reason

  def _text(self, seq: Sequence) -> str:
    # output_text is set only when a stop string cut the text.
    return self.tokenizer.decode(seq.output_token_ids) if seq.output_text is None else seq.output_text

  def _request_output(self, group: SequenceGroup) -> RequestOutput:
    if group.params.use_beam_search:
      if group.is_finished:
        hyps = beam_search.best(group.hypotheses, group.params.n)
      else:  # running beams, best first, as provisional outputs
        hyps = beam_search.best([beam_search.Hypothesis(
            list(s.output_token_ids), s.cumulative_logprob, None,
            beam_search.beam_score(s.cumulative_logprob, len(s.output_token_ids),
                                   group.params.length_penalty)) for s in group.seqs],
            group.params.n)
      outs = [CompletionOutput(index=i, text=self.tokenizer.decode(h.token_ids),
                               token_ids=h.token_ids, cumulative_logprob=h.cumulative_logprob,
                               finish_reason=h.finish_reason) for i, h in enumerate(hyps)]
      return RequestOutput(group.request_id, group.prompt, list(group.prompt_token_ids), outs,
                           group.is_finished)
    outs = [CompletionOutput(index=i, text=self._text(s), token_ids=list(s.output_token_ids),
                             cumulative_logprob=s.cumulative_logprob,
                             logprobs=list(s.output_logprobs) if group.params.logprobs is not None
                             else None,
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for i, s in enumerate(group.seqs)]
    return RequestOutput(group.request_id, group.prompt, list(group.prompt_token_ids), outs,
                         group.is_finished)

  # ---------------------------------------------------------------- offline
  def generate(self, prompts, sampling_params: SamplingParams | TypingSequence[SamplingParams] | None = None,
               *, use_tqdm: bool = False) -> list[RequestOutput]:
    """Generates for every prompt with continuous batching; outputs in prompt order.

    Args:
      prompts: a string, a list of token ids, or a list of either.
      sampling_params: one SamplingParams for all prompts, or one per prompt.
      use_tqdm: show a progress bar over finished requests.

    Returns:
      One RequestOutput per prompt.
    """
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                   and isinstance(prompts[0], (int, np.integer))):
      prompts = [prompts]
    prompts = list(prompts)
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
    while wanted - final.keys():
      for group in self._step():  # outputs are built only for finished requests
        if group.is_finished and group.request_id in wanted:
          final[group.request_id] = self._request_output(group)
          if bar is not None:
            bar.update(1)
    if bar is not None:
      bar.close()
    return [final[r] for r in ids]

  # ------------------------------------------------------------------ stats
  @property
  def num_compilations(self) -> int:
    """Distinct step programs this engine has run; each is compiled at most once per process."""
    return len(self._programs)

  def memory_stats(self) -> dict:
    """Block-pool, preemption, compilation and throughput counters as a flat dict."""
    stats = dict(self.bm.stats().as_dict())
    stats.update(
        num_blocks=self.bm.num_blocks, num_free_blocks=self.bm.num_free_blocks,
        block_size=self.block_size,
        num_preemptions=sum(self.scheduler.num_preemptions.values()),
        num_preemptions_recompute=self.scheduler.num_preemptions["recompute"],
        num_preemptions_swap=self.scheduler.num_preemptions["swap"],
        num_blocks_swapped_out=self.scheduler.num_blocks_swapped["out"],
        num_blocks_swapped_in=self.scheduler.num_blocks_swapped["in"],
        peak_waste_pct=self._peak_snapshot["waste_pct"],
        num_compilations=self.num_compilations, process_step_traces=step_lib.TRACES["step"],
        **self._stats)
    return stats
