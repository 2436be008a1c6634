"""Sampling features end to end on the embedded model, against transformers or hand-derived
expectations: seeds, n > 1, min_tokens, stop strings and ids, ignore_eos, logprobs."""

from __future__ import annotations

import pytest
import torch

from kiln import SamplingParams

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def llm(make_llm):
    return make_llm(dtype="float32")


def test_seeded_sampling_independent_of_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=7, max_tokens=5, ignore_eos=True)]
    batch = llm.generate(["Hello", "Once upon a time", "Tell me"], [others[0], seeded, others[1]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    different = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=24, ignore_eos=True)
    assert llm.generate("Once upon a time", different, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_share_prompt_blocks(llm):
    """The n samples of one prompt reuse the first sample's prompt blocks (prefix cache hits)."""
    prompt = "A long shared prompt about the history of mathematics and its many famous theorems, " * 2
    stats = llm.llm_engine.core.scheduler.make_stats
    assert stats().prefix_cache_hits == 0
    out = llm.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 1
    assert stats().prefix_cache_hits >= 2 * 16
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == out.outputs[0].token_ids
    sampled = llm.generate("Tell me a story", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12),
                           use_tqdm=False)[0]
    assert len(sampled.outputs) == 4 and len({tuple(o.token_ids) for o in sampled.outputs}) > 1


def test_min_tokens_and_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    free = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "stop" and free.stop_reason is None and len(free.token_ids) < 20
    assert free.token_ids[-1] == eos
    forced = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64, min_tokens=20), use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) >= 20 and eos not in forced.token_ids[:19]
    ignored = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert len(ignored.outputs[0].token_ids) == 30 and ignored.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_stop_strings(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    base = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[5]
    by_id = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    stop = base.text[10:16]
    by_str = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert by_str.text == base.text[: base.text.index(stop)]
    assert by_str.finish_reason == "stop" and by_str.stop_reason == stop
    kept = llm.generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]


def test_logprobs_match_transformers(llm, hf_smollm):
    model, tokenizer = hf_smollm
    prompt = "The capital of France is"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    prompt_ids = out.prompt_token_ids
    sample = out.outputs[0]
    ids = torch.tensor([prompt_ids + sample.token_ids])
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    for step, (token_id, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
        row = ref[len(prompt_ids) - 1 + step]
        assert entry[token_id].logprob == pytest.approx(row[token_id].item(), abs=1e-3)
        assert entry[token_id].rank == 1
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(entry) and len(entry) == 3
    assert sample.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(sample.token_ids, sample.logprobs)), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for position in range(1, len(prompt_ids)):
        entry = out.prompt_logprobs[position]
        token_id = prompt_ids[position]
        assert entry[token_id].logprob == pytest.approx(ref[position - 1, token_id].item(), abs=1e-3)
        assert entry[token_id].rank == int((ref[position - 1] > ref[position - 1, token_id]).sum()) + 1


def test_prompt_logprobs_in_row_slices_equal_all_at_once(llm, monkeypatch):
    """Prompt logprobs are computed a slice of positions at a time; slices of 2 give what one slice
    does (the same tokens and ranks; the values up to float32 rounding, as the LM head's products
    tile their rows by count)."""
    from kiln.worker import model_runner

    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    prompt = "The capital of France is a city of"
    whole = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 2)
    sliced = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    assert len(whole) > 5 and sliced[0] is None and whole[0] is None
    for got, expected in zip(sliced[1:], whole[1:], strict=True):
        assert {t: e.rank for t, e in got.items()} == {t: e.rank for t, e in expected.items()}
        assert [e.logprob for e in got.values()] == pytest.approx([e.logprob for e in expected.values()], abs=1e-5)


def test_best_of_returns_the_most_likely_samples(llm):
    """best_of=3, n=1 keeps the sample of highest cumulative logprob among the same three samples
    that n=3 (same seed, so the same child seeds) returns."""
    prompt = "My favourite animal is"
    three = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, logprobs=0),
                         use_tqdm=False)[0].outputs
    best = llm.generate(prompt, SamplingParams(n=1, best_of=3, temperature=1.0, seed=5, max_tokens=8),
                        use_tqdm=False)[0].outputs
    assert len(best) == 1 and best[0].index == 0
    assert best[0].token_ids == max(three, key=lambda o: o.cumulative_logprob).token_ids
