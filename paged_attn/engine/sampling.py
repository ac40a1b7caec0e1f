"""Choosing next tokens from logits: sampling with temperature / top-k / top-p, and beam search.

Greedy decoding needs nothing here: the engine takes one batched argmax over every row.

`BeamSearch` follows transformers 5.x `generate(num_beams=k)` with its defaults
(`early_stopping=False`), step for step, so the engine's beams can be checked against it:
  1. add each live beam's running score (sum of log-probabilities) to its next-token
     log-probabilities, and keep the top `max(2, 1 + #stop tokens) * k` candidates of all beams;
  2. a candidate "hits a stop" when its token is a stop (eos) token or it reaches `max_new_tokens`;
  3. the best `k` candidates that did not hit a stop are the next beams;
  4. a candidate ranked within the top `k` that hit a stop becomes a finished hypothesis scored
     `score / generated_length ** length_penalty`, unless no running beam can still beat the
     worst kept hypothesis; the best `k` hypotheses are kept;
  5. the search ends when no improvement is possible or every candidate hit a stop.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch

from paged_attn.engine.request import SamplingParams, Sequence


def sample_tokens(
    logits: torch.Tensor,  # [num_rows, vocab_size] float32
    params: SamplingParams,
    generator: torch.Generator | None,
    num_samples: int,
) -> torch.Tensor:         # [num_rows, num_samples] int64
    """Draw `num_samples` tokens per row from softmax(logits / temperature), top-k, top-p cut."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth_largest = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens more likely than it already cover top_p; the first stays.
        outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
        scaled = scaled.scatter(-1, order, sorted_logits)
    probabilities = scaled.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples, replacement=True, generator=generator)


class BeamContinuation(NamedTuple):
    """A beam of the next step: the live beam it extends, its new token and its running score."""

    parent: int
    token_id: int
    cumulative_logprob: float


class BeamSearch:
    """The finished hypotheses and stopping state of one request's beam search."""

    def __init__(self, params: SamplingParams, stop_token_ids: Collection[int]):
        self.num_beams = params.num_beams
        self.length_penalty = params.length_penalty
        self.max_new_tokens = params.max_new_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.num_candidates = max(2, 1 + len(self.stop_token_ids)) * self.num_beams
        self.hypotheses: list[tuple[float, Sequence]] = []  # best first, at most num_beams
        self.can_improve = True
        self.done = False

    def step(
        self,
        beams: list[Sequence],
        logprobs: torch.Tensor,  # [len(beams), vocab_size] float32, log-softmax of the logits
    ) -> list[BeamContinuation]:
        """Advance every live beam by one token; returns the next beams (empty once done)."""
        vocab_size = logprobs.shape[-1]
        running_scores = torch.tensor([beam.cumulative_logprob for beam in beams],
                                      dtype=logprobs.dtype, device=logprobs.device)
        scores = (logprobs + running_scores[:, None]).flatten()
        top_scores, top_indices = scores.topk(min(self.num_candidates, scores.numel()))
        top_indices = top_indices.tolist()
        generated_length = beams[0].num_generated + 1

        continuations: list[BeamContinuation] = []
        stopped = []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_indices)):
            parent, token_id = divmod(index, vocab_size)
            candidate = BeamContinuation(parent, token_id, score)
            is_stop = token_id in self.stop_token_ids
            if is_stop or generated_length >= self.max_new_tokens:
                stopped.append(candidate)
                if rank < self.num_beams and self.can_improve:
                    self._add_hypothesis(beams[parent], candidate, is_stop, generated_length)
            elif len(continuations) < self.num_beams:
                continuations.append(candidate)

        best_running = continuations[0].cumulative_logprob if continuations else float("-inf")
        self._update_can_improve(best_running, generated_length)
        self.done = not self.can_improve or len(stopped) == len(top_indices)
        return [] if self.done else continuations

    def best(self, count: int) -> list[tuple[float, Sequence]]:
        """The `count` best finished hypotheses as (score, sequence), best first."""
        return self.hypotheses[:count]

    def _add_hypothesis(self, parent: Sequence, candidate: BeamContinuation, is_stop: bool,
                        generated_length: int) -> None:
        finished = parent.branch(seq_id=None)
        finished.token_ids.append(candidate.token_id)
        finished.cumulative_logprob = candidate.cumulative_logprob
        finished.finish_reason = "stop" if is_stop else "length"
        score = candidate.cumulative_logprob / generated_length ** self.length_penalty
        self.hypotheses.append((score, finished))
        self.hypotheses.sort(key=lambda hypothesis: hypothesis[0], reverse=True)
        del self.hypotheses[self.num_beams:]

    def _update_can_improve(self, best_running_score: float, generated_length: int) -> None:
        """Whether the best running beam, scored at today's length, beats the worst kept hypothesis.

        This is transformers' heuristic for `early_stopping=False`; it never turns true again.
        """
        if len(self.hypotheses) < self.num_beams:
            return
        worst_kept = self.hypotheses[-1][0]
        best_possible = best_running_score / generated_length ** self.length_penalty
        self.can_improve = self.can_improve and best_possible > worst_kept
