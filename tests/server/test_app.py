"""`build_app` over a scripted fake engine (no model): the paths a real server cannot be steered into
cheaply: admission control, internal errors, the engine dying mid-stream, chunked oversized bodies,
CORS, request-id headers, generation defaults, message conversion."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from kiln.config import ServerConfig
from kiln.engine.async_llm import RequestOutputStream
from kiln.entrypoints.openai.api_server import build_app
from kiln.entrypoints.openai.generation_defaults import load_generation_defaults
from kiln.entrypoints.openai.protocol import CompletionChoice
from kiln.entrypoints.openai.serving_base import EngineRequest
from kiln.errors import EngineDeadError, InvalidRequestError
from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling.params import SamplingParams

WORDS = " one two three four five six seven eight"


class FakeEngine:
    """AsyncLLM's serving surface: `add_request` validates at once, then a task puts cumulative
    outputs of a fixed text (`text`, WORDS by default) on the request's stream, one token per loop
    tick, ending with `finish_reason`; `gate` holds requests before their first output."""

    def __init__(self, tokenizer, text: str = WORDS, finish_reason: str = "length", max_model_len: int = 64) -> None:
        self.tokenizer = tokenizer
        self.text, self.finish_reason, self.max_model_len = text, finish_reason, max_model_len
        self.config = SimpleNamespace(max_logprobs=20, model_config=SimpleNamespace(
            model="/models/fake.gguf", served_model_name="fake", max_model_len=max_model_len))
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.die_after_first = False
        self.requests: list[tuple[str, dict, object]] = []
        self.producers: dict[str, asyncio.Task] = {}
        self.aborted: list[str] = []
        self.is_dead = False
        self.num_unfinished_requests = 0
        self.stat_loggers: list = []

    def add_stat_logger(self, stat_logger) -> None:
        self.stat_loggers.append(stat_logger)

    def add_request(self, prompt, params, request_id, priority=0, wake=None) -> RequestOutputStream:
        if self.fail is not None:
            raise self.fail
        if len(prompt["prompt_token_ids"]) + (params.max_tokens or 0) > self.max_model_len:
            raise InvalidRequestError("too long for the fake", "max_tokens")
        self.requests.append((request_id, prompt, params))
        stream = RequestOutputStream(request_id, wake)
        self.producers[request_id] = asyncio.create_task(self._produce(prompt, params, request_id, stream))
        return stream

    async def _produce(self, prompt, params, request_id, stream: RequestOutputStream) -> None:
        tokens = self.tokenizer.encode(self.text, add_special_tokens=False)[:params.max_tokens or 3]
        if self.gate is not None:
            await self.gate.wait()
        for i in range(1, len(tokens) + 1):
            await asyncio.sleep(0)
            finished = i == len(tokens)
            samples = [CompletionOutput(j, self.tokenizer.decode(tokens[:i]), tokens[:i], None, None,
                                        self.finish_reason if finished else None) for j in range(params.n)]
            stream.put(RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], None, samples,
                                     finished))
            if self.die_after_first:
                stream.put(EngineDeadError("The engine failed: scripted"))
                return

    def abort(self, request_id: str) -> None:
        producer = self.producers.get(request_id)
        if producer is not None and not producer.done():
            producer.cancel()
            self.aborted.append(request_id)


@pytest.fixture(scope="module")
def tokenizer():
    from kiln.config import default_model_path
    from kiln.tokenizer import get_tokenizer

    return get_tokenizer(default_model_path())


def run(engine: FakeEngine, config: ServerConfig, scenario) -> None:
    """Run `scenario(client, engine)` against the app in one event loop; afterwards no request may be
    left counted as queued or holding its request id."""
    app = build_app(engine, config)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await scenario(client, engine)

    asyncio.run(main())
    serving = app.state.serving
    assert serving.num_queued == 0 and not serving.active_ids


def completion(**fields):
    return {"prompt": "Hi", "max_tokens": 3, **fields}


def test_admission_control_answers_429_with_retry_after(tokenizer):
    async def scenario(client, engine):
        engine.gate = asyncio.Event()
        first = asyncio.create_task(client.post("/v1/completions", json=completion()))
        while not engine.requests:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/completions", json=completion())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "RateLimitError"
        engine.gate.set()
        assert (await first).status_code == 200
        assert (await client.post("/v1/completions", json=completion())).status_code == 200

    run(FakeEngine(tokenizer), ServerConfig(max_num_queued_reqs=1), scenario)


def test_internal_error_is_a_500_and_the_server_goes_on(tokenizer, caplog):
    async def scenario(client, engine):
        engine.fail = RuntimeError("boom")
        response = await client.post("/v1/completions", json=completion(), headers={"X-Request-Id": "r-1"})
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "Internal server error (request id r-1)",
                                            "type": "InternalServerError", "param": None, "code": 500}
        engine.fail = None
        assert (await client.post("/v1/completions", json=completion())).status_code == 200

    run(FakeEngine(tokenizer), ServerConfig(), scenario)
    assert "Request r-1 failed" in caplog.text and "RuntimeError: boom" in caplog.text  # the traceback is logged


def test_engine_death_mid_stream_ends_with_an_error_event(tokenizer):
    async def scenario(client, engine):
        engine.die_after_first = True
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
        blocks = response.text.split("\n\n")
        assert blocks[-2:] == ["data: [DONE]", ""]
        error = json.loads(blocks[-3][len("data: "):])["error"]
        assert error["code"] == 503 and "scripted" in error["message"]
        assert (await client.post("/v1/completions", json=completion())).status_code == 503

    engine = FakeEngine(tokenizer)
    run(engine, ServerConfig(), scenario)


def test_streaming_completions_index_choices_per_prompt(tokenizer):
    async def scenario(client, engine):
        response = await client.post("/v1/completions", json=completion(prompt=["a", "b"], n=2, stream=True))
        events = [json.loads(b[len("data: "):]) for b in response.text.split("\n\n")[:-2]]
        texts: dict[int, str] = {}
        for event in events:
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert texts == {i: " one two three" for i in range(4)}
        assert all(set(choice) == set(CompletionChoice.model_fields) for event in events for choice in event["choices"])
        assert sorted(request_id for request_id, _, _ in engine.requests)[0].endswith("-0")

    run(FakeEngine(tokenizer), ServerConfig(), scenario)


def test_oversized_chunked_body_is_refused(tokenizer):
    async def scenario(client, engine):
        async def chunks():
            for _ in range(10):
                yield b"x" * 50

        response = await client.post("/v1/completions", content=chunks())
        assert response.status_code == 413 and response.json()["error"]["code"] == 413
        assert not engine.requests

    run(FakeEngine(tokenizer), ServerConfig(max_request_body_bytes=200), scenario)


def test_cors_preflight_auth_and_request_id_headers(tokenizer, monkeypatch):
    monkeypatch.setenv("KILN_API_KEY", "env-key")

    async def scenario(client, engine):
        preflight = await client.options("/v1/models", headers={
            "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://a.example"
        denied = await client.get("/v1/models", headers={"Origin": "https://a.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://a.example"
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer env-key", "X-Request-Id": "abc"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "abc"
        assert len((await client.get("/health")).headers["x-request-id"]) == 32

    config = ServerConfig(allowed_origins=("https://a.example",), enable_request_id_headers=True)
    run(FakeEngine(tokenizer), config, scenario)


def test_generation_defaults_fill_only_unset_fields(tokenizer, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 7, "max_new_tokens": 5, "do_sample": True}))
    assert load_generation_defaults("/models/x.gguf") == {}
    assert load_generation_defaults(str(tmp_path), "vllm") == {}
    assert load_generation_defaults(str(tmp_path)) == {"temperature": 0.3, "top_k": 7, "max_tokens": 5}

    async def scenario(client, engine):
        await client.post("/v1/completions", json={"prompt": "Hi"})
        await client.post("/v1/completions", json={"prompt": "Hi", "temperature": 0.8, "max_tokens": 2, "top_p": 1})
        (_, _, defaulted), (_, _, explicit) = [r for r in engine.requests]
        assert (defaulted.temperature, defaulted.top_k, defaulted.top_p, defaulted.max_tokens) == (0.3, 7, 0.9, 5)
        assert (explicit.temperature, explicit.top_k, explicit.top_p, explicit.max_tokens) == (0.8, 7, 1.0, 2)

    config = ServerConfig(generation_config=str(tmp_path), override_generation_config={"top_p": 0.9})
    run(FakeEngine(tokenizer), config, scenario)


def test_chat_messages_reach_the_template(tokenizer):
    async def scenario(client, engine):
        response = await client.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]})
        assert response.status_code == 200
        prompt = engine.requests[0][1]["prompt"]
        assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt
        assert "<|im_start|>user\nHello\nthere<|im_end|>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        assert response.json()["choices"][0]["message"] == {
            "role": "assistant", "content": " one two", "refusal": None, "reasoning_content": None, "reasoning": None,
            "tool_calls": []}

    run(FakeEngine(tokenizer), ServerConfig(), scenario)



# ---- tool calling and reasoning (FakeEngine scripted with markup) ------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES_TEXT = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
THINK_TEXT = "<think>The user wants weather.</think>It is sunny."
TOOLS_CONFIG = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")


def chat(**fields):
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 60, **fields}


def sse_events(response) -> list[dict]:
    blocks = response.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def collect_stream(events) -> tuple[str, str, dict[int, dict], list]:
    """(content, reasoning_content, {index: {id, type, name, arguments}}, finish reasons) of a chat stream."""
    content, reasoning, calls, finishes = "", "", {}, []
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            assert delta.get("reasoning") == delta.get("reasoning_content")  # vLLM's newer name, same text
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"arguments": ""})
                if "id" in piece:
                    assert "id" not in call and piece["type"] == "function"
                    call["id"], call["type"] = piece["id"], piece["type"]
                if "name" in piece["function"]:
                    assert call["arguments"] == ""  # the name comes before any argument text
                    call["name"] = piece["function"]["name"]
                call["arguments"] += piece["function"].get("arguments") or ""
            if choice["finish_reason"] is not None:
                finishes.append(choice["finish_reason"])
    return content, reasoning, calls, finishes


def fake(tokenizer, text, finish_reason="stop"):
    return FakeEngine(tokenizer, text=text, finish_reason=finish_reason, max_model_len=1024)


def test_auto_tool_calls_non_streaming_and_streaming_agree(tokenizer):
    async def scenario(client, engine):
        response = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]))
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls"
        assert message["content"] == "Let me check."
        (call,) = message["tool_calls"]
        assert call["id"].startswith("call_") and len(call["id"]) == 29 and call["type"] == "function"
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

        streamed = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], stream=True))
        content, reasoning, calls, finishes = collect_stream(sse_events(streamed))
        assert content == "Let me check." and "<tool_call>" not in content and reasoning == ""
        assert list(calls) == [0] and calls[0]["name"] == "get_weather"
        assert calls[0]["id"].startswith("call_")
        assert calls[0]["arguments"] == call["function"]["arguments"]
        assert finishes == ["tool_calls"]

    run(fake(tokenizer, HERMES_TEXT), TOOLS_CONFIG, scenario)


def test_length_stays_length_and_no_tools_means_no_parsing(tokenizer):
    async def scenario(client, engine):
        cut = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]))
        assert cut.json()["choices"][0]["finish_reason"] == "length"
        plain = await client.post("/v1/chat/completions", json=chat())
        assert plain.json()["choices"][0]["message"]["content"] == HERMES_TEXT
        none = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="none"))
        assert none.json()["choices"][0]["message"]["tool_calls"] == []

    run(fake(tokenizer, HERMES_TEXT, "length"), TOOLS_CONFIG, scenario)


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    text = HERMES_TEXT + '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'

    async def scenario(client, engine):
        both = (await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]))).json()
        assert [c["function"]["arguments"] for c in both["choices"][0]["message"]["tool_calls"]] == [
            '{"city": "Paris"}', '{"city": "Rome"}']
        one = (await client.post("/v1/chat/completions",
                                 json=chat(tools=[WEATHER_TOOL], parallel_tool_calls=False))).json()
        assert [c["function"]["arguments"] for c in one["choices"][0]["message"]["tool_calls"]] == [
            '{"city": "Paris"}']
        streamed = await client.post("/v1/chat/completions",
                                     json=chat(tools=[WEATHER_TOOL], parallel_tool_calls=False, stream=True))
        _, _, calls, finishes = collect_stream(sse_events(streamed))
        assert list(calls) == [0] and calls[0]["arguments"] == '{"city": "Paris"}' and finishes == ["tool_calls"]

    run(fake(tokenizer, text), TOOLS_CONFIG, scenario)


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_content_is_split_streaming_and_not(tokenizer, parser):
    async def scenario(client, engine):
        message = (await client.post("/v1/chat/completions", json=chat())).json()["choices"][0]["message"]
        assert message["reasoning_content"] == message["reasoning"] == "The user wants weather."
        assert message["content"] == "It is sunny."
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
        content, reasoning, calls, finishes = collect_stream(sse_events(streamed))
        assert (reasoning, content, calls, finishes) == ("The user wants weather.", "It is sunny.", {}, ["stop"])

    run(fake(tokenizer, THINK_TEXT), ServerConfig(reasoning_parser=parser), scenario)


def test_reasoning_then_tool_calls(tokenizer):
    async def scenario(client, engine):
        message = (await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL]))).json()[
            "choices"][0]["message"]
        assert message["reasoning_content"] == "Need weather."
        assert message["content"] == "Let me check." and len(message["tool_calls"]) == 1
        streamed = await client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], stream=True))
        content, reasoning, calls, finishes = collect_stream(sse_events(streamed))
        assert (reasoning, content, finishes) == ("Need weather.", "Let me check.", ["tool_calls"])
        assert calls[0]["arguments"] == message["tool_calls"][0]["function"]["arguments"]

    config = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    run(fake(tokenizer, "<think>Need weather.</think>" + HERMES_TEXT), config, scenario)


def test_required_and_named_tool_choice_constrain_and_parse(tokenizer):
    async def scenario(client, engine):
        engine.text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
        required = (await client.post("/v1/chat/completions",
                                      json=chat(tools=[WEATHER_TOOL], tool_choice="required"))).json()
        schema = engine.requests[-1][2].structured_outputs.json
        assert schema["type"] == "array" and schema["minItems"] == 1
        assert schema["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
        assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER_TOOL["function"]["parameters"]
        choice = required["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}
        streamed = await client.post("/v1/chat/completions",
                                     json=chat(tools=[WEATHER_TOOL], tool_choice="required", stream=True))
        content, _, calls, finishes = collect_stream(sse_events(streamed))
        assert content == "" and calls[0]["name"] == "get_weather" and finishes == ["tool_calls"]
        assert calls[0]["arguments"] == '{"city": "Paris"}'

        engine.text = '{"city": "Paris"}'
        named_choice = {"type": "function", "function": {"name": "get_weather"}}
        named = (await client.post("/v1/chat/completions",
                                   json=chat(tools=[WEATHER_TOOL], tool_choice=named_choice))).json()
        assert engine.requests[-1][2].structured_outputs.json == WEATHER_TOOL["function"]["parameters"]
        call = named["choices"][0]["message"]["tool_calls"][0]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        streamed = await client.post("/v1/chat/completions",
                                     json=chat(tools=[WEATHER_TOOL], tool_choice=named_choice, stream=True))
        _, _, calls, finishes = collect_stream(sse_events(streamed))
        assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"city": "Paris"}'
        assert finishes == ["tool_calls"]

    run(fake(tokenizer, ""), ServerConfig(), scenario)  # no server flag needed for these


def test_tool_messages_reach_the_template(tokenizer):
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
                "{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
                "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}")

    async def scenario(client, engine):
        response = await client.post("/v1/chat/completions", json={"max_tokens": 2, "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
        assert response.status_code == 200, response.text
        prompt = engine.requests[0][1]["prompt"]
        assert "assistant:[get_weather Paris]" in prompt  # arguments arrive as an object
        assert "tool:sunny(call_1)" in prompt and "TOOL get_weather" in prompt

    run(FakeEngine(tokenizer), ServerConfig(chat_template=template), scenario)


@pytest.mark.parametrize("body, config, fragments, param", [
    (chat(tools=[WEATHER_TOOL], tool_choice="auto"), ServerConfig(), ["--enable-auto-tool-choice"], "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
     TOOLS_CONFIG, ["tools[0]", "JSON Schema"], "tools[0].function.parameters"),
    (chat(tools=[WEATHER_TOOL, WEATHER_TOOL]), TOOLS_CONFIG, ["unique"], "tools[1]"),
    (chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), ServerConfig(),
     ["nope", "get_weather"], "tool_choice"),
    (chat(tools=[WEATHER_TOOL], tool_choice="required", response_format={"type": "json_object"}), ServerConfig(),
     ["structured output"], "tool_choice"),
    (chat(tool_choice="required"), ServerConfig(), ["tools"], "tool_choice"),
    (chat(functions=[WEATHER_TOOL["function"]]), ServerConfig(), ["tools", "tool_choice"], "functions"),
])
def test_bad_tool_requests_get_400(tokenizer, body, config, fragments, param):
    async def scenario(client, engine):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        for fragment in fragments:
            assert fragment in error["message"]
        assert not engine.requests

    run(FakeEngine(tokenizer), config, scenario)


def test_parser_startup_checks(tokenizer, caplog):
    with pytest.raises(InvalidRequestError, match="known: .*hermes"):
        build_app(FakeEngine(tokenizer), ServerConfig(tool_call_parser="nope"))
    with pytest.raises(InvalidRequestError, match="--tool-call-parser"):  # SmolLM2's template has no tool markup
        build_app(FakeEngine(tokenizer), ServerConfig(enable_auto_tool_choice=True))
    with pytest.raises(InvalidRequestError, match="--reasoning-parser"):
        build_app(FakeEngine(tokenizer), ServerConfig(enable_reasoning=True))
    caplog.set_level("INFO")
    build_app(FakeEngine(tokenizer), ServerConfig(enable_auto_tool_choice=True, chat_template="{{ '<tool_call>' }}"))
    assert "Tool parser 'hermes' detected" in caplog.text
    build_app(FakeEngine(tokenizer), ServerConfig(enable_reasoning=True, reasoning_parser="qwen3"))
    assert "--enable-reasoning is deprecated" in caplog.text


def test_profile_routes_exist_only_with_the_profiler_dir(tokenizer, monkeypatch, tmp_path):
    calls: list[str] = []

    class ProfilingEngine(FakeEngine):
        async def start_profile(self):
            calls.append("start")

        async def stop_profile(self):
            calls.append("stop")
            raise InvalidRequestError("The profiler is not running.")

    async def without(client, engine):
        assert (await client.post("/start_profile")).status_code == 404

    monkeypatch.delenv("KILN_TORCH_PROFILER_DIR", raising=False)
    run(ProfilingEngine(tokenizer), ServerConfig(), without)

    async def with_dir(client, engine):
        assert (await client.post("/start_profile")).status_code == 200
        stopped = await client.post("/stop_profile")
        assert stopped.status_code == 400 and "not running" in stopped.json()["error"]["message"]

    monkeypatch.setenv("KILN_TORCH_PROFILER_DIR", str(tmp_path))
    run(ProfilingEngine(tokenizer), ServerConfig(), with_dir)
    assert calls == ["start", "stop"]


def test_startup_report_gives_time_since_launch_and_peak_rss():
    """Checked against psutil's account of the same process: its creation time and peak RSS."""
    import re
    import resource
    import time

    import psutil

    from kiln.entrypoints.openai.api_server import startup_report

    match = re.fullmatch(r"([\d.]+) s after launch, peak RSS (\d+) MiB", startup_report())
    assert match, startup_report()
    since_launch = time.time() - psutil.Process().create_time()
    # the same quantity two ways; psutil counts from a boot time in whole seconds
    assert float(match[1]) == pytest.approx(since_launch, abs=1.5)
    assert abs(int(match[2]) - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) < 64


def test_startup_report_counts_the_child_processes():
    """The engine core runs in a child process: its memory counts. A child holding 256 MiB adds
    at least that, and not much more than its own peak as psutil sees it."""
    import re
    import subprocess
    import sys

    import psutil

    from kiln.entrypoints.openai.api_server import startup_report

    def reported() -> int:
        match = re.search(r"peak RSS (\d+) MiB", startup_report())
        assert match, startup_report()
        return int(match[1])

    alone = reported()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(256 << 20); "
                              "print(flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # the memory is touched
        child_mib = psutil.Process(child.pid).memory_info().rss / 2**20
        with_child = reported()
    finally:
        child.communicate(b"")
    assert child_mib >= 256
    assert child_mib - 8 <= with_child - alone <= child_mib + 64


def test_a_lagging_reader_gets_merged_outputs_with_the_whole_text(tokenizer):
    """Outputs that arrive while the reader is busy are merged (they are cumulative): the reader
    sees the latest per request, and nothing is lost."""
    async def main():
        app = build_app(FakeEngine(tokenizer), ServerConfig())
        serving = app.state.serving
        requests = [EngineRequest(f"lag-{i}", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=8))
                    for i in range(2)]
        streams = await serving.open_streams(requests)
        for _ in range(20):  # the producers put all 8 outputs of each request meanwhile
            await asyncio.sleep(0)
        seen = [(index, output.outputs[0].text, output.finished) async for index, output in streams]
        streams.close()
        return serving, seen

    serving, seen = asyncio.run(main())
    assert sorted(seen) == [(0, WORDS, True), (1, WORDS, True)]
    assert serving.num_queued == 0 and not serving.active_ids
