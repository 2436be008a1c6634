"""`POST /v1/completions`: prompts (text, texts, token ids, lists of token ids) -> text_completion responses.

Each prompt is its own engine request; choices are indexed prompt_index * n + sample_index, as
vLLM does. Streaming sends, per choice, the difference between successive cumulative outputs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kiln.engine.detokenizer import decode_token
from kiln.entrypoints.openai.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo,
)
from kiln.entrypoints.openai.serving_base import (
    ChunkFramer, EngineRequest, EngineStreams, OpenAIServing, clamp_logprob, collect_final, guarded_stream,
    prompt_logprobs_json, streaming_response, unix_time, usage_dict,
)
from kiln.errors import InvalidRequestError
from kiln.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass(slots=True)
class _Prompt:
    text: str | None
    token_ids: list[int]


def token_text(tokenizer: Any, token_id: int, entry: dict[int, Logprob] | None, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    if entry is not None and token_id in entry and entry[token_id].decoded_token is not None:
        return entry[token_id].decoded_token  # type: ignore[return-value]
    return decode_token(tokenizer, token_id) if tokenizer is not None else ""


def legacy_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                    num_top: int, offset: int, as_ids: bool) -> CompletionLogprobs:
    """The completions API's logprobs: parallel lists of tokens, their logprobs, top alternatives and
    text offsets (starting at `offset`). A None entry (the first prompt token) has no logprob."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = token_text(tokenizer, token_id, entry, as_ids)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(clamp_logprob(entry[token_id].logprob) if token_id in entry else None)
        result.top_logprobs.append({
            token_text(tokenizer, tid, entry, as_ids): clamp_logprob(lp.logprob)
            for tid, lp in entry.items() if tid == token_id or (lp.rank is not None and lp.rank <= num_top)
        })
    return result


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise InvalidRequestError("prompt must not be empty.", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, self.serving.encode(item, request.add_special_tokens)))
            else:
                prompts.append(_Prompt(None, list(item)))
        return prompts

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        serving = self.serving
        n = serving.check_request(request)
        prompts = self._prompts(request)
        request_id = "cmpl-" + serving.base_request_id(raw_request, request.request_id)
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        engine_requests = []
        for i, prompt in enumerate(prompts):
            params = request.build_sampling_params(
                serving.resolve_max_tokens(request.max_tokens, len(prompt.token_ids)), request.logprobs,
                serving.generation_defaults, prompt_logprobs=echo_logprobs)
            engine_prompt: dict[str, Any] = {"prompt_token_ids": prompt.token_ids}
            if prompt.text is not None:
                engine_prompt["prompt"] = prompt.text
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            engine_requests.append(EngineRequest(engine_id, engine_prompt, params, request.priority))
        streams = await serving.open_streams(engine_requests)
        if request.stream:
            return streaming_response(guarded_stream(
                streams, lambda s: self._stream(request, request_id, n, s), request_id))
        finals = await collect_final(streams, raw_request)
        return JSONResponse(self._response(request, request_id, n, finals).model_dump())

    def _prompt_text(self, output: RequestOutput) -> str:
        return output.prompt if output.prompt is not None else self.serving.decode(output.prompt_token_ids)

    def _choice_logprobs(self, request: CompletionRequest, output: RequestOutput, sample: CompletionOutput,
                         start: int, echo: bool, offset: int) -> CompletionLogprobs | None:
        """Logprobs of the sample's tokens from `start`, preceded by the prompt's when echoing."""
        if request.logprobs is None:
            return None
        as_ids = bool(request.return_tokens_as_token_ids)
        tokenizer = self.serving.tokenizer
        token_ids: list[int] = []
        entries: list[dict[int, Logprob] | None] = []
        if echo:
            token_ids += output.prompt_token_ids
            entries += list(output.prompt_logprobs or [None] * len(output.prompt_token_ids))
        token_ids += sample.token_ids[start:]
        entries += list((sample.logprobs or [])[start:len(sample.token_ids)])
        return legacy_logprobs(tokenizer, token_ids, entries, request.logprobs, offset, as_ids)

    def _response(self, request: CompletionRequest, request_id: str, n: int,
                  finals: dict[int, RequestOutput]) -> CompletionResponse:
        choices = []
        num_prompt = num_generated = 0
        for prompt_index in sorted(finals):
            output = finals[prompt_index]
            num_prompt += len(output.prompt_token_ids)
            prefix = self._prompt_text(output) if request.echo else ""
            for sample in output.outputs:
                num_generated += len(sample.token_ids)
                choices.append(CompletionChoice(
                    index=prompt_index * n + sample.index, text=prefix + sample.text,
                    logprobs=self._choice_logprobs(request, output, sample, 0, request.echo, 0),
                    finish_reason=sample.finish_reason, stop_reason=sample.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(output) if request.prompt_logprobs is not None else None,
                ))
        return CompletionResponse(
            id=request_id, created=unix_time(), model=self.serving.models.primary, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                            total_tokens=num_prompt + num_generated),
        )

    async def _stream(self, request: CompletionRequest, request_id: str, n: int,
                      streams: EngineStreams) -> AsyncIterator[str]:
        created, model = unix_time(), self.serving.models.primary
        framer = ChunkFramer(request_id, "text_completion", created, model)
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options and options.continuous_usage_stats)
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        finished: set[int] = set()
        num_prompt: dict[int, int] = {}
        num_generated: dict[int, int] = {}
        async for prompt_index, output in streams:
            num_prompt[prompt_index] = len(output.prompt_token_ids)
            for sample in output.outputs:
                index = prompt_index * n + sample.index
                if index in finished:
                    continue
                first = index not in sent_text
                echo = request.echo and first
                if echo and request.logprobs is not None and len(output.prompt_logprobs or ()) < num_prompt[
                        prompt_index] and not sample.finished():
                    continue  # prompt logprobs still being computed
                delta = sample.text[sent_text.get(index, 0):]
                if not delta and not echo and not sample.finished():
                    continue  # nothing new to show yet (a partial stop string or character is withheld)
                prefix = self._prompt_text(output) if echo else ""
                start = sent_tokens.get(index, 0)
                logprobs = self._choice_logprobs(request, output, sample, start, echo, offsets.get(index, 0))
                if logprobs is not None and logprobs.tokens:
                    offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                sent_text[index], sent_tokens[index] = len(sample.text), len(sample.token_ids)
                num_generated[index] = len(sample.token_ids)
                if sample.finished():
                    finished.add(index)
                choice = {  # CompletionChoice's fields, without building the model per token
                    "index": index, "text": prefix + delta,
                    "logprobs": logprobs.model_dump() if logprobs is not None else None,
                    "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason,
                    "prompt_logprobs": None,
                }
                usage = usage_dict(num_prompt[prompt_index], len(sample.token_ids)) if continuous else None
                yield framer.frame([choice], usage, with_usage=include_usage)
        if include_usage:
            yield framer.frame([], usage_dict(sum(num_prompt.values()), sum(num_generated.values())), with_usage=True)
