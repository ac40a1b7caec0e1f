"""The scheduling policy: which requests run in the next forward pass, and who gives way.

Three queues, each ordered by arrival (first come, first served):
  waiting  requests that need a prefill: new ones, and preempted ones that will recompute;
  running  requests whose every live sequence is in the KV cache;
  swapped  preempted requests whose KV waits in the CPU swap pool.

One step is either a prefill or a decode, never a mix (the `"paged_attn"` attention runs the
decode op only when every row has exactly one new token):
  1. swap requests back in, oldest first, while their blocks and their next token fit;
  2. if nothing is left swapped, admit waiting requests, oldest first, while blocks, the token
     budget and `max_num_seqs` allow; a step that admits any is a prefill step for them alone;
  3. otherwise decode every running sequence; when the blocks for one more token per sequence are
     missing, preempt the newest running request (swap it out, or drop its KV to recompute it)
     until they are there.
Admission reserves the blocks that every running sequence needs for its next token, so a new
request does not force a preemption at the very next step. Block counts are upper bounds
(`KVManager`), so a planned step never runs out of blocks inside a forward pass.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from paged_attn.engine.kv_manager import KVManager
from paged_attn.engine.request import Request, RequestState


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class ScheduledStep:
    kind: StepKind
    requests: list[Request]


def _by_arrival(request: Request) -> int:
    return request.arrival


class Scheduler:
    """First-come-first-served continuous batching over one KV cache."""

    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preemptions = 0
        self.num_swap_ins = 0

    # Queues -------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self._enqueue(request, RequestState.WAITING)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_running_sequences(self) -> int:
        return sum(request.num_live for request in self.running)

    def finish(self, request: Request) -> None:
        """Take a finished request off the running queue; its sequences were already freed."""
        self.running.remove(request)
        request.state = RequestState.FINISHED

    def _enqueue(self, request: Request, state: RequestState) -> None:
        queue = {RequestState.WAITING: self.waiting, RequestState.RUNNING: self.running,
                 RequestState.SWAPPED: self.swapped}[state]
        request.state = state
        bisect.insort(queue, request, key=_by_arrival)

    # The policy ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        """Plan the next forward pass; None when there is nothing left to do."""
        if not self.has_unfinished():
            return None
        self._swap_in_what_fits()
        if not self.swapped:
            admitted = self._admit_waiting()
            if admitted:
                return ScheduledStep(StepKind.PREFILL, admitted)
        if not self.running:
            raise RuntimeError("no request fits in the KV cache; give the engine more blocks")
        self._preempt_until_decode_fits()
        return ScheduledStep(StepKind.DECODE, list(self.running))

    def _blocks_reserved_for_decode(self) -> int:
        return sum(self.kv.blocks_to_decode(request) for request in self.running)

    def _swap_in_what_fits(self) -> None:
        reserved = self._blocks_reserved_for_decode()
        while self.swapped:
            request = self.swapped[0]
            needed = reserved + self.kv.blocks_to_swap_in(request)
            fits_blocks = needed <= self.kv.num_allocatable_blocks
            fits_seqs = self.num_running_sequences + request.num_live <= self.max_num_seqs
            if not (fits_blocks and fits_seqs):
                return
            self.swapped.pop(0)
            self.kv.swap_in(request)
            self.num_swap_ins += 1
            self._enqueue(request, RequestState.RUNNING)
            reserved += self.kv.blocks_to_decode(request)

    def _admit_waiting(self) -> list[Request]:
        """Admit the oldest waiting requests that fit; the first one ignores the token budget."""
        admitted: list[Request] = []
        blocks_left = self.kv.num_allocatable_blocks - self._blocks_reserved_for_decode()
        num_sequences = self.num_running_sequences
        num_rows, longest_row = 0, 0
        for request in self.waiting:
            blocks = self.kv.blocks_to_prefill(request) + request.width_after_next_token
            rows = num_rows + request.num_live
            longest = max([longest_row] + [len(seq.token_ids) for seq in request.sequences])
            if (blocks > blocks_left
                    or num_sequences + request.width_after_next_token > self.max_num_seqs
                    or (admitted and rows * longest > self.max_num_batched_tokens)):
                break
            admitted.append(request)
            blocks_left -= blocks
            num_sequences += request.width_after_next_token
            num_rows, longest_row = rows, longest
        del self.waiting[:len(admitted)]
        for request in admitted:
            self._enqueue(request, RequestState.RUNNING)
        return admitted

    def _preempt_until_decode_fits(self) -> None:
        while self._blocks_reserved_for_decode() > self.kv.num_allocatable_blocks:
            if len(self.running) == 1:
                raise RuntimeError("one request outgrew the KV cache: give the engine more blocks")
            victim = self.running.pop()
            self.num_preemptions += 1
            self._enqueue(victim, self.kv.preempt(victim))
