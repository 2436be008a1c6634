"""Tokenizer loading (Hugging Face directories, hub ids, GGUF files) and chat-template rendering.

This module owns turning a model path into a `PreTrainedTokenizerBase` and a conversation into a
prompt string. It does not tokenize requests (the input processor does) nor detokenize outputs
(`kiln.engine.detokenizer` does). Loaded tokenizers are cached per process and shared: treat
them as read-only.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from kiln.errors import InvalidRequestError, UnsupportedFeatureError
from kiln.logger import init_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = init_logger(__name__)

TOKENIZER_MODES = ("auto", "slow")

# Arguments render_chat passes itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "padding", "truncation", "max_length", "messages",
})

__all__ = ["TOKENIZER_MODES", "eos_token_id_of", "get_tokenizer", "load_chat_template", "render_chat",
           "tokenizer_for"]


def get_tokenizer(
    path: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    tokenizer_mode: str = "auto",
    download_dir: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model directory, a hub id, or a `.gguf` file (its embedded tokenizer).

    tokenizer_mode "auto" prefers the fast (Rust) tokenizer; "slow" asks for the Python one.
    Results are cached per arguments for the life of the process; failures are not cached.
    Raises InvalidRequestError when the tokenizer cannot be loaded.
    """
    if tokenizer_mode == "mistral":
        raise UnsupportedFeatureError("tokenizer_mode 'mistral' is not supported; use 'auto' or 'slow'.",
                                      param="tokenizer_mode")
    if tokenizer_mode not in TOKENIZER_MODES:
        raise InvalidRequestError(
            f"tokenizer_mode must be one of {', '.join(TOKENIZER_MODES)}, not {tokenizer_mode!r}.",
            param="tokenizer_mode",
        )
    return _load_tokenizer(os.path.expanduser(path), trust_remote_code, revision, tokenizer_mode, download_dir)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, trust_remote_code: bool, revision: str | None, tokenizer_mode: str,
                    download_dir: str | None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision,
                              "use_fast": tokenizer_mode != "slow"}
    if download_dir is not None:
        kwargs["cache_dir"] = download_dir
    gguf = path.endswith(".gguf")
    if gguf:
        if not os.path.isfile(path):
            raise InvalidRequestError(f"GGUF file {path!r} does not exist.", param="tokenizer")
        source, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    else:
        source = path
    try:
        if gguf and tokenizer_mode != "slow":
            from kiln.gguf_cache import cached_conversion

            tokenizer = cached_conversion(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(source, **kwargs),
                                          AutoTokenizer.from_pretrained)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for bad inputs
        raise InvalidRequestError(
            f"Cannot load a tokenizer (mode {tokenizer_mode!r}) from {path!r}: {type(e).__name__}: {e}",
            param="tokenizer",
        ) from e
    logger.info("Loaded tokenizer %s from %s (vocab %d)", type(tokenizer).__name__, path, len(tokenizer))
    return tokenizer


def tokenizer_for(model_config: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer a ModelConfig names (None with skip_tokenizer_init): the frontend's, and the
    engine core process's copy."""
    if model_config.skip_tokenizer_init:
        return None
    return get_tokenizer(model_config.tokenizer, model_config.trust_remote_code, model_config.tokenizer_revision,
                         model_config.tokenizer_mode)


def eos_token_id_of(tokenizer: PreTrainedTokenizerBase | None, hf_config: Any = None) -> int | None:
    """The tokenizer's EOS id; else the model config's (its first one when it lists several)."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and hf_config is not None:
        eos = getattr(hf_config, "eos_token_id", None)
        if eos is None:  # multimodal configs keep it on the text sub-config
            eos = getattr(getattr(hf_config, "text_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None


def load_chat_template(value: str | None) -> str | None:
    """A `--chat-template` value: the contents of the file it names, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if value.endswith((".jinja", ".jinja2", ".j2")) and "{" not in value:
        raise InvalidRequestError(f"Chat template file {value!r} does not exist.", param="chat_template")
    return value


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
) -> str:
    """Render a conversation into the prompt text with the model's (or the given) Jinja chat template.

    Every failure a request can cause (no template, a template error, conflicting flags, reserved
    kwargs) raises InvalidRequestError with the reason.
    """
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError(
            "add_generation_prompt and continue_final_message cannot both be true: set "
            "add_generation_prompt to false to continue the final assistant message.",
            param="continue_final_message",
        )
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InvalidRequestError(
            f"The tokenizer of {name!r} has no chat template; pass chat_template (--chat-template) "
            "or use the completions API.",
            param="chat_template",
        )
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(extra))
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(reserved)}; use the request fields instead.",
            param="chat_template_kwargs",
        )
    import jinja2

    from kiln.tokenizer.bounded_jinja import install, render_budget

    install()
    try:
        with render_budget():
            text = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=False, **extra,
            )
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"Chat template error: {e}", param="messages") from e
    except (TypeError, ValueError, KeyError, IndexError) as e:  # template code meeting unexpected messages
        raise InvalidRequestError(f"Cannot render the chat template: {type(e).__name__}: {e}",
                                  param="messages") from e
    if not isinstance(text, str):
        raise InvalidRequestError("The chat template did not render to a string.", param="chat_template")
    return text
