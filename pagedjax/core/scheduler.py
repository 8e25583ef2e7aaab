"""Scheduler: one packed step per call, continuous batching, chunked prefill, preemption.

`schedule()` decides one engine step, as vLLM V1 does, under one token budget
(`max_num_batched_tokens`) and `max_num_seqs`:
  1. running groups, highest priority (earliest arrival) first: a decode-ready group
     feeds one token per sequence; a group still prefilling gets a chunk of what is left
     of the budget after every decode has been counted, so decodes never starve while a
     long prompt is chunked. When blocks run out, the lowest-priority running group not
     yet scheduled is preempted (whole groups), by swap (host pool) or recompute (free
     and requeue; the prompt and outputs are prefilled again in chunks);
  2. then, in arrival order, swapped groups come back (swap-in) and waiting groups are
     admitted (their first chunk), FCFS: the first that does not fit stops admission.
With `num_scheduler_steps` = N > 1 (vLLM's multi-step scheduling), a step in which
nothing waits, nothing is swapped out and every running request is decode-ready runs up
to N decode steps in one device program: each sequence gets the slots of its next N
tokens (fewer where max_tokens, the context or min_tokens' banned window comes first),
and the host checks the tokens one step at a time afterwards, discarding those drawn
after a stop. Beam search (host-side selection each step) and the step that draws an
n > 1 prompt's samples (it forks them) are single steps. The tokens are those of N
single steps.
With async scheduling (the engine's default), `schedule(ahead_of=step)` plans the next
step while `step` still runs: each sequence sampling in it decodes the token in flight
(fed on the device: `ScheduledSeq.feed_row`), as if that token were known; a group whose
token in flight is its last (by length) is left out, and the step falls back to one
scheduled after the results (None) for beams, a fresh n > 1 prompt, multi-step engines,
or when the running groups' blocks would need a preemption.
It emits a `SchedulerOutput` holding everything the device side needs: per scheduled
sequence its tokens, first position, block table and which sample streams to draw,
plus the block copies (swap-out, swap-in, copy-on-write) to run first, in that order.
After the step, `update_from_output` appends the sampled tokens, applies token-level
stop rules, forks parallel samples and beams, and frees what finished. The scheduler
is the only writer of block state. The usual step of a busy engine (nothing waiting or
swapped out, every request one decoding sequence, the blocks free) is built by a
two-pass path and applied in one pass; it is the general path's step (tested step by
step).

Groups of several sequences (n > 1 samples or beams) advance in lockstep: they decode
only when every sequence has all but its last token cached. After a recompute
preemption their sequences are prefilled again, the first one computing the prompt's
full blocks and the others sharing them (`BlockManager.fork_prefix`), so a forked
request never needs more blocks than its shared bound (see `max_blocks_needed`).

Not here: device arrays, sampling, text (stop strings are the engine's, which calls
`finish_seq`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Callable, Collection

from pagedjax.core import beam_search
from pagedjax.intmath import ceil_div, next_power_of_two
from pagedjax.core.block_manager import BlockManager
from pagedjax.core.sequence import Sequence, SequenceGroup, SequenceStatus

PREEMPTION_MODES = ("recompute", "swap")
_RUNNING = SequenceStatus.RUNNING  # (a module global: an enum member's lookup costs ~3x)
# Orca-style reservation baselines of the paper (section 6.1), as admission policies of
# this same engine: a request is admitted only if the blocks reserved for every running
# request plus its own fit the pool, so nothing is ever preempted and memory management
# is the only difference from paging. None: no reservation (vLLM's paging).
RESERVATIONS = (None, "max", "pow2", "oracle")


def max_blocks_needed(prompt_len: int, max_tokens: int, width: int, *, block_size: int,
                      max_model_len: int) -> int:
  """The most device blocks one request can ever hold at once.

  Each of its `width` sequences caches at most min(prompt + max_tokens, max_model_len) - 1
  tokens (the last sampled token is never fed back); the prompt's full blocks are
  shared by all of them (forks share them; after a recompute they are shared again), and
  every sequence may own the rest.
  """
  cached = min(prompt_len + max_tokens, max_model_len) - 1
  shared = prompt_len // block_size
  return shared + width * ceil_div(cached - shared * block_size, block_size)


@dataclasses.dataclass
class ScheduledSeq:
  """One sequence's share of a step.

  Attributes:
    seq, group: the sequence and its request.
    start: tokens already cached (the position of the first token computed now).
    token_ids: the tokens computed this step (a chunk, or the one decode token).
    block_table: the sequence's device blocks after this step's allocation (a copy).
    sample_indices: the sample streams drawn from this sequence's last logits: () when
      the chunk does not reach its last token, (0, .., n-1) for a fresh parallel-sampling
      prompt (forked after the step), (sample_index,) otherwise.
    num_steps: decode steps this sequence runs in a multi-step (1 otherwise); its table
      holds the slots of all of them.
    feed_row: async scheduling: the sample row of the step scheduled before this one
      (still running when this one was scheduled) whose token this decode feeds; -1:
      none. Until that step's results are applied, token_ids holds a placeholder.
  """

  seq: Sequence
  group: SequenceGroup
  start: int
  token_ids: list[int]
  block_table: list[int]
  sample_indices: tuple[int, ...]
  num_steps: int = 1
  feed_row: int = -1


@dataclasses.dataclass
class SchedulerOutput:
  """One engine step: the packed sequences and the block copies to run before them.

  Attributes:
    seqs: scheduled sequences; decodes (one token) first, then prefill chunks.
    swap_out / swap_in / cow: block copy ops, run in that order before the step:
      (device, host), (host, device), (src, dst).
    num_batched_tokens: tokens computed this step (by its first inner step).
    preempted: groups preempted while building this step.
    num_steps: inner decode steps (> 1: a multi-step decode; every seq is a decode).
    distinct_groups: each group has one entry in `seqs` (steps of the steady-decode
      path; `update_from_output` then applies them in one pass).
  """

  seqs: list[ScheduledSeq] = dataclasses.field(default_factory=list)
  swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  cow: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  num_batched_tokens: int = 0
  preempted: list[SequenceGroup] = dataclasses.field(default_factory=list)
  num_steps: int = 1
  # Device blocks registered in the prefix cache while building this step (their K/V
  # is written by it): unregistered again if the step fails.
  cached_blocks: list[int] = dataclasses.field(default_factory=list)
  distinct_groups: bool = False

  @property
  def num_sample_rows(self) -> int:
    return sum(len(s.sample_indices) for s in self.seqs)

  @property
  def groups(self) -> list[SequenceGroup]:
    return list({id(s.group): s.group for s in self.seqs}.values())


@dataclasses.dataclass
class StepResult:
  """What the device returned, per sample row (rows in SchedulerOutput order).

  tokens [R] int, logprobs [R] float, ranks [R] int (1 = most likely), top_ids /
  top_logprobs [R, K]: the K most likely tokens of the row's distribution, best first
  (beam search and logprobs use them; None when no row asked). A multi-step decode's
  arrays have a leading [num_steps] axis (`inner` takes one step's).
  """

  tokens: object
  logprobs: object
  ranks: object
  top_ids: object
  top_logprobs: object

  def inner(self, j: int) -> StepResult:
    """Inner step j of a multi-step decode."""
    top = (None, None) if self.top_ids is None else (self.top_ids[j], self.top_logprobs[j])
    return StepResult(self.tokens[j], self.logprobs[j], self.ranks[j], *top)

  def as_lists(self) -> StepResult:
    """tokens, logprobs and ranks as Python lists (indexing a list per row is several
    times cheaper than converting numpy scalars); the top arrays as they are."""
    return StepResult(*(getattr(x, "tolist", lambda x=x: x)() for x in
                        (self.tokens, self.logprobs, self.ranks)), self.top_ids,
                      self.top_logprobs)


class Scheduler:
  """Continuous batching with chunked prefill and preemption over a `BlockManager`.

  Args:
    block_manager: the block tables (its watermark is used when admitting requests next
      to running ones).
    max_num_seqs: most sequences in one step.
    max_num_batched_tokens: token budget of one step.
    max_model_len: context limit; a sequence reaching it finishes with "length".
    eos_token_ids: ids that end a sequence (unless ignore_eos).
    preemption_mode: "recompute" or "swap".
    enable_chunked_prefill: split prompts across steps; False computes a fresh prompt in
      one step (recompute after preemption is always chunked).
    reservation: None (paging), or an Orca baseline reserving, per sequence at
      admission, the model's context ("max"), the next power of two of prompt +
      max_tokens ("pow2"), or prompt + max_tokens itself ("oracle": the true length when
      requests run to max_tokens); see `reserved_blocks`.
    num_scheduler_steps: most decode steps one scheduled step runs (1: every step is
      scheduled; see the module docstring).
  """

  def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
               max_num_batched_tokens: int, max_model_len: int,
               eos_token_ids: Collection[int] = (), preemption_mode: str = "recompute",
               enable_chunked_prefill: bool = True, reservation: str | None = None,
               num_scheduler_steps: int = 1):
    if reservation not in RESERVATIONS:
      raise ValueError(f"reservation must be one of {RESERVATIONS}, got {reservation!r}")
    self.reservation = reservation
    if preemption_mode not in PREEMPTION_MODES:
      raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
    if num_scheduler_steps < 1:
      raise ValueError(f"num_scheduler_steps must be >= 1, got {num_scheduler_steps}")
    self.num_scheduler_steps = num_scheduler_steps
    if max_num_seqs < 1:
      raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_num_batched_tokens < max_num_seqs:
      raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= "
                       f"max_num_seqs={max_num_seqs}: every running sequence decodes each step")
    self.bm = block_manager
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.max_model_len = max_model_len
    self.eos_token_ids = frozenset(eos_token_ids)
    self.preemption_mode = preemption_mode
    self.enable_chunked_prefill = enable_chunked_prefill
    # Each queue is sorted by arrival: index 0 has the highest priority.
    self.waiting: list[SequenceGroup] = []
    self.running: list[SequenceGroup] = []
    self.swapped: list[SequenceGroup] = []
    self.num_preemptions = {"recompute": 0, "swap": 0}
    self.num_blocks_swapped = {"out": 0, "in": 0}
    self._hits: dict = {}  # seq id -> CachedPrefix, of the latest _chunk_plan
    self._feeds: dict[int, int] = {}  # seq id -> fed sample row, while scheduling ahead
    # Steady decodes take `_schedule_steady_decode` (False: the general path always; the
    # tests compare the two).
    self.steady_decode_path = True

  # ---------------------------------------------------------------- queues
  def add(self, group: SequenceGroup) -> None:
    _insort(self.waiting, group)

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running or self.swapped)

  def find(self, request_id: str) -> SequenceGroup | None:
    for queue in (self.waiting, self.running, self.swapped):
      for group in queue:
        if group.request_id == request_id:
          return group
    return None

  def abort(self, request_id: str, reason: str = "abort") -> SequenceGroup | None:
    """Drops a request wherever it is, freeing its blocks; returns it (None if unknown)."""
    group = self.find(request_id)
    if group is not None:
      self.finish_group(group, reason)
    return group

  def finish_group(self, group: SequenceGroup, reason: str) -> None:
    """Ends every live sequence of a group (e.g. abort, error) and removes the group."""
    for queue in (self.waiting, self.running, self.swapped):
      if group in queue:
        queue.remove(group)
    for seq in group.seqs:
      if not seq.is_finished:
        self.finish_seq(seq, reason)

  def finish_seq(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
    """Frees a sequence's blocks (either pool) and marks it finished."""
    if self.bm.has_seq(seq.seq_id):
      self.bm.free(seq.seq_id)
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason, seq.stop_reason = reason, stop_reason

  def drop_finished(self) -> None:
    """Removes finished groups from the running queue."""
    if any(g.is_finished for g in self.running):
      self.running = [g for g in self.running if not g.is_finished]

  @property
  def num_running_seqs(self) -> int:
    return sum(g.num_seats for g in self.running)

  # ------------------------------------------------------------- scheduling
  def schedule(self, ahead_of: SchedulerOutput | None = None) -> SchedulerOutput | None:
    """The next step (see the module docstring).

    ahead_of: async scheduling: a step whose results are not back yet (its device
      program is running). The step returned runs after it, each sequence that samples
      in `ahead_of` decoding the token drawn there (`ScheduledSeq.feed_row`; the token
      reaches the device without the host). Returns None when the next step cannot be
      scheduled this way: beams or a fresh n > 1 prompt (they fork on the host), a
      multi-step engine, or too few free blocks without preempting; the caller then
      applies `ahead_of`'s results and schedules normally.
    """
    self.bm.newly_cached = []
    skip: set[int] = set()
    if ahead_of is None:
      self._feeds = {}
      out = self._schedule_multi_step()
      if out is not None:
        return out
    else:
      ahead = self._feeds_of(ahead_of)
      if ahead is None:
        return None
      self._feeds, skip = ahead
    if self.steady_decode_path:
      out = self._schedule_steady_decode(skip)
      if out is not None:
        return out
    out = SchedulerOutput()
    for group in self.running:  # before counting decodes: this can make a group decode-ready
      self._fork_waiting_prefixes(group)
    live = {id(g): g.live_seqs for g in self.running}
    ready = {id(g) for g in self.running if id(g) not in skip and self._decode_ready(live[id(g)])}
    decode_tokens = sum(len(live[gid]) for gid in ready)
    budget = self.max_num_batched_tokens - decode_tokens  # what prefill chunks may use
    queue = collections.deque(g for g in self.running if id(g) not in skip)
    if ahead_of is not None and self._running_need(queue, ready, budget, live) > \
        self.bm.num_free_blocks:
      return None  # preemption decides on known tokens: after ahead_of's results
    scheduled: list[SequenceGroup] = []
    chunks: list[ScheduledSeq] = []
    decodes: list[ScheduledSeq] = []
    short = False  # (async) a group did not fit after all: schedule no more
    bm = self.bm
    while queue:
      group = queue.popleft()
      decode = id(group) in ready
      if decode:
        lv = live[id(group)]
        if len(lv) == 1 and bm.append_slot_in_place(lv[0].seq_id):  # most decodes
          scheduled.append(group)
          decodes.append(self._row(group, lv[0], 1))
          continue
        plan = [(s, 1) for s in lv]
      else:
        plan = self._chunk_plan(group, budget)
      need = self._blocks_needed(plan)
      if ahead_of is not None and need > self.bm.num_free_blocks:
        short = True
        break
      while need > self.bm.num_free_blocks:
        victim = queue.pop() if queue else group
        self._preempt(victim, out)
        if victim is group:
          break
      else:
        scheduled.append(group)
        rows = self._allocate(group, plan, out)
        if decode:
          decodes += rows
        else:
          chunks += rows
          budget -= sum(n for _, n in plan)
    placed = {id(g) for g in scheduled} | {id(g) for g in out.preempted}
    self.running = scheduled + [g for g in self.running if id(g) not in placed]
    self.running.sort(key=lambda g: g.arrival)
    if not out.preempted and not short:
      budget = self._admit(out, budget, decodes, chunks)
    self._feeds = {}
    out.seqs = decodes + chunks
    out.num_batched_tokens = sum(len(s.token_ids) for s in out.seqs)
    out.cached_blocks, self.bm.newly_cached = self.bm.newly_cached, []
    if ahead_of is not None and not out.seqs and not out.swap_in:
      return None
    return out

  def _schedule_steady_decode(self, skip: set[int]) -> SchedulerOutput | None:
    """The usual step of a busy engine, in two passes over the running groups (the
    general path below makes a dozen): nothing waits or is swapped out, every running
    request is one running sequence, those not in `skip` are decode-ready, and the
    blocks their tokens take are free with no copy-on-write (no preemption). Returns the
    general path's output for such a step (`tests/test_scheduler_steady.py` compares
    them step by step), or None, having changed nothing, when the step is not one."""
    if self.waiting or self.swapped or not self.running:
      return None
    feeds = self._feeds
    plan: list[tuple[SequenceGroup, Sequence]] = []
    for group in self.running:
      seqs = group.seqs
      if len(seqs) != 1 or seqs[0].status is not _RUNNING:
        return None
      if id(group) in skip:
        continue
      seq = seqs[0]
      c, n = seq.num_computed_tokens, seq.num_tokens
      if not (c == n - 1 or (c == n and seq.seq_id in feeds)):
        return None  # a chunk to compute
      plan.append((group, seq))
    bm = self.bm
    if not plan:
      return None
    need = bm.decode_block_need([seq.seq_id for _, seq in plan])
    if need is None or need > bm.num_free_blocks:
      return None
    out = SchedulerOutput(distinct_groups=True)
    rows = out.seqs
    for group, seq in plan:  # (one sequence at a time, as the general path: same cache)
      rows.append(self._row(group, seq, 1, bm.append_decode_slot(seq.seq_id)))
    self._feeds = {}
    out.num_batched_tokens = len(rows)
    out.cached_blocks, bm.newly_cached = bm.newly_cached, []
    return out

  def _feeds_of(self, ahead_of: SchedulerOutput) -> tuple[dict[int, int], set[int]] | None:
    """For a step scheduled ahead of `ahead_of`: {seq id: sample row} of the sequences
    whose next token is in flight, and the groups (ids) that this token ends by length
    (they are not scheduled again); None when the step cannot be scheduled ahead.
    Marks `ahead_of`'s tokens computed (as its results will)."""
    if self.num_scheduler_steps > 1 or ahead_of.num_steps > 1 or not ahead_of.seqs:
      return None
    if any(g.params.use_beam_search for g in self.running):
      return None
    feeds: dict[int, int] = {}
    skip: set[int] = set()
    r = 0
    for s in ahead_of.seqs:
      if len(s.sample_indices) > 1:
        return None  # a fresh n > 1 prompt: its samples fork on the host
      seq = s.seq
      seq.num_computed_tokens = s.start + len(s.token_ids)
      if s.sample_indices:
        if not seq.is_finished:
          feeds[seq.seq_id] = r
          if (len(seq.output_token_ids) + 1 >= s.group.params.max_tokens
              or seq.num_tokens + 1 >= self.max_model_len):
            skip.add(id(s.group))  # the token in flight is its last
        r += 1
    return feeds, skip

  def _decode_ready(self, live: list[Sequence]) -> bool:
    """Whether a group (its live sequences) decodes: every sequence has all but its last
    token cached, counting a token in flight (async scheduling) as known."""
    feeds = self._feeds
    return bool(live) and all(
        s.num_computed_tokens == s.num_tokens - 1
        or (s.seq_id in feeds and s.num_computed_tokens == s.num_tokens) for s in live)

  def _running_need(self, groups, ready: set[int], budget: int, live: dict) -> int:
    """Free blocks the running groups take this step (decodes, then chunks within the
    budget, as the scheduling loop plans them)."""
    bm = self.bm
    need = bm.blocks_to_append_all((s.seq_id, 1) for g in groups if id(g) in ready
                                   for s in live[id(g)])
    for g in groups:
      if id(g) not in ready:
        plan = self._chunk_plan(g, budget)
        need += self._blocks_needed(plan)
        budget -= sum(n for _, n in plan)
    return need

  def _schedule_multi_step(self) -> SchedulerOutput | None:
    """A multi-step decode of every running sequence, or None when this step is not one
    (the module docstring says when). Each sequence runs as many of the N steps as it
    can before max_tokens or the context ends it and without crossing the start or end
    of min_tokens' banned window (its bans are set once per step); its blocks are
    reserved for all of them, with no preemption: without the blocks, a single step."""
    n = self.num_scheduler_steps
    if n == 1 or self.waiting or self.swapped or not self.running:
      return None
    plan = []
    for group in self.running:
      p = group.params
      # Beams select on the host every step; an n > 1 prompt's next step draws its n
      # samples and forks them (one row each: single steps).
      if p.use_beam_search or not group.is_decode_ready() or (group.width > 1
                                                              and not group.forked):
        return None
      for seq in group.live_seqs:
        num_out = len(seq.output_token_ids)
        k = min(n, p.max_tokens - num_out, self.max_model_len - seq.num_tokens)
        if num_out < p.min_tokens:  # the banned window (engine's DeviceSampling) ends here
          k = min(k, p.min_tokens - num_out)
        plan.append((group, seq, max(k, 1)))
    if max(k for _, _, k in plan) == 1 or self.bm.blocks_to_append_all(
        (s.seq_id, k) for _, s, k in plan) > self.bm.num_free_blocks:
      return None  # one step left for everyone, or not the blocks for all of them
    out = SchedulerOutput(num_steps=max(k for _, _, k in plan))
    for group, seq, k in plan:
      op = self.bm.append_slots(seq.seq_id, k)
      if op is not None:
        out.cow.append(op)
      start = seq.num_computed_tokens
      # Only the blocks whose tokens are known now; the rest as the tokens arrive.
      self.bm.cache_full_blocks(seq.seq_id, seq.token_slice, upto=start + 1)
      out.seqs.append(ScheduledSeq(seq, group, start, seq.token_slice(start, start + 1),
                                   self.bm.block_table(seq.seq_id), (seq.sample_index,), k))
    out.num_batched_tokens = len(out.seqs)
    out.cached_blocks, self.bm.newly_cached = self.bm.newly_cached, []
    return out

  def _blocks_needed(self, plan) -> int:
    """Free device blocks a plan takes: appends of resident sequences, and allocations
    (past any prefix-cache hit) of sequences without blocks."""
    bm = self.bm
    if len(plan) == 1 and bm.has_seq(plan[0][0].seq_id):  # most groups: one sequence
      return bm.blocks_to_append(plan[0][0].seq_id, plan[0][1])
    resident = [(s.seq_id, n) for s, n in plan if bm.has_seq(s.seq_id)]
    need = bm.blocks_to_append_all(resident) if resident else 0
    for s, n in plan:
      if not bm.has_seq(s.seq_id):
        hit = self._hits.get(s.seq_id)
        computed = len(hit.blocks) * bm.block_size if hit else 0
        need += bm.blocks_to_allocate(computed + n, hit)
    return need

  def _prefix_hit(self, group: SequenceGroup, seq: Sequence, hold_back: int):
    """The prefix-cache hit for a sequence about to get its first blocks, leaving at
    least one token (past the hold-back) to compute: its logits are needed."""
    tokens = seq.token_slice(0, seq.num_tokens)
    max_blocks = (seq.num_tokens - 1 - hold_back) // self.bm.block_size
    return self.bm.lookup_prefix(tokens, cache_salt=group.cache_salt, max_blocks=max_blocks)

  def _chunk_plan(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int]]:
    """(sequence, tokens) for a prefilling group within `budget` tokens.

    A single sequence may run to its last token (and sample); sequences of a forked
    group stop one short, so that they all decode together afterwards. Sequences still
    waiting for a shared prefix get nothing until the first has computed it.
    """
    plan = []
    live = group.live_seqs
    hold_back = 1 if len(live) > 1 else 0
    self._hits = {}
    for seq in live:
      if group.forked and seq.status is SequenceStatus.WAITING:
        continue  # waits to share the leader's prefix (see _fork_waiting_prefixes)
      computed = seq.num_computed_tokens
      if self.bm.enable_caching and not self.bm.has_seq(seq.seq_id):
        hit = self._hits[seq.seq_id] = self._prefix_hit(group, seq, hold_back)
        computed = len(hit.blocks) * self.bm.block_size
      left = seq.num_tokens - hold_back - computed
      n = min(left, budget)
      if n > 0:
        plan.append((seq, n))
        budget -= n
    return plan

  def _allocate(self, group: SequenceGroup, plan, out: SchedulerOutput) -> list[ScheduledSeq]:
    rows = []
    for seq, n in plan:
      if not self.bm.has_seq(seq.seq_id):
        hit = self._hits.get(seq.seq_id)
        computed = len(hit.blocks) * self.bm.block_size if hit else 0
        self.bm.allocate(seq.seq_id, computed + n, prefix=hit, cache_salt=group.cache_salt)
        if self.bm.enable_caching:
          self.bm.record_prefix_lookup(seq.num_tokens, computed)
        seq.num_computed_tokens = computed
        seq.status = SequenceStatus.RUNNING
      else:
        op = self.bm.append_slots(seq.seq_id, n)
        if op is not None:
          out.cow.append(op)
      rows.append(self._row(group, seq, n))
    return rows

  def _row(self, group: SequenceGroup, seq: Sequence, n: int,
           table: list[int] | None = None) -> ScheduledSeq:
    """The ScheduledSeq of `n` tokens of `seq` whose slots are reserved (`table`: a copy
    of its block table, if the caller has one)."""
    if table is None:
      table = self.bm.block_table(seq.seq_id)
    start = seq.num_computed_tokens
    end = start + n
    feed_row = self._feeds.get(seq.seq_id, -1)
    if feed_row >= 0:
      # Its blocks of known tokens (the first `start`) are registered already: when the
      # results before the step it is fed from were applied (`_learn_fed_tokens` of that
      # step's fed row) or when that step's row was built (here). Its own token is hashed
      # once it arrives.
      return ScheduledSeq(seq, group, start, [0], table, (seq.sample_index,),
                          feed_row=feed_row)
    self.bm.cache_full_blocks(seq.seq_id, seq.token_slice, upto=seq.num_tokens)
    if end < seq.num_tokens:
      samples: tuple[int, ...] = ()
    elif not group.forked and group.width > 1 and not group.params.use_beam_search:
      samples = tuple(range(group.width))  # the prompt's n samples, forked after the step
    else:
      samples = (seq.sample_index,)
    return ScheduledSeq(seq, group, start, seq.token_slice(start, end), table, samples)

  def reserved_blocks(self, prompt_len: int, max_tokens: int, width: int) -> int:
    """Blocks the reservation policy sets aside for a request (0 without one): width x
    ceil(reserved tokens / block_size), nothing shared (Orca has no paging)."""
    if self.reservation is None:
      return 0
    total = min(prompt_len + max_tokens, self.max_model_len)
    if self.reservation == "max":
      total = self.max_model_len
    elif self.reservation == "pow2":
      total = min(next_power_of_two(total), self.max_model_len)
    return width * ceil_div(total, self.bm.block_size)

  def _reserved(self, group: SequenceGroup) -> int:
    return self.reserved_blocks(len(group.prompt_token_ids), group.params.max_tokens,
                                group.width)

  def _admit(self, out: SchedulerOutput, budget: int, decodes: list, chunks: list) -> int:
    """Swap-in and admission in arrival order (FCFS); returns the budget left."""
    if not self.swapped and not self.waiting:
      return budget
    seats = self.num_running_seqs
    reserved = sum(self._reserved(g) for g in self.running)
    while self.swapped or self.waiting:
      swapped_first = self.swapped and (not self.waiting
                                        or self.swapped[0].arrival < self.waiting[0].arrival)
      group = self.swapped[0] if swapped_first else self.waiting[0]
      if seats + group.num_seats > self.max_num_seqs:
        break
      if swapped_first:
        seqs = group.seqs_with(SequenceStatus.SWAPPED)
        if len(seqs) > budget or not self.bm.can_swap_in(
            [s.seq_id for s in seqs], append=1, watermark=bool(self.running)):
          break
        ops = self.bm.swap_in([s.seq_id for s in seqs])
        out.swap_in += ops
        self.num_blocks_swapped["in"] += len(ops)
        for seq in seqs:
          seq.status = SequenceStatus.RUNNING
        self.swapped.pop(0)
        # Swapped groups are decode-ready: they decode in this very step.
        decodes += self._allocate(group, [(s, 1) for s in seqs], out)
        budget -= len(seqs)
      else:
        self._fork_waiting_prefixes(group)
        plan = self._chunk_plan(group, budget)
        fresh = not group.forked and group.seqs[0].num_computed_tokens == 0 \
            and not group.seqs[0].output_token_ids
        hit = self._hits.get(group.seqs[0].seq_id)
        cached = len(hit.blocks) * self.bm.block_size if hit else 0
        if not plan or (fresh and not self.enable_chunked_prefill
                        and plan[0][1] < group.seqs[0].num_tokens - cached):
          break
        need = self._blocks_needed(plan)
        reserve = self.bm.watermark_blocks if self.running else 0
        if need > self.bm.num_free_blocks - reserve:
          break
        if self.reservation is not None:
          if reserved + self._reserved(group) > self.bm.num_blocks:
            break
          reserved += self._reserved(group)
        self.waiting.pop(0)
        chunks += self._allocate(group, plan, out)
        budget -= sum(n for _, n in plan)
      seats += group.num_seats
      _insort(self.running, group)
    return budget

  def _fork_waiting_prefixes(self, group: SequenceGroup) -> None:
    """Recomputed forked group: sequences share the prompt's full blocks of the first."""
    waiting = group.seqs_with(SequenceStatus.WAITING)
    if not waiting or not group.forked:
      return
    leader = group.live_seqs[0]
    shared = group.shared_prefix_tokens
    if leader.status is SequenceStatus.WAITING:
      leader.status = SequenceStatus.RUNNING  # schedulable; blocks come with its chunk
      waiting = waiting[1:]
    if not shared:
      for seq in waiting:
        seq.status = SequenceStatus.RUNNING
      return
    if not self.bm.has_seq(leader.seq_id) or leader.num_computed_tokens < shared:
      return
    for seq in waiting:
      self.bm.fork_prefix(leader.seq_id, seq.seq_id, shared // self.bm.block_size)
      seq.num_computed_tokens = shared
      seq.status = SequenceStatus.RUNNING

  def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
    out.preempted.append(group)
    if group in self.running:
      self.running.remove(group)
    live = group.live_seqs
    resident = [s for s in live if self.bm.has_seq(s.seq_id)]
    ids = [s.seq_id for s in resident]
    if (self.preemption_mode == "swap" and group.is_decode_ready()
        and len(resident) == len(live) and self.bm.can_swap_out(ids)):
      ops = self.bm.swap_out(ids)
      out.swap_out += ops
      self.num_blocks_swapped["out"] += len(ops)
      self.num_preemptions["swap"] += 1
      for seq in live:
        seq.status = SequenceStatus.SWAPPED
      _insort(self.swapped, group)
      return
    self.num_preemptions["recompute"] += 1
    self.recompute(group)

  def recompute(self, group: SequenceGroup) -> None:
    """Drops a group's KV (either pool) and requeues it: prompt + outputs are prefilled
    again, in chunks; a forked group shares its prompt's full blocks again."""
    for queue in (self.running, self.swapped, self.waiting):
      if group in queue:
        queue.remove(group)
    live = group.live_seqs
    for seq in live:
      if self.bm.has_seq(seq.seq_id):
        self.bm.free(seq.seq_id)
      seq.reset_for_recompute()
    if group.forked and len(live) > 1:
      group.shared_prefix_tokens = (len(group.prompt_token_ids) // self.bm.block_size
                                    * self.bm.block_size)
    _insort(self.waiting, group)

  # ---------------------------------------------------------- after a step
  def update_from_output(self, out: SchedulerOutput, result: StepResult, *,
                         on_error: Callable[[SequenceGroup, Exception], None],
                         after_token: Callable[[SequenceGroup], None] | None = None,
                         ahead: SchedulerOutput | None = None) -> list[SequenceGroup]:
    """Applies a step's results; returns the groups it advanced.

    Each group is processed on its own: an exception while appending, forking or
    selecting beams for one request (or in `after_token`) ends that request
    (`on_error(group, exc)`, after its blocks are freed) and leaves the others untouched.
    `after_token(group)` runs after each new token of the group's sequences (once per
    inner step of a multi-step decode): the engine's stop strings, which may end them.
    Rows of sequences that finished since the step was scheduled (a stop found while it
    ran ahead, an abort) are dropped. `ahead`: the step scheduled ahead of this one
    (`schedule(ahead_of=out)`), already running: its fed decodes learn their tokens here,
    and the blocks those tokens fill enter the prefix cache (as `ahead`'s blocks).
    """
    if out.num_steps > 1:
      groups = self._update_multi_step(out, result, on_error, after_token)
    else:
      groups = self._update_single_step(out, result, on_error, after_token)
    if ahead is not None:
      self._learn_fed_tokens(ahead)
    return groups

  def _learn_fed_tokens(self, ahead: SchedulerOutput) -> None:
    self.bm.newly_cached = []
    bs = self.bm.block_size
    for s in ahead.seqs:
      if s.feed_row >= 0 and not s.seq.is_finished:
        seq = s.seq
        s.token_ids = [seq.output_token_ids[-1]]
        if (s.start + 1) % bs == 0:  # (the first `start` tokens' blocks are registered)
          self.bm.cache_full_blocks(seq.seq_id, seq.token_slice, upto=s.start + 1)
    ahead.cached_blocks += self.bm.newly_cached
    self.bm.newly_cached = []

  def _update_single_step(self, out: SchedulerOutput, result: StepResult, on_error,
                          after_token) -> list[SequenceGroup]:
    result = result.as_lists()
    if out.distinct_groups:
      return self._update_distinct_groups(out, result, on_error, after_token)
    rows_of: dict[int, list[tuple[ScheduledSeq, int]]] = {}
    groups: dict[int, SequenceGroup] = {}
    r = 0
    for s in out.seqs:
      s.seq.num_computed_tokens = s.start + len(s.token_ids)
      groups[id(s.group)] = s.group
      for j in s.sample_indices:
        if not s.seq.is_finished:
          rows_of.setdefault(id(s.group), []).append((s, r))
        r += 1
    # Groups that ended since the step was scheduled (aborted; stopped while it ran
    # ahead) have nothing to apply, and are not reported again.
    groups = {gid: g for gid, g in groups.items() if not g.is_finished}
    for gid, group in groups.items():
      try:
        rows = rows_of.get(gid)
        if rows:
          if group.params.use_beam_search:
            self._beam_step(group, rows, result)
          else:
            self._sample_step(group, rows, result)
          if after_token is not None:
            after_token(group)
      except Exception as e:  # noqa: BLE001  (isolation: one request's failure is its own)
        self.finish_group(group, "error")
        on_error(group, e)
    self.drop_finished()
    return list(groups.values())

  def _update_distinct_groups(self, out: SchedulerOutput, result: StepResult, on_error,
                              after_token) -> list[SequenceGroup]:
    """`_update_single_step` of a step whose groups each have one entry (one pass)."""
    groups = []
    r = 0
    for s in out.seqs:
      seq, group = s.seq, s.group
      seq.num_computed_tokens = s.start + len(s.token_ids)
      first, k = r, len(s.sample_indices)
      r += k
      if group.is_finished:
        continue  # (as in _update_single_step: not reported again)
      groups.append(group)
      if not k or seq.is_finished:
        continue
      try:
        rows = ((s, first),) if k == 1 else [(s, first + j) for j in range(k)]
        if group.params.use_beam_search:
          self._beam_step(group, rows, result)
        else:
          self._sample_step(group, rows, result)  # (its one-sample case: most rows)
        if after_token is not None:
          after_token(group)
      except Exception as e:  # noqa: BLE001  (isolation, as in _update_single_step)
        self.finish_group(group, "error")
        on_error(group, e)
    self.drop_finished()
    return groups

  def _update_multi_step(self, out: SchedulerOutput, result: StepResult, on_error,
                         after_token) -> list[SequenceGroup]:
    """A multi-step decode's results, one inner step at a time, as single steps would
    have applied them: a sequence that stops keeps no later token (its blocks, reserved
    for all of its steps, are freed with it). Blocks its new tokens fill are registered
    in the prefix cache as each fills."""
    rows_of: dict[int, tuple[SequenceGroup, list[tuple[ScheduledSeq, int]]]] = {}
    for r, s in enumerate(out.seqs):
      rows_of.setdefault(id(s.group), (s.group, []))[1].append((s, r))
    bs, caching = self.bm.block_size, self.bm.enable_caching
    for j in range(out.num_steps):
      res = result.inner(j).as_lists()
      for group, rows in rows_of.values():
        live = [(s, r) for s, r in rows if j < s.num_steps and not s.seq.is_finished]
        if not live:
          continue
        try:
          for s, _ in live:
            seq = s.seq
            seq.num_computed_tokens = n = s.start + j + 1
            if caching and n % bs == 0:
              self.bm.cache_full_blocks(seq.seq_id, seq.token_slice, upto=n)
          self._sample_step(group, live, res)
          if after_token is not None:
            after_token(group)
        except Exception as e:  # noqa: BLE001  (isolation, as in update_from_output)
          self.finish_group(group, "error")
          on_error(group, e)
    self.drop_finished()
    return [group for group, _ in rows_of.values()]

  def _sample_step(self, group: SequenceGroup, rows, result: StepResult) -> None:
    want_top = group.params.logprobs is not None
    if group.forked and len(rows) == 1 and not want_top:  # most groups, every step
      (s, r), = rows
      s.seq.append_token(int(result.tokens[r]), float(result.logprobs[r]))
      self._check_stop(s.seq, group)
      return
    # A fresh prompt's samples fork off its blocks before sample 0 appends its token,
    # so each child starts from the prompt alone.
    targets = [(s.seq, r) for s, r in rows]
    if not group.forked:
      leader = group.seqs[0]
      children = [self._fork(group, leader, sample_index=k) for k in range(1, group.width)]
      targets = [(leader, rows[0][1])] + [(c, r) for c, (_, r) in zip(children, rows[1:])]
      group.forked = True
    for seq, r in targets:
      top = _top(result, r, group.params.logprobs) if want_top else None
      seq.append_token(int(result.tokens[r]), float(result.logprobs[r]), top)
      if want_top:
        seq.output_ranks.append(int(result.ranks[r]))
      self._check_stop(seq, group)

  def _fork(self, group: SequenceGroup, parent: Sequence, *, sample_index: int) -> Sequence:
    """A new running sequence sharing every block of `parent` (copy-on-write later)."""
    child = parent.fork(sample_index=sample_index)
    self.bm.fork(parent.seq_id, child.seq_id)
    group.seqs.append(child)
    return child

  def _check_stop(self, seq: Sequence, group: SequenceGroup) -> None:
    """Token-level stop rules; stop strings are checked by the engine on the text."""
    p = group.params
    tok = seq.output_token_ids[-1]
    num_out = len(seq.output_token_ids)
    if num_out >= p.min_tokens:
      if tok in self.eos_token_ids and not p.ignore_eos:
        return self.finish_seq(seq, "stop")
      if tok in p.stop_token_ids:
        return self.finish_seq(seq, "stop", tok)
    if num_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
      self.finish_seq(seq, "length")

  def _beam_step(self, group: SequenceGroup, rows, result: StepResult) -> None:
    """Advances a beam-search group: keep the best beams, fork / free, maybe finish."""
    p = group.params
    group.forked = True
    seqs = [s.seq for s, _ in rows]
    beams = [(seq.output_token_ids, seq.cumulative_logprob) for seq in seqs]
    eos = () if p.ignore_eos else tuple(self.eos_token_ids)
    nxt, finished = beam_search.select(
        beams, [result.top_ids[r] for _, r in rows], [result.top_logprobs[r] for _, r in rows],
        beam_width=p.beam_width, eos_ids=eos, length_penalty=p.length_penalty)
    group.hypotheses += finished
    # Dropped beams give their blocks (or references) back before the forks take theirs.
    used = {seqs[b].seq_id for b, _, _ in nxt}
    for seq in seqs:
      if seq.seq_id not in used:
        self.finish_seq(seq, "beam")
        group.seqs.remove(seq)
    # Forks copy the parent's tokens before any parent appends its own new token.
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
      if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
        group.hypotheses.append(beam_search.Hypothesis(
            list(seq.output_token_ids), seq.cumulative_logprob, "length",
            beam_search.beam_score(seq.cumulative_logprob, len(seq.output_token_ids),
                                   p.length_penalty)))
        self.finish_seq(seq, "length")
        group.seqs.remove(seq)
      else:
        running.append(seq)
    if beam_search.is_done(group.hypotheses,
                           [(s.output_token_ids, s.cumulative_logprob) for s in running],
                           beam_width=p.beam_width, length_penalty=p.length_penalty):
      for seq in running:
        self.finish_seq(seq, "done")
        group.seqs.remove(seq)


def _top(result: StepResult, r: int, k: int) -> list[tuple[int, float]]:
  if k == 0:  # logprobs=0: the sampled token's logprob only (no top arrays were fetched)
    return []
  return [(int(i), float(lp)) for i, lp in zip(result.top_ids[r][:k], result.top_logprobs[r][:k])]


def _insort(queue: list[SequenceGroup], group: SequenceGroup) -> None:
  bisect.insort(queue, group, key=lambda g: g.arrival)
