"""RequestOutputStream: a reader that keeps up sees every output in order; one that falls behind
gets the latest cumulative output only; an error comes after the output pending before it."""

from __future__ import annotations

import asyncio

import pytest

from kiln.engine.async_llm import RequestOutputStream
from kiln.errors import EngineDeadError
from kiln.outputs import CompletionOutput, RequestOutput


def output(text: str, finished: bool = False) -> RequestOutput:
    token_ids = list(range(len(text.split())))
    sample = CompletionOutput(0, text, token_ids, None, None, "length" if finished else None)
    return RequestOutput("r", None, [1, 2], None, [sample], finished)


def test_a_reader_that_keeps_up_sees_every_output():
    async def main():
        stream = RequestOutputStream("r")
        texts = ["a", "a b", "a b c"]

        async def produce():
            for i, text in enumerate(texts):
                await asyncio.sleep(0)
                stream.put(output(text, finished=i == len(texts) - 1))

        producer = asyncio.create_task(produce())
        seen = [o.outputs[0].text async for o in stream]
        await producer
        return seen

    assert asyncio.run(main()) == ["a", "a b", "a b c"]


def test_a_lagging_reader_gets_the_latest_output_only():
    async def main():
        stream = RequestOutputStream("r")
        for text in ["a", "a b"]:
            stream.put(output(text))
        first = await stream.__anext__()
        stream.put(output("a b c"))
        stream.put(output("a b c d", finished=True))
        rest = [o async for o in stream]
        return first, rest

    first, rest = asyncio.run(main())
    assert first.outputs[0].text == "a b"
    assert [o.outputs[0].text for o in rest] == ["a b c d"] and rest[0].finished


def test_an_error_follows_the_pending_output_and_ends_the_stream():
    async def main():
        stream = RequestOutputStream("r")
        stream.put(output("a"))
        stream.put(EngineDeadError("gone"))
        seen = []
        with pytest.raises(EngineDeadError, match="gone"):
            async for o in stream:
                seen.append(o.outputs[0].text)
        return stream, seen

    stream, seen = asyncio.run(main())
    assert seen == ["a"] and stream.finished and not stream.ready


def test_one_wake_event_watches_several_streams():
    async def main():
        wake = asyncio.Event()
        streams = [RequestOutputStream(f"r{i}", wake) for i in range(2)]
        asyncio.get_running_loop().call_later(0.01, streams[1].put, output("x"))
        await asyncio.wait_for(wake.wait(), timeout=5)
        return [s.ready for s in streams]

    assert asyncio.run(main()) == [False, True]
