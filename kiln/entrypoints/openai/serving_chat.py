"""`POST /v1/chat/completions`: messages -> chat template -> engine -> chat.completion(.chunk) responses.

Owns message validation (roles, text-only content parts), choosing the chat template (the model's,
`--chat-template`, or a request's when `--trust-request-chat-template`), and the chat logprobs
format. Streaming sends a role chunk per choice, then content deltas, the last with finish_reason.
Tools and reasoning (tool_choice, the parsers, the reasoning_content/tool_calls fields) are in
tool_calling.py; this module wires them into the request and the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.entrypoints.openai.protocol import (
    ChatChoice, ChatChoiceLogprobs, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    ChatResponseMessage, ChatTokenLogprob, TopLogprob, UsageInfo,
)
from kiln.entrypoints.openai.serving_base import (
    ChunkFramer, EngineRequest, EngineStreams, OpenAIServing, clamp_logprob, collect_final, guarded_stream,
    prompt_logprobs_json, streaming_response, unix_time, usage_dict,
)
from kiln.entrypoints.openai.serving_completion import token_text
from kiln.entrypoints.openai.tool_calling import (
    ChatParsers, ChoiceParsing, ToolPlan, merge_deltas, plan_tools, template_messages,
)
from kiln.errors import InvalidRequestError, UnsupportedFeatureError
from kiln.outputs import CompletionOutput, Logprob
from kiln.tokenizer import load_chat_template, render_chat

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system instructions; HF templates know system


def _text_of(content: str | list[dict[str, Any]] | None, where: str, keep_parts: bool) -> Any:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            if kind == "text":
                raise InvalidRequestError(f"{where}.content[{i}] of type text needs a string `text`.",
                                          param=f"{where}.content")
            raise UnsupportedFeatureError(
                f"{where}.content[{i}] has type {kind!r}; only text parts are supported (the model is text-only).",
                param=f"{where}.content")
        texts.append(part["text"])
    return [{"type": "text", "text": t} for t in texts] if keep_parts else "\n".join(texts)


def conversation_of(messages: list[ChatMessage], content_format: str) -> list[dict[str, Any]]:
    """Messages as the chat template sees them: known roles, text content, extra fields kept."""
    if not messages:
        raise InvalidRequestError("messages must hold at least one message.", param="messages")
    conversation = []
    for i, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.role, message.role)
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}] has an unknown role {message.role!r}; use system, developer, user, assistant or tool.",
                param=f"messages[{i}].role")
        entry: dict[str, Any] = dict(message.model_extra or {})
        entry["role"] = role
        entry["content"] = _text_of(message.content, f"messages[{i}]", content_format == "openai")
        if message.name is not None:
            entry["name"] = message.name
        conversation.append(entry)
    return conversation


def _top_logprob(tokenizer: Any, token_id: int, entry: dict[int, Logprob], as_ids: bool) -> TopLogprob:
    token = token_text(tokenizer, token_id, entry, as_ids)
    logprob = entry[token_id].logprob if token_id in entry else float("-inf")
    return TopLogprob(token=token, logprob=clamp_logprob(logprob), bytes=list(token.encode("utf-8")))


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int,
                  as_ids: bool) -> ChatChoiceLogprobs:
    """OpenAI's chat logprobs: per token its logprob and bytes, and the `num_top` most likely tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        top_ids = sorted((tid for tid, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
                         key=lambda tid: entry[tid].rank or 0)
        sampled = _top_logprob(tokenizer, token_id, entry, as_ids)
        content.append(ChatTokenLogprob(
            **sampled.model_dump(), top_logprobs=[_top_logprob(tokenizer, tid, entry, as_ids) for tid in top_ids]))
    return ChatChoiceLogprobs(content=content)


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        config = serving.server_config
        self.chat_template = load_chat_template(config.chat_template)
        self.default_template_kwargs = dict(config.default_chat_template_kwargs or {})
        tokenizer = serving.tokenizer
        template_in_use = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not isinstance(template_in_use, str):  # a dict of named templates: look at all of them
            template_in_use = "\n".join(template_in_use.values()) if isinstance(template_in_use, dict) else None
        model_config = serving.engine.config.model_config
        model_type = getattr(getattr(model_config, "hf_config", None), "model_type", None)
        self.parsers = ChatParsers(config, template_in_use, model_type)

    def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan:
        return plan_tools(request, self.parsers.auto_tool_choice)

    def render_prompt(self, request: ChatCompletionRequest, conversation: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None = None) -> str:
        template = self.chat_template
        if request.chat_template is not None:
            if not self.serving.server_config.trust_request_chat_template:
                raise InvalidRequestError(
                    "chat_template in a request is refused unless the server runs with "
                    "--trust-request-chat-template.", param="chat_template")
            template = request.chat_template
        if self.serving.tokenizer is None:
            raise InvalidRequestError("This server has no tokenizer (--skip-tokenizer-init): chat is unavailable.",
                                      param="messages")
        return render_chat(
            self.serving.tokenizer, conversation, chat_template=template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs={**self.default_template_kwargs, **(request.chat_template_kwargs or {})},
            documents=request.documents, tools=tools,
        )

    def _role(self, request: ChatCompletionRequest, conversation: list[dict[str, Any]]) -> str:
        if request.add_generation_prompt:
            return self.serving.server_config.response_role
        return conversation[-1]["role"]

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        serving = self.serving
        n = serving.check_request(request)
        plan = self._tool_plan(request)
        conversation = conversation_of(request.messages, serving.server_config.chat_template_content_format)
        prompt_text = self.render_prompt(request, template_messages(conversation), plan.tools)
        prompt_ids = serving.encode(prompt_text, request.add_special_tokens)
        params = request.build_sampling_params(
            serving.resolve_max_tokens(request.requested_max_tokens, len(prompt_ids)), request.requested_logprobs,
            serving.generation_defaults)
        if plan.mode == "auto" and self.parsers.tool_parser_name == "mistral":
            params.skip_special_tokens = False  # its [TOOL_CALLS] marker is a special token
        if (params.structured_outputs is not None and self.parsers.reasoning_parser is not None
                and plan.mode not in ("required", "named")):
            # the model thinks freely; the constraint applies to the content after the thinking part
            gate = self.parsers.reasoning_parser(serving.tokenizer)
            gate.set_prompt(prompt_text)
            params.reasoning_gate = gate

        def parsing() -> ChoiceParsing:
            return ChoiceParsing(self.parsers, plan, serving.tokenizer, prompt_text)
        request_id = "chatcmpl-" + serving.base_request_id(raw_request, request.request_id)
        engine_request = EngineRequest(request_id, {"prompt": prompt_text, "prompt_token_ids": prompt_ids}, params,
                                       request.priority)
        streams = await serving.open_streams([engine_request])
        role = self._role(request, conversation)
        echo = ""
        if request.echo and conversation[-1]["role"] == role and isinstance(conversation[-1]["content"], str):
            echo = conversation[-1]["content"]
        if request.stream:
            return streaming_response(guarded_stream(
                streams, lambda s: self._stream(request, request_id, role, echo, n, len(prompt_ids), s, parsing),
                request_id))
        final = (await collect_final(streams, raw_request))[0]
        choices = [self._choice(request, role, echo, sample, parsing()) for sample in final.outputs]
        num_prompt = len(final.prompt_token_ids)
        num_generated = sum(len(sample.token_ids) for sample in final.outputs)
        response = ChatCompletionResponse(
            id=request_id, created=unix_time(), model=serving.models.primary, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                            total_tokens=num_prompt + num_generated),
            prompt_logprobs=prompt_logprobs_json(final),
        )
        return JSONResponse(response.model_dump())

    def _choice(self, request: ChatCompletionRequest, role: str, echo: str, sample: CompletionOutput,
                parsing: ChoiceParsing) -> ChatChoice:
        reasoning, content, calls = None, sample.text, []
        if parsing.active:
            reasoning, content, calls = parsing.parse(sample.text)
        if echo:
            content = echo + (content or "")
        finish_reason = sample.finish_reason
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return ChatChoice(
            index=sample.index,
            message=ChatResponseMessage(role=role, content=content, reasoning_content=reasoning, tool_calls=calls),
            logprobs=self._logprobs(request, sample, 0), finish_reason=finish_reason,
            stop_reason=sample.stop_reason,
        )

    def _logprobs(self, request: ChatCompletionRequest, sample: CompletionOutput, start: int) -> ChatChoiceLogprobs | None:
        if not request.logprobs:
            return None
        entries = (sample.logprobs or [])[start:len(sample.token_ids)]
        return chat_logprobs(self.serving.tokenizer, sample.token_ids[start:start + len(entries)], entries,
                             request.top_logprobs or 0, bool(request.return_tokens_as_token_ids))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, role: str, echo: str, n: int,
                      num_prompt: int, streams: EngineStreams,
                      new_parsing: Callable[[], ChoiceParsing]) -> AsyncIterator[str]:
        created, model = unix_time(), self.serving.models.primary
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
        usage_so_far = usage_dict(num_prompt, 0) if continuous else None

        framer = ChunkFramer(request_id, "chat.completion.chunk", created, model)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            return framer.frame(choices, usage, with_usage=usage is not None or include_usage)

        for index in range(n):
            yield chunk([{"index": index, "delta": {"role": role, "content": echo}, "logprobs": None,
                          "finish_reason": None}], usage_so_far)
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        fed_tokens: dict[int, int] = {}
        finished: set[int] = set()
        num_generated: dict[int, int] = {}
        parsings: dict[int, ChoiceParsing] = {}
        async for _, output in streams:
            num_prompt = len(output.prompt_token_ids)
            for sample in output.outputs:
                if sample.index in finished:
                    continue
                text = sample.text[sent_text.get(sample.index, 0):]
                if not text and not sample.finished():
                    continue
                sent_text[sample.index] = len(sample.text)
                parsing = parsings.get(sample.index)
                if parsing is None:
                    parsing = parsings[sample.index] = new_parsing()
                if parsing.active:
                    start = fed_tokens.get(sample.index, 0)
                    ids = list(sample.token_ids)
                    fed_tokens[sample.index] = len(ids)
                    delta = parsing.step(text, ids[:start], ids, ids[start:]) if text else {}
                    if sample.finished():
                        delta = merge_deltas(delta, parsing.finish(ids))
                    if not delta and not sample.finished():
                        continue  # withheld by a parser; the logprobs go with the next chunk
                else:
                    delta = {"content": text} if text else {}
                logprobs = self._logprobs(request, sample, sent_tokens.get(sample.index, 0))
                sent_tokens[sample.index] = len(sample.token_ids)
                num_generated[sample.index] = len(sample.token_ids)
                finish_reason = sample.finish_reason
                if finish_reason == "stop" and parsing.tools_called:
                    finish_reason = "tool_calls"
                choice: dict[str, Any] = {
                    "index": sample.index, "delta": delta,
                    "logprobs": logprobs.model_dump() if logprobs is not None else None,
                    "finish_reason": finish_reason,
                }
                if sample.finished():
                    finished.add(sample.index)
                    choice["stop_reason"] = sample.stop_reason
                yield chunk([choice], usage_dict(num_prompt, len(sample.token_ids)) if continuous else None)
        if include_usage:
            yield chunk([], usage_dict(num_prompt, sum(num_generated.values())))
