"""vLLM's `serve` flags that map onto no kiln config field: what happens when each is given.

The flags kiln implements are generated from the `EngineArgs` and `ServerConfig` fields
(`kiln/cli/serve_args.py`); this table holds only the rest, gathered from the `vllm serve` flag
lists in shared/seeds (000, 001, 002, 003, 004), so that a vLLM launch script either runs or stops
at once with a message naming its flag. Never silently ignored:

- `ignored`: accepted with a WARNING naming the flag (deprecated in vLLM itself, or kiln already
  behaves that way). If `noop` lists values, any other value is refused as unsupported.
- `unsupported`: a feature kiln does not have yet; the launch stops (exit 2) naming the flag,
  unless the value is one of `noop` (the flag's default, which changes nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Arity = Literal["switch", "value", "optional", "list"]


def parse_bool(text: str | bool) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case), as vLLM's boolean flags take them."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")


def json_or_text(text: str) -> Any:
    """A JSON value when the text parses as one, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class CompatFlag:
    """One vLLM flag with no kiln field behind it."""

    flag: str
    status: Literal["ignored", "unsupported"]
    what: str
    """What the flag is about: ends the warning or error message and is its --help."""
    arity: Arity = "value"
    """switch: --x/--no-x; value: --x V; optional: --x [V]; list: --x V [V ...]."""
    type: Callable[[str], Any] = str
    noop: tuple[Any, ...] | None = ()
    """Values that change nothing (pass; an ignored flag warns). None: every value."""
    aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def is_noop(self, value: Any) -> bool:
        if self.noop is None:
            return True
        values = value if isinstance(value, list) else [value]
        return all(v in self.noop for v in values)


def _ignored(flag: str, what: str, arity: Arity = "value", type: Callable[[str], Any] = str,
             noop: tuple[Any, ...] | None = None, aliases: tuple[str, ...] = ()) -> CompatFlag:
    return CompatFlag(flag, "ignored", what, arity, type, noop, aliases)


def _unsupported(flag: str, what: str, arity: Arity = "value", type: Callable[[str], Any] = str,
                 noop: tuple[Any, ...] = (), aliases: tuple[str, ...] = ()) -> CompatFlag:
    if arity == "switch" and not noop:
        noop = (False,)
    return CompatFlag(flag, "unsupported", what, arity, type, noop, aliases)


_SPEC = "speculative decoding"
_LORA = "LoRA adapters"
_MM = "multimodal inputs"
_DIST = "multi-GPU and multi-node execution"

COMPAT_FLAGS: tuple[CompatFlag, ...] = (
    # Deprecated in vLLM, or no effect in kiln: accepted with a warning.
    _ignored("--use-v2-block-manager", "deprecated in vLLM; block manager v2 is the only one", "switch"),
    _ignored("--disable-async-output-proc", "deprecated in vLLM; kiln has no async output processing", "switch"),
    _ignored("--num-lookahead-slots", "lookahead slots exist only for speculative decoding", type=int, noop=(0,)),
    _ignored("--swap-space", "kiln preempts by recomputing and never swaps KV blocks to CPU", type=float),
    _ignored("--max-seq-len-to-capture", "deprecated in vLLM; kiln's CUDA graphs cover every sequence length", type=int),
    _ignored("--max-context-len-to-capture", "deprecated in vLLM (was --max-seq-len-to-capture)", type=int),
    _ignored("--tokenizer-pool-size", "deprecated in vLLM; tokenization is synchronous", type=int),
    _ignored("--tokenizer-pool-type", "deprecated in vLLM; tokenization is synchronous"),
    _ignored("--tokenizer-pool-extra-config", "deprecated in vLLM; tokenization is synchronous"),
    _ignored("--multi-step-stream-outputs", "multi-step scheduling was removed in vLLM", "optional", parse_bool),
    _ignored("--num-scheduler-steps", "multi-step scheduling was removed in vLLM", type=int, noop=(1,)),
    _ignored("--scheduler-delay-factor", "deprecated in vLLM; kiln schedules every step", type=float, noop=(0.0,)),
    _ignored("--preemption-mode", "kiln always preempts by recomputing", noop=("recompute",)),
    _ignored("--disable-custom-all-reduce", "all-reduce only happens with tensor parallelism", "switch"),
    _ignored("--ray-workers-use-nsight", "kiln has no Ray workers to profile", "switch"),
    _ignored("--use-tqdm-on-load", "kiln always shows its weight-loading progress bar", "switch"),
    _ignored("--disable-cascade-attn", "kiln has no cascade attention", "switch"),
    _ignored("--language-model-only", "kiln serves text only", "switch"),
    _ignored("--disable-mm-preprocessor-cache", "kiln serves text only", "switch"),
    _ignored("--disable-chunked-mm-input", "kiln serves text only", "optional", parse_bool),
    _ignored("--show-hidden-metrics-for-version", "kiln has no hidden deprecated metrics"),
    _ignored("--compilation-config", "kiln does not torch.compile the model yet; outputs are the same",
             aliases=("-O",)),
    # Features kiln does not have yet: the launch stops naming the flag.
    _unsupported("--guided-decoding-backend", "structured output backends other than xgrammar (kiln's)",
                 noop=("xgrammar", "auto")),
    _unsupported("--logits-processor-pattern", "custom logits processors"),
    _unsupported("--calculate-kv-scales", "calibrated fp8 KV scales (kiln's fp8 KV cache uses scale 1.0)", "switch"),
    _unsupported("--enable-log-outputs", "output logging", "switch"),
    _unsupported("--enable-prompt-tokens-details", "prompt_tokens_details in usage", "switch"),
    _unsupported("--enable-server-load-tracking", "server load tracking", "switch"),
    _unsupported("--return-tokens-as-token-ids", "token_id:N logprob tokens", "switch"),
    _unsupported("--enable-ssl-refresh", "reloading SSL certificates", "switch"),
    _unsupported("--middleware", "custom ASGI middleware", "list"),
    _unsupported("--task", "tasks other than generate", noop=("auto", "generate")),
    _unsupported("--hf-config-path", "a separate Hugging Face config path"),
    _unsupported("--code-revision", "a separate revision for remote code"),
    _unsupported("--config-format", "non-HF config formats", noop=("auto", "hf")),
    _unsupported("--model-impl", "other model implementations", noop=("auto", "vllm")),
    _unsupported("--hf-token", "a Hugging Face token given as a flag (set HF_TOKEN)", "optional", noop=(True,)),
    _unsupported("--hf-overrides", "Hugging Face config overrides", type=json_or_text),
    _unsupported("--rope-scaling", "RoPE scaling overrides", type=json_or_text),
    _unsupported("--rope-theta", "RoPE theta overrides", type=float),
    _unsupported("--model-loader-extra-config", "model loader options", type=json_or_text),
    _unsupported("--ignore-patterns", "weight file ignore patterns", "list", noop=("original/**/*",)),
    _unsupported("--quantization-param-path", "KV cache scaling factors"),
    _unsupported("--disable-sliding-window", "sliding window control", "switch"),
    _unsupported("--cpu-offload-gb", "CPU weight offloading", type=float, noop=(0.0,)),
    _unsupported("--max-num-partial-prefills", "concurrent partial prefill limits", type=int, noop=(1,)),
    _unsupported("--max-long-partial-prefills", "concurrent partial prefill limits", type=int, noop=(1,)),
    _unsupported("--long-prefill-token-threshold", "concurrent partial prefill limits", type=int, noop=(0,)),
    _unsupported("--scheduler-cls", "custom scheduler classes"),
    _unsupported("--worker-cls", "custom worker classes", noop=("auto",)),
    _unsupported("--worker-extension-cls", "custom worker classes", noop=("",)),
    _unsupported("--enable-sleep-mode", "sleep mode", "switch"),
    _unsupported("--otlp-traces-endpoint", "OpenTelemetry tracing"),
    _unsupported("--collect-detailed-traces", "OpenTelemetry tracing"),
    _unsupported("--override-neuron-config", "Neuron devices"),
    _unsupported("--override-pooler-config", "pooling models"),
    _unsupported("--kv-transfer-config", "distributed KV cache transfer"),
    _unsupported("--additional-config", "platform-specific configuration"),
    _unsupported("--distributed-executor-backend", _DIST, noop=("uni", "mp")),
    _unsupported("--worker-use-ray", "the Ray executor (--distributed-executor-backend ray)", "switch"),
    _unsupported("--data-parallel-size", _DIST, type=int, noop=(1,), aliases=("-dp",)),
    _unsupported("--enable-expert-parallel", _DIST, "switch", aliases=("-ep",)),
    _unsupported("--max-parallel-loading-workers", "parallel loading workers", type=int),
    _unsupported("--nnodes", _DIST, type=int, noop=(1,)),
    _unsupported("--node-rank", _DIST, type=int, noop=(0,)),
    _unsupported("--master-addr", _DIST, noop=("127.0.0.1",)),
    _unsupported("--master-port", _DIST, type=int, noop=(29501,)),
    _unsupported("--limit-mm-per-prompt", _MM),
    _unsupported("--mm-processor-kwargs", _MM, type=json_or_text),
    _unsupported("--allowed-local-media-path", _MM, noop=("",)),
    _unsupported("--enable-lora", _LORA, "switch"),
    _unsupported("--enable-lora-bias", _LORA, "switch"),
    _unsupported("--lora-modules", _LORA, "list"),
    _unsupported("--max-loras", _LORA, type=int, noop=(1,)),
    _unsupported("--max-lora-rank", _LORA, type=int, noop=(16,)),
    _unsupported("--lora-extra-vocab-size", _LORA, type=int, noop=(256,)),
    _unsupported("--lora-dtype", _LORA, noop=("auto",)),
    _unsupported("--long-lora-scaling-factors", _LORA),
    _unsupported("--max-cpu-loras", _LORA, type=int),
    _unsupported("--fully-sharded-loras", _LORA, "switch"),
    _unsupported("--qlora-adapter-name-or-path", _LORA),
    _unsupported("--enable-prompt-adapter", "prompt adapters", "switch"),
    _unsupported("--prompt-adapters", "prompt adapters", "list"),
    _unsupported("--max-prompt-adapters", "prompt adapters", type=int, noop=(1,)),
    _unsupported("--max-prompt-adapter-token", "prompt adapters", type=int, noop=(0,)),
    _unsupported("--speculative-config", _SPEC, type=json_or_text),
    _unsupported("--speculative-model", _SPEC),
    _unsupported("--speculative-model-quantization", _SPEC),
    _unsupported("--num-speculative-tokens", _SPEC, type=int),
    _unsupported("--speculative-disable-mqa-scorer", _SPEC, "switch"),
    _unsupported("--speculative-draft-tensor-parallel-size", _SPEC, type=int, aliases=("-spec-draft-tp",)),
    _unsupported("--speculative-max-model-len", _SPEC, type=int),
    _unsupported("--speculative-disable-by-batch-size", _SPEC, type=int),
    _unsupported("--ngram-prompt-lookup-max", _SPEC, type=int),
    _unsupported("--ngram-prompt-lookup-min", _SPEC, type=int),
    _unsupported("--spec-decoding-acceptance-method", _SPEC, noop=("rejection_sampler",)),
    _unsupported("--typical-acceptance-sampler-posterior-threshold", _SPEC, type=float),
    _unsupported("--typical-acceptance-sampler-posterior-alpha", _SPEC, type=float),
    _unsupported("--disable-logprobs-during-spec-decoding", _SPEC, "optional", parse_bool),
)
