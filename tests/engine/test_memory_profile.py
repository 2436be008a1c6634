"""The memory profile's run (`ModelRunner.profile_run`, what `--gpu-memory-utilization` sizes the KV
cache from) on CPU: besides the full-budget forward it must take the sampler's heaviest path on
as many rows as one step may sample, whose [rows, vocab] tensors can outweigh the forward's."""

from __future__ import annotations

from kiln.worker import model_runner


def test_profile_samples_a_full_step_of_rows_on_every_heavy_path(make_llm, monkeypatch):
    llm = make_llm(max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=300)
    runner = llm.llm_engine.core.worker.model_runner
    seen = []
    forward = runner.sampler.forward

    def spy(logits, metadata):
        seen.append((tuple(logits.shape), metadata))
        return forward(logits, metadata)

    monkeypatch.setattr(runner.sampler, "forward", spy)
    assert runner.profile_run(lambda num_blocks: None) == 1024  # the engine's own (idle) cache serves
    ((shape, metadata),) = seen
    assert shape == (300, runner.vocab_size)
    assert metadata.max_num_logprobs == llm.llm_engine.config.max_logprobs
    assert None not in (metadata.top_k, metadata.top_p, metadata.min_p, metadata.temperature)
    assert not metadata.no_penalties
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 400)  # more rows than max_num_seqs
    seen.clear()
    runner.profile_run(lambda num_blocks: None)
    assert seen[0][0] == (400, runner.vocab_size)
