"""`Engine`: continuous-batching generation for a Hugging Face causal LM over a paged KV cache.

Each `step()` asks the scheduler for one forward pass, runs it, and acts on its logits:
  * prefill: each admitted sequence enters the cache (on its cached prefix, when prefix caching
    holds one) and its remaining tokens run in one left-padded batch, one row per sequence;
  * decode: the last token of every running sequence runs in a batch of single tokens, so the
    `paged_attention` op reads every row's history from its blocks; explicit `position_ids` give
    each row its own position and ragged lengths need no mask.
Then every request picks its next tokens: greedy (one batched argmax), sampled (per request, with
its own generator), or a beam-search step. A new request with `n > 1` samples or beams is prefilled
once and forked; its siblings share the prompt's blocks and copy a shared partial block only when
they write into it (copy-on-write with `copy_blocks`, inside `PagedKVCache.append_tokens`).
Finished sequences free their blocks at once.

The model is switched to the `"paged_attn"` attention and to eval mode when the engine is built.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from itertools import count

import torch
from tqdm.auto import tqdm

import paged_attn.hf
from paged_attn.engine.kv_manager import KVManager
from paged_attn.engine.request import Request, RequestOutput, SamplingParams, Sequence
from paged_attn.engine.sampling import BeamSearch, sample_tokens
from paged_attn.engine.scheduler import Scheduler, StepKind
from paged_attn.engine.swap import CpuSwapPool
from paged_attn.kv_cache import PagedKVCache

DEFAULT_KV_CACHE_MEMORY = 1 << 30
"""KV-cache budget in bytes when neither `num_blocks` nor `kv_cache_memory` is given."""

_PADDING_TOKEN_ID = 0
"""Any valid id: padding columns are masked, get no cache slot and their logits are unused."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues, memory and counters."""

    num_running_requests: int
    num_running_sequences: int
    num_waiting_requests: int
    num_swapped_requests: int
    num_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    peak_kv_bytes: int
    num_preemptions: int
    num_swap_ins: int
    num_recomputed_tokens: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    prefix_hit_rate: float
    num_steps: int
    num_prefill_tokens: int
    num_generated_tokens: int


class Engine:
    """Continuous batching with a paged KV cache, preemption, forks and prefix caching.

    Size the cache with `num_blocks` or `kv_cache_memory` (bytes; default 1 GiB). At most
    `max_num_seqs` sequences run at once, and a prefill step computes at most
    `max_num_batched_tokens` (rows times the longest row) unless a single request needs more.
    `preemption_mode` is "recompute" (drop the KV, prefill it again later) or "swap" (copy it to a
    CPU pool of `num_cpu_blocks` blocks, default as many as the cache; recompute when it is full).
    """

    def __init__(self, model, *, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096,
                 enable_prefix_caching: bool = True, preemption_mode: str = "recompute",
                 num_cpu_blocks: int | None = None, cache_dtype: torch.dtype | None = None):
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode is 'recompute' or 'swap', not {preemption_mode!r}")
        if num_blocks is None and kv_cache_memory is None:
            kv_cache_memory = DEFAULT_KV_CACHE_MEMORY
        self.model = paged_attn.hf.enable(model).eval()
        self.cache = PagedKVCache.from_model(
            model, num_blocks, memory_budget_bytes=kv_cache_memory, block_size=block_size,
            dtype=cache_dtype, enable_prefix_caching=enable_prefix_caching)
        swap_pool = None
        if preemption_mode == "swap":
            swap_pool = CpuSwapPool(self.cache, num_cpu_blocks or self.cache.num_blocks)
        self.kv = KVManager(self.cache, swap_pool)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        self.eos_token_ids = _eos_token_ids(model)
        self._requests: dict[int, Request] = {}
        self._request_ids = count()
        self._num_steps = 0
        self._num_prefill_tokens = 0  # tokens computed by prefill steps (prefix-cache hits skip)
        self._num_generated_tokens = 0

    # Requests -----------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: SequenceOf[int], params: SamplingParams | None = None,
                    ) -> int:
        """Queue a prompt; returns its request id. `step()` returns its output once it finishes."""
        params = params or SamplingParams()
        prompt = [int(token) for token in prompt_token_ids]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        peak_blocks = self.kv.peak_blocks(len(prompt) + params.max_new_tokens, params.width)
        if peak_blocks > self.cache.num_blocks:
            raise ValueError(f"a request of {len(prompt)} + {params.max_new_tokens} tokens and "
                             f"width {params.width} may need {peak_blocks} blocks; the cache "
                             f"has {self.cache.num_blocks}")
        if params.width > self.scheduler.max_num_seqs:
            raise ValueError(f"width {params.width} exceeds max_num_seqs "
                             f"({self.scheduler.max_num_seqs})")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.cache.device).manual_seed(params.seed)
        stop_token_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_token_ids |= frozenset(self.eos_token_ids)
        request = Request(next(self._request_ids), prompt, params, generator, stop_token_ids)
        if params.is_beam_search:
            request.beam_search = BeamSearch(params, stop_token_ids)
        self._requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def generate(self, prompts: SequenceOf[SequenceOf[int]],
                 params: SamplingParams | SequenceOf[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, **param_overrides) -> list[RequestOutput]:
        """Generate for every prompt; returns the outputs in prompt order.

        `params` is one `SamplingParams` for all prompts or one per prompt; without it, keyword
        arguments build one (`engine.generate(prompts, max_new_tokens=32)`). A progress bar
        appears when the run lasts longer than two seconds. Needs an idle engine.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine; use add_request() and step()")
        if params is None:
            params = SamplingParams(**param_overrides)
        elif param_overrides:
            raise TypeError("pass either params or keyword overrides, not both")
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        request_ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, per_prompt)]
        outputs: dict[int, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generate", unit="req", delay=2.0,
                  disable=not use_tqdm) as progress:
            while self.has_unfinished_requests():
                finished = self.step()
                outputs.update((output.request_id, output) for output in finished)
                progress.update(len(finished))
        return [outputs[request_id] for request_id in request_ids]

    def sequence_block_ids(self, request_id: int) -> list[list[int]]:
        """The cache blocks of each live sequence of a running request, in logical order."""
        request = self._requests[request_id]
        return [self.cache.block_ids(sequence.seq_id) for sequence in request.sequences
                if sequence.seq_id is not None]

    @property
    def stats(self) -> EngineStats:
        scheduler, allocator = self.scheduler, self.cache.allocator
        prefix = self.kv.prefix_cache_stats
        return EngineStats(
            num_running_requests=len(scheduler.running),
            num_running_sequences=scheduler.num_running_sequences,
            num_waiting_requests=len(scheduler.waiting),
            num_swapped_requests=len(scheduler.swapped),
            num_blocks=self.cache.num_blocks,
            num_used_blocks=allocator.num_used_blocks,
            num_cached_blocks=allocator.num_cached_blocks,
            peak_kv_bytes=self.cache.peak_kv_bytes,
            num_preemptions=scheduler.num_preemptions,
            num_swap_ins=scheduler.num_swap_ins,
            num_recomputed_tokens=self.kv.num_recomputed_tokens,
            prefix_cache_hits=prefix.hits,
            prefix_cache_queries=prefix.hits + prefix.misses,
            prefix_hit_rate=prefix.hit_rate,
            num_steps=self._num_steps,
            num_prefill_tokens=self._num_prefill_tokens,
            num_generated_tokens=self._num_generated_tokens,
        )

    # One step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; returns the requests that finished in it."""
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        self._num_steps += 1
        sequences = [sequence for request in scheduled.requests for sequence in request.sequences]
        new_tokens: list[list[int]] = []
        for sequence in sequences:
            if scheduled.kind is StepKind.PREFILL:
                num_cached = self.kv.start_prefill(sequence)
                new_tokens.append(sequence.token_ids[num_cached:])
                self._num_prefill_tokens += len(new_tokens[-1])
            else:
                new_tokens.append(sequence.token_ids[-1:])
        logits = self._forward(sequences, new_tokens)
        self.kv.register_full_blocks(sequences)
        return self._advance(scheduled.requests, logits)

    def _forward(self, sequences: list[Sequence], new_tokens: list[list[int]]) -> torch.Tensor:
        """Feed each sequence its new tokens; returns the last one's logits [rows, vocab] float32.

        Rows are padded on the left, so every row's last token sits in the last column; padding
        gets no cache slot (the attention mask marks it) and position 0.
        """
        device = self.cache.device
        width = max(len(tokens) for tokens in new_tokens)
        input_ids = torch.full((len(sequences), width), _PADDING_TOKEN_ID, dtype=torch.long)
        position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        is_real = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (sequence, tokens) in enumerate(zip(sequences, new_tokens)):
            start = self.cache.seq_len(sequence.seq_id)
            input_ids[row, width - len(tokens):] = torch.tensor(tokens)
            position_ids[row, width - len(tokens):] = torch.arange(start, start + len(tokens))
            is_real[row, width - len(tokens):] = 1
        self.cache.restart_positions()  # explicit position_ids: the mask needs no past columns
        attention_mask = None if bool(is_real.all()) else is_real.to(device)
        self.cache.batch = [sequence.seq_id for sequence in sequences]
        output = self.model(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                            attention_mask=attention_mask, past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1)
        return output.logits[:, -1].float()

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        """Pick each request's next tokens from its `logits` rows [rows, vocab]; retire the done."""
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy_tokens = logits.argmax(dim=-1).tolist()
        finished_outputs = []
        first_row = 0
        for request in requests:
            rows = slice(first_row, first_row + request.num_live)
            first_row = rows.stop
            if request.beam_search is not None:
                self._beam_step(request, logprobs[rows])
            else:
                self._sample_step(request, logits[rows], logprobs[rows], greedy_tokens[rows])
            if not request.sequences:
                self.scheduler.finish(request)
                del self._requests[request.request_id]
                finished_outputs.append(self._output(request))
        return finished_outputs

    def _sample_step(self, request: Request, logits: torch.Tensor, logprobs: torch.Tensor,
                     greedy_tokens: list[int]) -> None:
        """Append one token to each live sequence; a new request first forks into its `n` samples.

        `logits` and `logprobs` are [num_live, vocab] float32 rows of this request.
        """
        params = request.params
        greedy = params.temperature == 0
        if request.expanded:
            tokens = greedy_tokens if greedy else sample_tokens(
                logits, params, request.generator, 1)[:, 0].tolist()
        else:
            tokens = greedy_tokens * params.n if greedy else sample_tokens(
                logits, params, request.generator, params.n)[0].tolist()
            request.sequences += [self.kv.fork(request.sequences[0]) for _ in range(params.n - 1)]
            logprobs = logprobs.expand(params.n, -1)
            request.expanded = True
        chosen = torch.tensor(tokens, device=logprobs.device)
        chosen_logprobs = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        for sequence, token, logprob in zip(request.sequences, tokens, chosen_logprobs):
            sequence.token_ids.append(token)
            sequence.cumulative_logprob += logprob
            if token in request.stop_token_ids:
                sequence.finish_reason = "stop"
            elif sequence.num_generated >= params.max_new_tokens:
                sequence.finish_reason = "length"
        self._num_generated_tokens += len(request.sequences)
        for sequence in [sequence for sequence in request.sequences if sequence.finish_reason]:
            self.kv.free(sequence)
            request.sequences.remove(sequence)
            request.finished.append(sequence)

    def _beam_step(self, request: Request, logprobs: torch.Tensor) -> None:
        """One beam-search step over the request's [num_live, vocab] log-probabilities.

        Each next beam is a fork of the beam it extends; the old beams are then freed, so blocks
        of beams that lost are released and shared blocks lose one owner each.
        """
        old_beams = request.sequences
        continuations = request.beam_search.step(old_beams, logprobs)
        new_beams = []
        for continuation in continuations:
            beam = self.kv.fork(old_beams[continuation.parent])
            beam.token_ids.append(continuation.token_id)
            beam.cumulative_logprob = continuation.cumulative_logprob
            new_beams.append(beam)
        for beam in old_beams:
            self.kv.free(beam)
        request.sequences = new_beams
        request.expanded = True
        self._num_generated_tokens += len(new_beams)

    def _output(self, request: Request) -> RequestOutput:
        if request.beam_search is not None:
            completions = [sequence.completion(beam_score=score)
                           for score, sequence in request.beam_search.best(request.params.n)]
        else:
            completions = [sequence.completion() for sequence in request.finished]
        return RequestOutput(request.request_id, request.prompt_token_ids, completions)


def _eos_token_ids(model) -> list[int]:
    """The model's end-of-sequence ids: its generation config's, else its config's."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
