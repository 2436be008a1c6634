"""The output processor's reporting: a request added with final_only (as the offline LLM adds them)
is reported once, finished, with every token; others after every step, each report cumulative."""

from __future__ import annotations

from kiln.core.outputs import EngineCoreOutput
from kiln.engine.output_processor import OutputProcessor
from kiln.sampling.params import SamplingParams


def _run(final_only: bool) -> list[list[list[int]]]:
    """Three steps of two requests (one finishing at step 2, one at step 3); per step, the token
    ids of the outputs reported."""
    processor = OutputProcessor(tokenizer=None)
    for request_id in ("a", "b"):
        processor.add_request(request_id, None, [1, 2], SamplingParams(max_tokens=3), final_only=final_only)
    steps = [
        [EngineCoreOutput("a", [5]), EngineCoreOutput("b", [7])],
        [EngineCoreOutput("a", [6], finish_reason="length"), EngineCoreOutput("b", [8])],
        [EngineCoreOutput("b", [9], finish_reason="length")],
    ]
    reported = []
    for step in steps:
        outputs, to_abort = processor.process_outputs(step)
        assert to_abort == []
        reported.append([o.outputs[0].token_ids for o in outputs])
        assert all(o.finished == (o.outputs[0].finish_reason is not None) for o in outputs)
    assert processor.parents == {}, "finished requests are forgotten"
    return reported


def test_final_only_reports_each_request_once_finished():
    assert _run(final_only=True) == [[], [[5, 6]], [[7, 8, 9]]]


def test_requests_are_otherwise_reported_every_step():
    assert _run(final_only=False) == [[[5], [7]], [[5, 6], [7, 8]], [[7, 8, 9]]]
