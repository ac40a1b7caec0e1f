"""Generation throughput on the CPU: the paged Engine against three transformers baselines.

All four systems serve the same backlog of requests, all arriving at once, with a small
random-weight Llama built from a config (no download), in the same process and run:
  engine                  paged_attn.Engine: continuous batching over the paged KV cache, its
                          pool sized like the largest static batch
  engine_small_pool       the same with 40% of that pool, so it must preempt (recompute)
  hf_static               transformers generate(), static cache: batches of `batch_size`
                          requests, left-padded, each batch's cache sized to its longest need
  hf_dynamic              the same batches with the default DynamicCache (the baseline)
  hf_continuous_batching  transformers' own continuous batching (sdpa attention): the manager that
                          generate_batch() drives, fed through add_request() because
                          generate_batch() takes one max_new_tokens for every prompt
Requests have mixed prompt lengths and mixed token budgets; end-of-sequence is disabled, so each
request generates exactly its budget. generate() runs a batch until its largest budget; the
extra tokens are waste and are not counted. Every system may run `batch_size` sequences at once.

Measured: useful tokens (the sum of the budgets) per second of wall time, as the median over
`repeats` runs that interleave the systems, and the peak KV-cache bytes each held:
  engine      the most blocks in use at once (its pool is sized like one static batch)
  static      the cache tensors of the largest batch (allocated up front)
  dynamic     the cache tensors of the largest batch at its end (they only grow)
  HF CB       its preallocated pool, sized like the engine's (its usage is not exposed)
Ratios are against hf_dynamic measured in the same run. The LM head is scaled by 8 so greedy
choices have a margin; the engine's outputs are checked against hf_dynamic's.

Run: python bench/throughput.py            (writes bench/results/throughput.json and
                                            bench/README_throughput.md)
     python bench/throughput.py --quick    (a reduced run, well under a minute; used by tests)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from paged_attn.engine import Engine, SamplingParams
from paged_attn.kv_cache import bytes_per_block, kv_shape_from_config

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("engine", "engine_small_pool", "hf_static", "hf_dynamic", "hf_continuous_batching")
BASELINE = "hf_dynamic"
BLOCK_SIZE = 16
SMALL_POOL_FRACTION = 0.4
MODEL_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)


@dataclass(frozen=True)
class Workload:
    num_requests: int
    prompt_lengths: tuple[int, int]  # inclusive range, uniform
    new_tokens: tuple[int, int]      # inclusive range, uniform
    batch_size: int
    repeats: int
    seed: int = 0


FULL = Workload(num_requests=48, prompt_lengths=(16, 192), new_tokens=(16, 160), batch_size=16,
                repeats=5)
QUICK = Workload(num_requests=8, prompt_lengths=(8, 48), new_tokens=(4, 24), batch_size=4,
                 repeats=2)


@dataclass(frozen=True)
class Requests:
    prompts: list[list[int]]
    budgets: list[int]


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_kv_bytes: int
    outputs: list[list[int]]
    preemptions: int | None = None  # engines only


def make_requests(workload: Workload) -> Requests:
    generator = torch.Generator().manual_seed(workload.seed)

    def lengths(low_high: tuple[int, int]) -> list[int]:
        low, high = low_high
        return torch.randint(low, high + 1, (workload.num_requests,), generator=generator).tolist()

    prompts = [torch.randint(3, MODEL_CONFIG["vocab_size"], (length,), generator=generator).tolist()
               for length in lengths(workload.prompt_lengths)]
    return Requests(prompts, lengths(workload.new_tokens))


def make_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stock sdpa model, a copy for the engine) with the same random weights, LM head x8."""
    config = LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    with torch.no_grad():
        stock.lm_head.weight.mul_(8.0)
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    paged.load_state_dict(stock.state_dict())
    return stock.eval(), paged


def batches(requests: Requests, batch_size: int):
    for start in range(0, len(requests.prompts), batch_size):
        yield requests.prompts[start:start + batch_size], requests.budgets[start:start + batch_size]


def kv_bytes(cache) -> int:
    """Bytes of a transformers cache's key and value tensors."""
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers for tensor in (layer.keys, layer.values))


def kv_bytes_per_token(model) -> int:
    return bytes_per_block(*kv_shape_from_config(model.config), 1, model.dtype)


def static_batch_kv_bytes(model, requests: Requests, batch_size: int) -> int:
    """KV bytes of the largest static-cache batch: rows x (longest prompt + largest budget)."""
    return max(len(prompts) * (max(map(len, prompts)) + max(budgets)) * kv_bytes_per_token(model)
               for prompts, budgets in batches(requests, batch_size))


@torch.inference_mode()
def run_hf_generate(model, requests: Requests, workload: Workload, cache_implementation: str | None,
                    ) -> Run:
    outputs, peak = [], 0
    start = time.perf_counter()
    for prompts, budgets in batches(requests, workload.batch_size):
        width = max(map(len, prompts))
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        generated = model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max(budgets),
                                   cache_implementation=cache_implementation, pad_token_id=0,
                                   return_dict_in_generate=True)
        peak = max(peak, kv_bytes(generated.past_key_values))
        outputs += [row[width:width + budget].tolist()
                    for row, budget in zip(generated.sequences, budgets)]
    return Run(time.perf_counter() - start, peak, outputs)


def run_engine(model, requests: Requests, workload: Workload, pool_bytes: int) -> Run:
    engine = Engine(model, kv_cache_memory=pool_bytes, block_size=BLOCK_SIZE,
                    max_num_seqs=workload.batch_size)
    params = [SamplingParams(max_new_tokens=budget, ignore_eos=True) for budget in requests.budgets]
    start = time.perf_counter()
    outputs = engine.generate(requests.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return Run(seconds, engine.stats.peak_kv_bytes, [output.token_ids for output in outputs],
               engine.stats.num_preemptions)


def run_hf_continuous_batching(model, requests: Requests, workload: Workload,
                               num_blocks: int) -> Run:
    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_new_tokens=max(requests.budgets))
    cb_config = ContinuousBatchingConfig(page_size=BLOCK_SIZE, num_blocks=num_blocks,
                                         max_requests_per_batch=workload.batch_size)
    start = time.perf_counter()
    manager_context = model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=cb_config, warmup=False)
    with manager_context as manager:
        request_ids = [manager.add_request(prompt, max_new_tokens=budget)
                       for prompt, budget in zip(requests.prompts, requests.budgets)]
        results = {}
        while len(results) < len(request_ids):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing")
            if result.is_finished():
                results[result.request_id] = result.generated_tokens
        pool_bytes = manager.batch_processor.cache.cache_tensor.nbytes
    seconds = time.perf_counter() - start
    return Run(seconds, pool_bytes, [results[request_id] for request_id in request_ids])


def measure(workload: Workload) -> dict:
    requests = make_requests(workload)
    stock, paged = make_models()
    pool_bytes = static_batch_kv_bytes(stock, requests, workload.batch_size)
    num_blocks = pool_bytes // (BLOCK_SIZE * kv_bytes_per_token(stock))
    runners: dict[str, Callable[[], Run]] = {
        "engine": lambda: run_engine(paged, requests, workload, pool_bytes),
        "engine_small_pool": lambda: run_engine(paged, requests, workload,
                                                int(pool_bytes * SMALL_POOL_FRACTION)),
        "hf_static": lambda: run_hf_generate(stock, requests, workload, "static"),
        "hf_dynamic": lambda: run_hf_generate(stock, requests, workload, None),
        "hf_continuous_batching": lambda: run_hf_continuous_batching(stock, requests, workload,
                                                                     num_blocks),
    }
    warmup = Workload(2, workload.prompt_lengths, (2, 2), 2, 1, workload.seed)
    warmup_requests = make_requests(warmup)
    run_engine(paged, warmup_requests, warmup, pool_bytes)
    run_hf_generate(stock, warmup_requests, warmup, None)
    runs: dict[str, list[Run]] = {system: [] for system in SYSTEMS}
    for _ in range(workload.repeats):
        for system in SYSTEMS:
            runs[system].append(runners[system]())

    useful_tokens = sum(requests.budgets)
    reference = runs[BASELINE][0].outputs
    rows = []
    for system in SYSTEMS:
        seconds = [run.seconds for run in runs[system]]
        rows.append(dict(
            system=system,
            seconds=seconds,
            median_seconds=statistics.median(seconds),
            preemptions=runs[system][0].preemptions,
            tokens_per_s=useful_tokens / statistics.median(seconds),
            peak_kv_bytes=max(run.peak_kv_bytes for run in runs[system]),
            matches_hf_greedy=sum(output == expected
                                  for output, expected in zip(runs[system][0].outputs, reference)),
        ))
    baseline = next(row for row in rows if row["system"] == BASELINE)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["kv_ratio"] = row["peak_kv_bytes"] / baseline["peak_kv_bytes"]
    return dict(
        workload=asdict(workload), baseline=BASELINE, useful_tokens=useful_tokens,
        wasted_tokens_in_generate=sum(len(budgets) * max(budgets) - sum(budgets)
                                      for _, budgets in batches(requests, workload.batch_size)),
        engine_pool_bytes=pool_bytes, model=MODEL_CONFIG, block_size=BLOCK_SIZE,
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__, systems=rows)


def table(results: dict) -> str:
    lines = ["| system | useful tokens/s | vs hf_dynamic | seconds (min-max) | peak KV (KiB) "
             "| KV vs hf_dynamic | preemptions | same greedy tokens as hf_dynamic |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    num_requests = results["workload"]["num_requests"]
    for row in results["systems"]:
        preemptions = "-" if row["preemptions"] is None else row["preemptions"]
        lines.append(f"| {row['system']} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
                     f"{min(row['seconds']):.1f}-{max(row['seconds']):.1f} | "
                     f"{row['peak_kv_bytes'] / 1024:.0f} | {row['kv_ratio']:.2f}x | "
                     f"{preemptions} | "
                     f"{row['matches_hf_greedy']}/{num_requests} |")
    return "\n".join(lines)


def readme(results: dict) -> str:
    workload, model = results["workload"], results["model"]
    setup = (
        f"One CPU process, torch {results['torch_version']} on {results['torch_threads']} "
        f"thread(s), a random-weight Llama ({model['num_hidden_layers']} layers, hidden "
        f"{model['hidden_size']}, {model['num_attention_heads']} heads, "
        f"{model['num_key_value_heads']} KV heads, vocab {model['vocab_size']}, fp32). "
        f"{workload['num_requests']} requests arrive at once: prompts of "
        f"{workload['prompt_lengths'][0]}-{workload['prompt_lengths'][1]} tokens, budgets of "
        f"{workload['new_tokens'][0]}-{workload['new_tokens'][1]} new tokens (EOS off), at most "
        f"{workload['batch_size']} sequences at once in every system. Tokens/s counts useful "
        f"tokens ({results['useful_tokens']}); generate() also computed "
        f"{results['wasted_tokens_in_generate']} tokens past their requests' budgets, not counted.")
    method = (
        f"Medians of {workload['repeats']} interleaved repeats; ratios are against `{BASELINE}` "
        "from the same run. The machine is shared, so the spread of the repeats is shown. "
        "Peak KV: the engine's most blocks in use at once (its pool has the bytes of the largest "
        f"static batch; {SMALL_POOL_FRACTION:.0%} of that for engine_small_pool); the static and "
        "dynamic caches' tensors of the largest batch; transformers' continuous batching's "
        "preallocated pool (the engine's block count and block size; its usage is not exposed).")
    return "\n".join([
        "## Throughput: the engine against transformers generate() and continuous batching",
        "",
        "Generated by `bench/throughput.py`; do not edit by hand.",
        "",
        setup,
        "",
        method,
        "",
        table(results),
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run for the test suite")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--readme", type=Path, default=REPO / "bench" / "README_throughput.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    results = measure(QUICK if args.quick else FULL)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    args.readme.write_text(readme(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
