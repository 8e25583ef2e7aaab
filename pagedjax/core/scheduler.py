"""Scheduler: continuous batching over waiting / running / swapped queues.

Each call to `schedule()` decides one engine step, vLLM-v0 style:
  1. while no group is swapped out, admit waiting groups (FCFS) as one prefill
     step, within `max_num_seqs`, the token budget and the free blocks;
  2. otherwise decode every running group, reserving one slot per sequence;
     when blocks run out, preempt the lowest-priority group (latest arrival),
     whole groups only, by swap (host pool) or recompute (free and requeue);
  3. swapped groups come back (swap-in) when nothing was preempted this step.
The result is a `SchedulerOutput`: the rows to run plus the block ops
(swap-out, swap-in, copy-on-write) the device must apply first, in that order.
This module does not touch device arrays, sample tokens or detokenize.
"""

from __future__ import annotations

import bisect
import dataclasses

from pagedjax.core.block_manager import BlockManager
from pagedjax.core.sequence import Sequence, SequenceGroup, SequenceStatus

PREEMPTION_MODES = ("recompute", "swap")


@dataclasses.dataclass
class SchedulerOutput:
  """One engine step.

  Attributes:
    is_prefill: prefill step (several tokens per row) or decode (one per row).
    seqs: the rows, in order.
    context_lens: tokens already cached per row before this step.
    query_token_ids: the tokens each row computes this step.
    swap_out / swap_in / cow: block copy ops to apply before the step, in
      that order: (device, host), (host, device), (src, dst).
    decode_slots: decode only: the flat KV slot (block * block_size + offset)
      each row writes its token into.
    num_preempted: groups preempted while building this step.
  """

  is_prefill: bool
  seqs: list[Sequence]
  context_lens: list[int]
  query_token_ids: list[list[int]]
  swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  cow: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  decode_slots: list[int] = dataclasses.field(default_factory=list)
  num_preempted: int = 0

  @property
  def is_empty(self) -> bool:
    return not self.seqs and not self.swap_out and not self.swap_in


class Scheduler:
  """Continuous batching with preemption over a `BlockManager`."""

  def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
               max_num_batched_tokens: int, preemption_mode: str = "recompute",
               watermark: float = 0.01):
    if preemption_mode not in PREEMPTION_MODES:
      raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
    if max_num_seqs < 1:
      raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_num_batched_tokens < 1:
      raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    self.bm = block_manager
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.preemption_mode = preemption_mode
    if not 0 <= watermark < 1:
      raise ValueError(f"watermark must be in [0, 1), got {watermark}")
    # Blocks kept free when admitting prompts next to running sequences.
    self.watermark_blocks = int(watermark * block_manager.num_blocks)
    # Each queue is kept sorted by arrival: index 0 has the highest priority.
    self.waiting: list[SequenceGroup] = []
    self.running: list[SequenceGroup] = []
    self.swapped: list[SequenceGroup] = []
    self.num_preemptions = {"recompute": 0, "swap": 0}
    self.num_blocks_swapped = {"out": 0, "in": 0}

  # ---------------------------------------------------------------- queues
  def add(self, group: SequenceGroup) -> None:
    _insort(self.waiting, group)

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running or self.swapped)

  def abort(self, request_id: str) -> bool:
    """Drops a request wherever it is; returns whether it was found."""
    for queue in (self.waiting, self.running, self.swapped):
      for group in queue:
        if group.request_id == request_id:
          queue.remove(group)
          self._release(group)
          return True
    return False

  def finish_seq(self, seq: Sequence) -> None:
    """Frees a finished sequence's blocks; drops its group when all are done."""
    if self.bm.has_seq(seq.seq_id):
      self.bm.free(seq.seq_id)
    seq.status = SequenceStatus.FINISHED

  def free_finished_groups(self) -> list[SequenceGroup]:
    done = [g for g in self.running if g.is_finished]
    if done:
      self.running = [g for g in self.running if not g.is_finished]
    return done

  # ------------------------------------------------------------- scheduling
  def schedule(self) -> SchedulerOutput:
    if not self.swapped:
      out = self._schedule_prefill()
      if out.seqs:
        return out
    return self._schedule_decode()

  def _group_token_cost(self, group: SequenceGroup) -> tuple[int, int, int]:
    """(rows, tokens, blocks) to prefill a waiting group's sequences.

    A fresh group of n samples / beams is prefilled once and then forks, so it
    counts as n rows (it will decode n sequences) but one prompt of blocks.
    """
    seqs = group.seqs_with(SequenceStatus.WAITING)
    tokens = sum(s.num_tokens for s in seqs)
    blocks = sum(-(-s.num_tokens // self.bm.block_size) for s in seqs)
    p = group.params
    fresh = len(group.seqs) == 1 and not group.seqs[0].output_token_ids
    rows = (p.beam_width if p.use_beam_search else p.n) if fresh else len(seqs)
    return rows, tokens, blocks

  def _schedule_prefill(self) -> SchedulerOutput:
    out = SchedulerOutput(True, [], [], [])
    num_running = sum(len(g.seqs_with(SequenceStatus.RUNNING)) for g in self.running)
    free_blocks = self.bm.num_free_blocks
    tokens = 0
    admitted = []
    for group in self.waiting:
      rows, group_tokens, blocks = self._group_token_cost(group)
      # Keep a watermark of free blocks while others run, so admitting a prompt does not
      # force a preemption on the very next decode step (vLLM does the same). An empty
      # engine admits regardless, so a request that fits the cache always makes progress.
      reserve = self.watermark_blocks if num_running else 0
      if (num_running + rows > self.max_num_seqs
          or tokens + group_tokens > self.max_num_batched_tokens
          or blocks > free_blocks - reserve):
        break  # FCFS: never let a later request overtake the head of the queue
      num_running += rows
      tokens += group_tokens
      free_blocks -= blocks
      admitted.append(group)
    for group in admitted:
      self.waiting.remove(group)
      for seq in group.seqs_with(SequenceStatus.WAITING):
        self.bm.allocate(seq.seq_id, seq.num_tokens)
        seq.status = SequenceStatus.RUNNING
        out.seqs.append(seq)
        out.context_lens.append(0)
        out.query_token_ids.append(seq.token_ids)
      _insort(self.running, group)
    return out

  def _blocks_to_append(self, group: SequenceGroup) -> int:
    return sum(self.bm.blocks_to_append(s.seq_id) for s in group.seqs_with(SequenceStatus.RUNNING))

  def _schedule_decode(self) -> SchedulerOutput:
    out = SchedulerOutput(False, [], [], [])
    queue = list(self.running)
    kept: list[SequenceGroup] = []
    reserved = 0  # blocks the groups kept so far will take when they append below
    while queue:
      group = queue.pop(0)
      need = self._blocks_to_append(group)
      while reserved + need > self.bm.num_free_blocks:
        victim = queue.pop() if queue else group
        self._preempt(victim, out)
        if victim is group:
          break
      else:
        kept.append(group)
        reserved += need
    self.running = kept
    if out.num_preempted == 0:
      self._schedule_swap_in(out)
    for group in self.running:
      for seq in group.seqs_with(SequenceStatus.RUNNING):
        ref = self.bm.append_slot(seq.seq_id)
        if ref.cow is not None:
          out.cow.append(ref.cow)
        out.decode_slots.append(ref.block_id * self.bm.block_size + ref.offset)
        out.seqs.append(seq)
        out.context_lens.append(seq.num_tokens - 1)
        out.query_token_ids.append([seq.last_token_id])
    return out

  def _schedule_swap_in(self, out: SchedulerOutput) -> None:
    num_running = sum(len(g.seqs_with(SequenceStatus.RUNNING)) for g in self.running)
    reserve = self._blocks_to_append_all()
    while self.swapped:
      group = self.swapped[0]
      seqs = group.seqs_with(SequenceStatus.SWAPPED)
      ids = [s.seq_id for s in seqs]
      # Room for the group's blocks plus one new block per sequence this step.
      if (num_running + len(seqs) > self.max_num_seqs
          or not self.bm.can_swap_in(ids, extra_blocks=reserve + len(seqs))):
        break
      ops = self.bm.swap_in(ids)
      out.swap_in += ops
      self.num_blocks_swapped["in"] += len(ops)
      for seq in seqs:
        seq.status = SequenceStatus.RUNNING
      num_running += len(seqs)
      reserve += self._blocks_to_append(group)
      self.swapped.pop(0)
      _insort(self.running, group)

  def _blocks_to_append_all(self) -> int:
    return sum(self._blocks_to_append(g) for g in self.running)

  def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
    seqs = group.seqs_with(SequenceStatus.RUNNING)
    ids = [s.seq_id for s in seqs]
    out.num_preempted += 1
    if self.preemption_mode == "swap" and self.bm.can_swap_out(ids):
      ops = self.bm.swap_out(ids)
      out.swap_out += ops
      self.num_blocks_swapped["out"] += len(ops)
      self.num_preemptions["swap"] += 1
      for seq in seqs:
        seq.status = SequenceStatus.SWAPPED
      _insort(self.swapped, group)
      return
    # Recompute: drop the KV, requeue; prompt + generated tokens are prefilled again.
    self.num_preemptions["recompute"] += 1
    for seq in seqs:
      self.bm.free(seq.seq_id)
      seq.status = SequenceStatus.WAITING
    _insort(self.waiting, group)

  def _release(self, group: SequenceGroup) -> None:
    for seq in group.seqs:
      if self.bm.has_seq(seq.seq_id):
        self.bm.free(seq.seq_id)
      seq.status = SequenceStatus.FINISHED
      seq.finish_reason = seq.finish_reason or "abort"


def _insort(queue: list[SequenceGroup], group: SequenceGroup) -> None:
  bisect.insort(queue, group, key=lambda g: g.arrival)
