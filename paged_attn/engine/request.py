"""What the engine is asked for and what it gives back: parameters, requests, sequences, outputs.

A `Request` is one prompt and its `SamplingParams`. It owns one or more `Sequence`s that grow
together: one for greedy or single sampling, `n` parallel samples (forked from the prompt after
its prefill), or `num_beams` beams. The scheduler moves whole requests between its queues, so
sequences that share blocks are always preempted and resumed together.

A live sequence either sits in the KV cache (`seq_id` set), was swapped to the CPU pool
(`swapped` set), or holds no KV at all and will be recomputed from its token ids. Its last token
id is always the one the next forward pass feeds: the cache holds every token before it.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from paged_attn.engine.sampling import BeamSearch


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt.

    * `temperature == 0` is greedy; above 0 samples, optionally restricted by `top_k` (0: all
      tokens) and `top_p` (nucleus). `seed` makes a request's samples reproducible whatever else
      runs beside it.
    * `n` parallel samples share the prompt's blocks (fork + copy-on-write).
    * `num_beams > 1` runs beam search with Hugging Face's defaults (`length_penalty`,
      `early_stopping=False`); `n` is then how many of the best hypotheses to return.
    * Generation stops after `max_new_tokens`, or at an end-of-sequence token (the model's
      `eos_token_id`, plus `stop_token_ids`) unless `ignore_eos`.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.n < 1 or self.num_beams < 1:
            raise ValueError(f"n and num_beams must be >= 1, not {self.n} and {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search is deterministic here: num_beams > 1 needs temperature=0")
        if self.num_beams > 1 and self.n > self.num_beams:
            raise ValueError(f"cannot return {self.n} hypotheses from {self.num_beams} beams")

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def width(self) -> int:
        """How many sequences the request runs at once after its first token."""
        return self.num_beams if self.is_beam_search else self.n


@dataclass(frozen=True)
class CompletionOutput:
    """One finished sample or beam hypothesis.

    `finish_reason` is "stop" (an end-of-sequence token, included in `token_ids`) or "length".
    `cumulative_logprob` sums the model's log-probabilities of `token_ids`; `beam_score` is Hugging
    Face's hypothesis score, `cumulative_logprob / len(token_ids) ** length_penalty` (beams only).
    """

    token_ids: list[int]
    finish_reason: str
    cumulative_logprob: float
    beam_score: float | None = None


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: its completions, best beam first, or samples in finishing order."""

    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids of the first completion."""
        return self.outputs[0].token_ids


@dataclass
class SwappedSequence:
    """Where a swapped-out sequence's KV waits: CPU blocks in logical order (-1: released)."""

    cpu_block_ids: list[int]
    num_tokens: int


@dataclass
class Sequence:
    """One growing token sequence and where its KV lives."""

    token_ids: list[int]
    num_prompt_tokens: int
    cumulative_logprob: float = 0.0
    seq_id: int | None = None
    swapped: SwappedSequence | None = None
    finish_reason: str | None = None

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def branch(self, seq_id: int | None) -> Sequence:
        """A sibling with the same tokens, living in cache sequence `seq_id` (a fork of ours)."""
        return Sequence(list(self.token_ids), self.num_prompt_tokens, self.cumulative_logprob,
                        seq_id=seq_id)

    def completion(self, beam_score: float | None = None) -> CompletionOutput:
        return CompletionOutput(self.generated_token_ids, self.finish_reason or "length",
                                self.cumulative_logprob, beam_score)


class RequestState(enum.Enum):
    WAITING = "waiting"   # needs a prefill: new, or preempted for recomputation
    RUNNING = "running"   # every live sequence is in the KV cache
    SWAPPED = "swapped"   # every live sequence is in the CPU swap pool
    FINISHED = "finished"


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Request:
    """A prompt, its parameters, its live sequences and its finished completions.

    `arrival` orders requests for first-come-first-served scheduling: a lower value is older and
    keeps its blocks longer under memory pressure.
    """

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_token_ids: frozenset[int]  # end-of-sequence ids (unless ignore_eos) and stop_token_ids
    sequences: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    expanded: bool = False  # the first token has been chosen and the request has its full width
    beam_search: BeamSearch | None = None
    arrival: int = field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self):
        if not self.sequences:
            self.sequences = [Sequence(list(self.prompt_token_ids), len(self.prompt_token_ids))]

    @property
    def num_live(self) -> int:
        return len(self.sequences)

    @property
    def width_after_next_token(self) -> int:
        """Sequences this request runs after its next token (its full width once expanded)."""
        return self.num_live if self.expanded else self.params.width
