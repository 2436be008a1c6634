"""The offline API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kiln.config import EngineArgs
from kiln.engine.input_processor import PromptType
from kiln.engine.llm_engine import LLMEngine
from kiln.outputs import RequestOutput
from kiln.sampling.params import SamplingParams
from kiln.tokenizer import render_chat

Conversation = list[dict[str, Any]]


class LLM:
    """An engine in this process. Keyword arguments are the engine arguments (see `EngineArgs`)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(model=model, **kwargs))
        self._request_counter = itertools.count()

    def start_profile(self) -> None:
        """Trace engine steps with the torch profiler until `stop_profile()` (needs KILN_TORCH_PROFILER_DIR)."""
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        self.llm_engine.stop_profile()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list) if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompt_list)} prompts; give one or one each.")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"{len(priority)} priorities for {len(prompt_list)} prompts.")
        request_ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                request_id = str(next(self._request_counter))
                self.llm_engine.add_request(request_id, prompt, params, priority[i] if priority else 0,
                                            final_only=True)
                request_ids.append(request_id)
        except Exception:
            self.llm_engine.abort_request(request_ids)
            raise
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = render_chat(
                tokenizer, list(conversation), chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs, tools=tools,
            )
            # The template already holds the special tokens it wants; do not add a second BOS.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        num_output_tokens = 0
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        if bar.format_dict["elapsed"]:
                            bar.set_postfix_str(f"output: {num_output_tokens / bar.format_dict['elapsed']:.1f} tok/s")
        except BaseException:
            self.llm_engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
