"""ChunkFramer's events are the SSE framing of the chunk objects the OpenAI streaming schema
describes: the same fields, in the same order, as encoding the whole chunk would give."""

from __future__ import annotations

import json

import pytest

from kiln.entrypoints.openai.serving_base import ChunkFramer, sse


@pytest.mark.parametrize("usage, with_usage", [(None, False), (None, True), ({"prompt_tokens": 3,
                                                "completion_tokens": 1, "total_tokens": 4}, True)])
def test_frames_equal_whole_chunk_encoding(usage, with_usage):
    framer = ChunkFramer('cmpl-"quoted"', "text_completion", 1765000000, "org/model ü")
    choices = [{"index": 0, "text": 'say "hi"\n', "logprobs": None, "finish_reason": None}]
    expected = {"id": 'cmpl-"quoted"', "object": "text_completion", "created": 1765000000, "model": "org/model ü",
                "system_fingerprint": None, "choices": choices}
    if with_usage:
        expected["usage"] = usage
    event = framer.frame(choices, usage, with_usage=with_usage)
    assert event == sse(json.dumps(expected))
    assert list(json.loads(event[len("data: "):])) == list(expected)
