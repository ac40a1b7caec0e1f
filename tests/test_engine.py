"""Tests of the continuous-batching Engine against per-prompt transformers `generate()`.

The model is test_hf_models.py's tiny random-weight Llama, run twice with the same weights: stock
(sdpa, DynamicCache) for the references and "paged_attn" inside the engine. Its LM head is scaled
by 8 so that greedy choices have a margin and rounding differences between the two attention
paths cannot flip a token. Prompts have mixed lengths and budgets, so requests queue, retire and
get admitted mid-run; tiny block budgets force preemption, which must neither lose nor repeat a
token. Beam search is checked against transformers' own `generate(num_beams=...)`.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from paged_attn.engine import Engine, SamplingParams
from test_hf_models import VOCAB, model_pair

BLOCK_SIZE = 4
PROMPT_LENGTHS = (1, 3, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 19, 21, 24, 29)
NEW_TOKENS = (12, 5, 9, 14, 3, 11, 8, 13, 6, 10, 4, 12, 7, 9, 14, 5)
FIRST_NON_SPECIAL_TOKEN = 3  # Llama's pad, bos and eos are 0, 1 and 2
BENCH = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def models():
    return model_pair("llama")


def random_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_NON_SPECIAL_TOKEN, VOCAB, (length,), generator=generator).tolist()
            for length in lengths]


@torch.no_grad()
def hf_greedy(model, prompt, max_new_tokens, **kwargs):
    """transformers' greedy continuation of one prompt (no padding involved)."""
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            **kwargs)
    return output[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy_case(models):
    """Sixteen prompts, their token budgets and transformers' greedy outputs."""
    stock, _ = models
    prompts = random_prompts(PROMPT_LENGTHS)
    expected = [hf_greedy(stock, prompt, budget) for prompt, budget in zip(prompts, NEW_TOKENS)]
    return prompts, [SamplingParams(max_new_tokens=budget) for budget in NEW_TOKENS], expected


def assert_all_blocks_released(engine):
    assert engine.stats.num_used_blocks == 0
    assert not engine.has_unfinished_requests()
    if engine.kv.swap_pool is not None:
        assert engine.kv.swap_pool.allocator.num_used_blocks == 0


def test_greedy_outputs_match_transformers_generate(models, greedy_case):
    _, paged = models
    prompts, params, expected = greedy_case
    engine = Engine(paged, num_blocks=256, block_size=BLOCK_SIZE, max_num_seqs=6)
    outputs = engine.generate(prompts, params)
    assert [output.token_ids for output in outputs] == expected
    stats = engine.stats
    assert stats.num_preemptions == 0
    assert stats.num_steps < sum(NEW_TOKENS)  # sequences really decoded together
    assert stats.num_generated_tokens == sum(map(len, expected))
    assert_all_blocks_released(engine)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_greedy_outputs_survive_preemption(models, greedy_case, preemption_mode):
    _, paged = models
    prompts, params, expected = greedy_case
    engine = Engine(paged, num_blocks=16, block_size=BLOCK_SIZE, max_num_seqs=8,
                    preemption_mode=preemption_mode, enable_prefix_caching=False)
    outputs = engine.generate(prompts, params)
    assert [output.token_ids for output in outputs] == expected
    stats = engine.stats
    assert stats.num_preemptions > 0
    if preemption_mode == "swap":
        assert stats.num_swap_ins == stats.num_preemptions and stats.num_recomputed_tokens == 0
    else:
        assert stats.num_swap_ins == 0 and stats.num_recomputed_tokens > 0
    assert stats.peak_kv_bytes <= 16 * engine.cache.bytes_per_block
    assert_all_blocks_released(engine)


def test_generation_stops_at_the_models_eos_token(models):
    stock, paged = models
    prompt = random_prompts([10], seed=3)[0]
    free_running = hf_greedy(stock, prompt, 12)
    eos = free_running[4]
    expected = free_running[:free_running.index(eos) + 1]
    assert hf_greedy(stock, prompt, 12, eos_token_id=eos) == expected
    original_eos = paged.generation_config.eos_token_id
    paged.generation_config.eos_token_id = eos
    try:
        engine = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE)
    finally:
        paged.generation_config.eos_token_id = original_eos
    (stopped,) = engine.generate([prompt], max_new_tokens=12).pop().outputs
    assert (stopped.token_ids, stopped.finish_reason) == (expected, "stop")
    ignoring = engine.generate([prompt], max_new_tokens=12, ignore_eos=True).pop().outputs[0]
    assert (ignoring.token_ids, ignoring.finish_reason) == (free_running, "length")


def test_parallel_samples_share_the_prompt_blocks_until_they_write(models):
    stock, paged = models
    prompt = random_prompts([10], seed=1)[0]  # two full blocks and a partial one of two tokens
    engine = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    request_id = engine.add_request(prompt, SamplingParams(max_new_tokens=6, n=3))

    engine.step()  # prefill once, then fork into three samples
    tables = engine.sequence_block_ids(request_id)
    assert len(tables) == 3 and tables[0] == tables[1] == tables[2] and len(tables[0]) == 3
    assert [engine.cache.allocator.refcount(block) for block in tables[0]] == [3, 3, 3]
    assert engine.stats.num_used_blocks == 3

    engine.step()  # each sample writes its token into the shared partial block: copy-on-write
    tables = engine.sequence_block_ids(request_id)
    prompt_blocks = tables[0][:2]
    assert all(table[:2] == prompt_blocks for table in tables)
    assert [engine.cache.allocator.refcount(block) for block in prompt_blocks] == [3, 3]
    assert len({table[2] for table in tables}) == 3
    assert engine.stats.num_used_blocks == 2 + 3

    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    (output,) = finished
    expected = hf_greedy(stock, prompt, 6)
    assert [sample.token_ids for sample in output.outputs] == [expected] * 3
    assert_all_blocks_released(engine)


def test_seeded_samples_do_not_depend_on_batching_or_preemption(models, greedy_case):
    _, paged = models
    prompts, _, _ = greedy_case
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, n=2)
    alone = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE).generate([prompts[6]], sampled)[0]
    crowded = Engine(paged, num_blocks=16, block_size=BLOCK_SIZE, max_num_seqs=8)
    in_crowd = crowded.generate(prompts[:6] + [prompts[6]], [SamplingParams(max_new_tokens=12)] * 6
                                + [sampled])[-1]
    assert crowded.stats.num_preemptions > 0
    assert [sample.token_ids for sample in in_crowd.outputs] == [
        sample.token_ids for sample in alone.outputs]
    assert [sample.cumulative_logprob for sample in in_crowd.outputs] == pytest.approx(
        [sample.cumulative_logprob for sample in alone.outputs], abs=1e-4)
    assert all(len(sample.token_ids) == 10 for sample in alone.outputs)
    greedy = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE).generate(
        [prompts[6]], max_new_tokens=10)[0]
    top_1 = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE).generate(
        [prompts[6]], max_new_tokens=10, temperature=1.5, top_k=1, seed=3)[0]
    assert top_1.token_ids == greedy.token_ids


def test_prefix_caching_skips_the_shared_prefix_and_keeps_outputs(models):
    stock, paged = models
    shared = random_prompts([13], seed=4)[0]  # three full blocks of four
    suffixes = random_prompts([2, 5, 3, 7, 1], seed=5)
    prompts = [shared + suffix for suffix in suffixes]
    expected = [hf_greedy(stock, prompt, 6) for prompt in prompts]

    def run(enable_prefix_caching):
        engine = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE,
                        enable_prefix_caching=enable_prefix_caching)
        first = engine.generate(prompts[:1], max_new_tokens=6)  # fills and keys the shared blocks
        rest = engine.generate(prompts[1:], max_new_tokens=6)
        assert [output.token_ids for output in first + rest] == expected
        assert_all_blocks_released(engine)
        return engine.stats

    cached, uncached = run(True), run(False)
    assert cached.prefix_cache_hits == 3 * len(suffixes[1:])
    assert uncached.prefix_cache_hits == 0
    assert cached.prefix_hit_rate > 0.5
    skipped = uncached.num_prefill_tokens - cached.num_prefill_tokens
    assert skipped == 3 * BLOCK_SIZE * len(suffixes[1:])


@pytest.mark.parametrize("num_blocks", [96, 20])
def test_beam_search_matches_transformers_beam_search(models, num_blocks):
    """Same hypotheses and order as generate(num_beams=3); 20 blocks force preemption."""
    stock, paged = models
    prompts = random_prompts([7, 12, 4, 9], seed=6)
    params = SamplingParams(max_new_tokens=8, num_beams=3, n=3)
    engine = Engine(paged, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=9)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = stock.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3,
                                       num_return_sequences=3, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True)
        for row, hypothesis in enumerate(output.outputs):
            generated = reference.sequences[row, len(prompt):].tolist()
            length = len(hypothesis.token_ids)
            assert hypothesis.token_ids == generated[:length]
            # transformers fills after a finished hypothesis with pad_token_id, or eos when pad is 0
            assert set(generated[length:]) <= {stock.generation_config.eos_token_id}
            assert hypothesis.beam_score == pytest.approx(reference.sequences_scores[row].item(),
                                                          abs=1e-4)
    assert (engine.stats.num_preemptions > 0) == (num_blocks == 20)
    assert_all_blocks_released(engine)


def test_beams_share_blocks_through_fork(models):
    _, paged = models
    prompt = random_prompts([9], seed=8)[0]
    engine = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    request_id = engine.add_request(prompt, SamplingParams(max_new_tokens=8, num_beams=3))
    engine.step()
    engine.step()
    tables = engine.sequence_block_ids(request_id)
    first_block = tables[0][0]
    assert len(tables) == 3 and all(table[0] == first_block for table in tables)
    assert engine.cache.allocator.refcount(first_block) == 3


def test_attention_masks_do_not_grow_with_the_engines_history(models, greedy_case):
    """A padded prefill's mask covers only its own columns, however many steps ran before."""
    _, paged = models
    prompts, _, _ = greedy_case
    engine = Engine(paged, num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    shapes = []
    forward = paged.forward

    def recording(*args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            shapes.append((tuple(kwargs["input_ids"].shape), tuple(kwargs["attention_mask"].shape)))
        return forward(*args, **kwargs)

    paged.forward = recording
    try:
        for pair in (prompts[2:4], prompts[4:6]):  # ragged prompts: each prefill is padded
            engine.generate(pair, max_new_tokens=6, use_tqdm=False)
    finally:
        del paged.forward
    assert len(shapes) == 2
    assert all(input_shape == mask_shape for input_shape, mask_shape in shapes)


def test_requests_that_can_never_fit_are_refused(models):
    _, paged = models
    engine = Engine(paged, num_blocks=8, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="blocks"):
        engine.add_request(list(range(3, 30)), SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(num_beams=2, temperature=1.0)


def test_quick_throughput_benchmark_runs_and_reports_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    throughput = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = throughput
    spec.loader.exec_module(throughput)
    results = throughput.main(["--quick", "--results-dir", str(tmp_path),
                               "--readme", str(tmp_path / "README_throughput.md")])
    rows = {row["system"]: row for row in results["systems"]}
    assert set(rows) == set(throughput.SYSTEMS)
    baseline = rows[results["baseline"]]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_kv_bytes"] > 0
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / baseline["tokens_per_s"])
    for engine in ("engine", "engine_small_pool"):
        assert rows[engine]["matches_hf_greedy"] == results["workload"]["num_requests"]
    assert rows["engine"]["preemptions"] == 0 and rows["engine_small_pool"]["preemptions"] > 0
    assert rows["engine"]["peak_kv_bytes"] < rows["hf_static"]["peak_kv_bytes"]
    assert json.loads((tmp_path / "throughput.json").read_text()) == json.loads(json.dumps(results))
    readme = (tmp_path / "README_throughput.md").read_text()
    assert f"{rows['engine']['speedup']:.2f}x" in readme
