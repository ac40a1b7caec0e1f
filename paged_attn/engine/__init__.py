"""Continuous-batching generation over the paged KV cache.

    engine = paged_attn.Engine(model, num_blocks=2048)
    outputs = engine.generate(prompts, max_new_tokens=64)      # list of RequestOutput
    outputs[0].token_ids

The package reads top-down: `engine.py` (the step loop and the model's forward passes),
`scheduler.py` (who runs, who is preempted), `kv_manager.py` (where each sequence's KV lives, in
blocks), `swap.py` (the CPU swap pool), `sampling.py` (sampling and beam search), `request.py`
(parameters, requests, sequences and outputs). Importing it imports transformers.
"""

from paged_attn.engine.engine import Engine, EngineStats
from paged_attn.engine.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineStats", "RequestOutput", "SamplingParams"]
