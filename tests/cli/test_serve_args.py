"""`kiln serve` takes `vllm serve`'s flags: launch commands from the seeds parse, or stop naming the flag.

No model is loaded and no server starts: `run_server` is replaced by a stub that records the
EngineArgs and ServerConfig that `kiln serve` would have passed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types

import pytest

from kiln.cli import serve_args
from kiln.cli.main import build_parser, main
from kiln.cli.vllm_flags import COMPAT_FLAGS, json_or_text, parse_bool
from kiln.config import EngineArgs, ServerConfig
from kiln.errors import InvalidRequestError, UnsupportedFeatureError

# Every `vllm serve` flag named in shared/seeds 000-004 (003 holds a full `vllm serve -h`).
SEED_FLAGS = """
--additional-config --allow-credentials --allowed-headers --allowed-local-media-path --allowed-methods
--allowed-origins --api-key --block-size --calculate-kv-scales --chat-template --chat-template-content-format
--code-revision --collect-detailed-traces --compilation-config -O --config --config-format --cpu-offload-gb
--data-parallel-size -dp --default-chat-template-kwargs --device --disable-async-output-proc
--disable-cascade-attn --disable-chunked-mm-input --disable-custom-all-reduce --disable-fastapi-docs
--disable-frontend-multiprocessing --disable-log-requests --disable-log-stats
--disable-logprobs-during-spec-decoding --disable-mm-preprocessor-cache --disable-sliding-window
--disable-uvicorn-access-log --distributed-executor-backend --download-dir --dtype --enable-auto-tool-choice
--enable-chunked-prefill --enable-expert-parallel -ep --enable-log-outputs --enable-log-requests --enable-lora
--enable-lora-bias --enable-prefix-caching --no-enable-prefix-caching --enable-prompt-adapter
--enable-prompt-tokens-details --enable-reasoning --enable-request-id-headers --enable-server-load-tracking
--enable-sleep-mode --enable-ssl-refresh --enforce-eager --fully-sharded-loras --generation-config
--gpu-memory-utilization --guided-decoding-backend --hf-config-path --hf-overrides --hf-token --host
--ignore-patterns --kv-cache-dtype --kv-transfer-config --language-model-only --limit-mm-per-prompt
--load-format --logits-processor-pattern --long-lora-scaling-factors --long-prefill-token-threshold
--lora-dtype --lora-extra-vocab-size --lora-modules --master-addr --master-port --max-context-len-to-capture
--max-cpu-loras --max-log-len --max-logprobs --max-long-partial-prefills --max-lora-rank --max-loras
--max-model-len --max-num-batched-tokens --max-num-partial-prefills --max-num-seqs
--max-parallel-loading-workers --max-prompt-adapter-token --max-prompt-adapters --max-seq-len-to-capture
--middleware --mm-processor-kwargs --model --model-impl --model-loader-extra-config --multi-step-stream-outputs
--ngram-prompt-lookup-max --ngram-prompt-lookup-min --nnodes --node-rank --num-gpu-blocks-override
--num-lookahead-slots --num-scheduler-steps --num-speculative-tokens --otlp-traces-endpoint
--override-generation-config --override-neuron-config --override-pooler-config --pipeline-parallel-size -pp
--port --preemption-mode --prefix-caching-hash-algo --prompt-adapters --qlora-adapter-name-or-path
--quantization -q --quantization-param-path --ray-workers-use-nsight --reasoning-parser --response-role
--return-tokens-as-token-ids --revision --root-path --rope-scaling --rope-theta --scheduler-cls
--scheduler-delay-factor --scheduling-policy --seed --served-model-name --show-hidden-metrics-for-version
--skip-tokenizer-init --spec-decoding-acceptance-method --speculative-config --speculative-disable-by-batch-size
--speculative-disable-mqa-scorer --speculative-draft-tensor-parallel-size -spec-draft-tp
--speculative-max-model-len --speculative-model --speculative-model-quantization --ssl-ca-certs --ssl-cert-reqs
--ssl-certfile --ssl-keyfile --swap-space --task --tensor-parallel-size -tp --tokenizer --tokenizer-mode
--tokenizer-pool-extra-config --tokenizer-pool-size --tokenizer-pool-type --tokenizer-revision
--tool-call-parser --tool-parser-plugin --trust-remote-code --typical-acceptance-sampler-posterior-alpha
--typical-acceptance-sampler-posterior-threshold --use-tqdm-on-load --no-use-tqdm-on-load
--use-v2-block-manager --uvicorn-log-level --worker-cls --worker-extension-cls --worker-use-ray
""".split()


@pytest.fixture
def served(monkeypatch):
    """Replace the HTTP server with a stub; returns the dict it fills with the configs it was given."""
    captured: dict = {}
    stub = types.ModuleType("kiln.entrypoints.openai.api_server")

    def run_server(engine_args: EngineArgs, server_config: ServerConfig) -> None:
        captured["engine_args"], captured["server_config"] = engine_args, server_config

    stub.run_server = run_server
    monkeypatch.setitem(sys.modules, "kiln.entrypoints.openai.api_server", stub)
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    return captured


@pytest.fixture
def warnings_log(caplog):
    """kiln's loggers do not propagate to the root logger, where caplog listens: attach it to `kiln`."""
    logger = logging.getLogger("kiln")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="kiln")
    yield caplog
    logger.removeHandler(caplog.handler)


def serve(served: dict, *argv: str) -> tuple[EngineArgs, ServerConfig]:
    assert main(["serve", *argv]) == 0
    return served["engine_args"], served["server_config"]


def serve_fails(capsys, served: dict, *argv: str) -> str:
    """Run `kiln serve` expecting an argparse-style stop (exit 2) before the server; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    assert not served, "the server must not start"
    return capsys.readouterr().err


def test_seed_000_qwen3_launch(served):
    """Seed 000's Qwen3-8B command (python -m ...api_server delegates to main(["serve", *argv]))."""
    engine, server = serve(
        served, "--model", "/root/autodl-tmp/models/Qwen/Qwen3-8B", "--served-model-name", "qwen3-8b",
        "--max-model-len", "8k", "--host", "0.0.0.0", "--port", "6006", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.8",
    )
    assert engine.model == "/root/autodl-tmp/models/Qwen/Qwen3-8B"
    assert (engine.max_model_len, engine.dtype, engine.gpu_memory_utilization) == (8000, "bfloat16", 0.8)
    assert engine.served_model_name == ["qwen3-8b"] and server.served_model_names == ("qwen3-8b",)
    assert (server.host, server.port) == ("0.0.0.0", 6006)


def test_seed_000_tool_and_reasoning_flags_parse_into_the_server_config(served, warnings_log):
    _, server = serve(
        served, "--model", "/m/Qwen3-8B", "--max-model-len", "8k", "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes", "--enable-reasoning", "--reasoning-parser", "deepseek_r1",
    )
    assert server.enable_auto_tool_choice and server.enable_reasoning
    assert (server.tool_call_parser, server.reasoning_parser, server.tool_parser_plugin) == (
        "hermes", "deepseek_r1", None)
    _, plain = serve(served, "--model", "/m/Qwen3-8B")
    assert not plain.enable_auto_tool_choice and plain.tool_call_parser is None and plain.reasoning_parser is None


@pytest.mark.parametrize("argv, fragments", [
    (("--tool-call-parser", "nope"), ["--tool-call-parser 'nope' is unknown", "hermes", "pythonic"]),
    (("--reasoning-parser", "nope"), ["--reasoning-parser 'nope' is unknown", "deepseek_r1", "qwen3"]),
    (("--enable-reasoning",), ["--enable-reasoning needs --reasoning-parser"]),
    (("--tool-parser-plugin", "/no/such/plugin.py"), ["--tool-parser-plugin", "does not exist"]),
])
def test_bad_parser_flags_stop_the_launch(served, capsys, argv, fragments):
    err = serve_fails(capsys, served, "--model", "/m/x", *argv)
    for fragment in fragments:
        assert fragment in err


def test_tool_parser_plugin_registers_a_parser_name(served, tmp_path, monkeypatch):
    from kiln.entrypoints.openai import tool_calling
    from kiln.parsers import ToolParserManager

    monkeypatch.setattr(ToolParserManager, "_classes", dict(ToolParserManager._classes))  # undone afterwards
    monkeypatch.setattr(tool_calling, "_loaded_plugins", set())
    plugin = tmp_path / "my_tool_parser.py"
    plugin.write_text(
        "from kiln.parsers.tools import ToolParserManager\n"
        "from kiln.parsers.tools.hermes import HermesToolParser\n"
        "@ToolParserManager.register_module('my_parser')\n"
        "class MyParser(HermesToolParser):\n"
        "    pass\n")
    _, server = serve(served, "--model", "/m/x", "--tool-parser-plugin", str(plugin), "--tool-call-parser",
                      "my_parser", "--enable-auto-tool-choice")
    assert server.tool_parser_plugin == str(plugin) and server.tool_call_parser == "my_parser"


@pytest.mark.parametrize("tp_flag", ["--tensor-parallel-size", "-tp"])
def test_seed_003_two_gpu_launch_stops_naming_tensor_parallel(served, capsys, tp_flag):
    err = serve_fails(capsys, served, "Qwen/Qwen2.5-14B-Instruct", "--served-model-name", "Qwen2.5-14B-Instruct",
                      tp_flag, "2", "--max-model-len", "16384", "--enforce-eager")
    assert "kiln does not support --tensor-parallel-size 2" in err


def test_seed_003_awq_launch_names_quantization(served, capsys):
    err = serve_fails(capsys, served, "Qwen/QwQ-32B-AWQ", "--quantization", "awq", "--dtype", "half")
    assert "--quantization awq" in err


def test_seed_003_launch_on_one_gpu_parses(served):
    engine, server = serve(served, "Qwen/Qwen2.5-14B-Instruct", "--served-model-name", "Qwen2.5-14B-Instruct",
                           "--tensor-parallel-size", "1", "--max-model-len", "16384", "--enforce-eager")
    assert engine.model == "Qwen/Qwen2.5-14B-Instruct" and engine.enforce_eager
    assert (engine.max_model_len, engine.tensor_parallel_size) == (16384, 1)


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("8k", 8000), ("8K", 8192), ("32K", 32768),
                                           ("1m", 1_000_000), ("16k", 16000)])
def test_max_model_len_takes_suffixes(served, text, expected):
    engine, _ = serve(served, "--max-model-len", text)
    assert engine.max_model_len == expected


def test_bad_max_model_len_names_the_flag(served, capsys):
    err = serve_fails(capsys, served, "--max-model-len", "lots")
    assert "--max-model-len" in err and "'lots'" in err


def test_model_positional_flag_or_embedded_default(served):
    assert serve(served)[0].model is None
    assert serve(served, "some/model")[0].model == "some/model"
    assert serve(served, "--model", "other/model")[0].model == "other/model"
    assert serve(served, "some/model", "--model", "other/model")[0].model == "some/model"


def test_served_model_name_takes_several_names(served):
    engine, server = serve(served, "my/model", "--served-model-name", "a", "b", "--port", "9000")
    assert engine.served_model_name == ["a", "b"]
    assert server.served_model_names == ("a", "b") and server.port == 9000
    assert serve(served, "my/model")[1].served_model_names == ()


def test_json_flags_are_parsed(served):
    _, server = serve(
        served, "--allowed-origins", '["https://a.example", "https://b.example"]', "--allowed-methods", "GET",
        "--default-chat-template-kwargs", '{"enable_thinking": false}',
        "--override-generation-config", '{"temperature": 0.5}',
    )
    assert server.allowed_origins == ("https://a.example", "https://b.example")
    assert server.allowed_methods == ("GET",) and server.allowed_headers == ("*",)
    assert server.default_chat_template_kwargs == {"enable_thinking": False}
    assert server.override_generation_config == {"temperature": 0.5}


def test_bad_json_names_the_flag(served, capsys):
    assert "--override-generation-config" in serve_fails(capsys, served, "--override-generation-config", "{oops")


def test_api_key_from_env_unless_given(served, monkeypatch):
    assert serve(served)[1].api_key is None
    monkeypatch.setenv("KILN_API_KEY", "from-env")
    assert serve(served)[1].api_key == "from-env"
    assert serve(served, "--api-key", "from-flag")[1].api_key == "from-flag"


def test_boolean_flags_and_their_negations(served):
    engine, server = serve(served, "--no-enable-prefix-caching", "--trust-remote-code", "--disable-log-stats",
                           "--enable-request-id-headers")
    assert not engine.enable_prefix_caching and engine.trust_remote_code and engine.disable_log_stats
    assert server.enable_request_id_headers
    assert serve(served)[0].enable_prefix_caching
    assert serve(served, "--enable-prefix-caching")[0].enable_prefix_caching


def test_frontend_multiprocessing_is_on_unless_disabled(served, warnings_log):
    """--disable-frontend-multiprocessing is a working flag now (the engine core on a thread of the
    server process), not a deprecated no-op: no warning."""
    assert not serve(served)[1].disable_frontend_multiprocessing
    assert serve(served, "--disable-frontend-multiprocessing")[1].disable_frontend_multiprocessing
    assert "disable-frontend-multiprocessing" not in warnings_log.text


def test_log_requests_enable_and_disable_agree(served):
    assert not serve(served)[1].enable_log_requests
    assert serve(served, "--enable-log-requests")[1].enable_log_requests
    assert not serve(served, "--disable-log-requests")[1].enable_log_requests
    assert not serve(served, "--enable-log-requests", "--disable-log-requests")[1].enable_log_requests


def test_enable_chunked_prefill_true_passes_false_stops(served, capsys):
    for argv in (["--enable-chunked-prefill"], ["--enable-chunked-prefill", "true"], ["--enable-chunked-prefill=True"]):
        assert serve(served, *argv)[0].enable_chunked_prefill is True
    served.clear()
    assert "--enable-chunked-prefill false" in serve_fails(capsys, served, "--enable-chunked-prefill", "false")
    assert "--enable-chunked-prefill false" in serve_fails(capsys, served, "--no-enable-chunked-prefill")
    with pytest.raises(UnsupportedFeatureError, match="enable-chunked-prefill"):
        EngineArgs(enable_chunked_prefill=False).check_supported()


def test_underscored_flag_names_work_as_in_vllm(served):
    engine, server = serve(served, "--max_model_len=8K", "--gpu_memory_utilization", "0.5", "--api_key", "k")
    assert (engine.max_model_len, engine.gpu_memory_utilization, server.api_key) == (8192, 0.5, "k")


def test_unknown_flag_is_an_error_naming_it(served, capsys):
    err = serve_fails(capsys, served, "my/model", "--max-num-seq", "4", "--frobnicate")
    assert "--frobnicate" in err and "--max-num-seq" in err  # no abbreviation of --max-num-seqs either


def test_invalid_choice_and_static_checks_stop_before_loading(served, capsys):
    assert "--scheduling-policy" in serve_fails(capsys, served, "--scheduling-policy", "lifo")
    assert "--device tpu" in serve_fails(capsys, served, "--device", "tpu")
    assert "--load-format npcache" in serve_fails(capsys, served, "--load-format", "npcache")
    assert "--kv-cache-dtype fp8_inc" in serve_fails(capsys, served, "--kv-cache-dtype", "fp8_inc")
    assert "dtype='int8'" in serve_fails(capsys, served, "--dtype", "int8")
    with pytest.raises(InvalidRequestError):
        EngineArgs(dtype="int8").check_supported()


def test_deprecated_flags_warn_and_the_launch_goes_on(served, warnings_log):
    serve(served, "--use-v2-block-manager", "--swap-space", "4", "--disable-async-output-proc",
          "--num-lookahead-slots", "0", "--scheduler-delay-factor", "0", "--max-seq-len-to-capture", "8192",
          "--tokenizer-pool-size", "0", "--multi-step-stream-outputs", "false", "-O3")
    text = warnings_log.text
    for flag in ("--use-v2-block-manager", "--swap-space", "--disable-async-output-proc", "--num-lookahead-slots",
                 "--scheduler-delay-factor", "--max-seq-len-to-capture", "--tokenizer-pool-size",
                 "--multi-step-stream-outputs", "--compilation-config/-O"):
        assert f"{flag} has no effect" in text
    assert all(r.levelno == logging.WARNING for r in warnings_log.records)


def test_deprecated_flag_with_a_meaningful_value_stops(served, capsys):
    assert "--num-lookahead-slots 4" in serve_fails(capsys, served, "--num-lookahead-slots", "4")
    assert "--scheduler-delay-factor 0.5" in serve_fails(capsys, served, "--scheduler-delay-factor", "0.5")
    assert "--preemption-mode swap" in serve_fails(capsys, served, "--preemption-mode", "swap")


def test_unsupported_flags_pass_with_their_default_value(served, warnings_log):
    serve(served, "--tensor-parallel-size", "1", "-pp", "1", "--cpu-offload-gb", "0", "--max-loras", "1",
          "--distributed-executor-backend", "mp", "--task", "generate", "--no-enable-lora", "-dp", "1")
    assert not warnings_log.records


def test_all_unsupported_flags_are_named_in_one_message(served, capsys):
    err = serve_fails(capsys, served, "--enable-lora", "--cpu-offload-gb", "8", "-tp", "4")
    assert err.count("error:") == 1
    assert "--enable-lora (LoRA adapters)" in err and "--cpu-offload-gb 8.0" in err
    assert "--tensor-parallel-size 4" in err


# --- the YAML config file ----------------------------------------------------------------------------


def test_config_file_precedence_command_line_then_file_then_defaults(served, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "model: from/file\nhost: 127.0.0.1\nport: 6379\nuvicorn-log-level: warning\nmax-model-len: 8k\n"
        "served-model-name: [a, b]\nenable-prefix-caching: false\ntrust_remote_code: true\n"
        "default-chat-template-kwargs: {enable_thinking: false}\nallowed-origins: ['https://x.example']\n"
    )
    engine, server = serve(served, "cli/model", "--config", str(path), "--port", "9000", "--max-model-len", "1m")
    assert engine.model == "cli/model" and (server.port, engine.max_model_len) == (9000, 1_000_000)  # CLI wins
    assert (server.host, server.uvicorn_log_level) == ("127.0.0.1", "warning")  # from the file
    assert engine.served_model_name == ["a", "b"] and server.served_model_names == ("a", "b")
    assert not engine.enable_prefix_caching and engine.trust_remote_code
    assert server.default_chat_template_kwargs == {"enable_thinking": False}
    assert server.allowed_origins == ("https://x.example",)
    assert engine.dtype == "auto" and server.response_role == "assistant"  # defaults
    engine, server = serve(served, f"--config={path}", "--enable-prefix-caching")
    assert engine.model == "from/file" and engine.enable_prefix_caching and engine.max_model_len == 8000


def test_config_file_unknown_keys_are_named(served, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("port: 1\nmax-modle-len: 8k\nfrobnicate: true\n")
    err = serve_fails(capsys, served, "--config", str(path))
    assert str(path) in err and "max-modle-len" in err and "frobnicate" in err


def test_config_file_unsupported_and_deprecated_flags_are_checked(served, capsys, tmp_path, warnings_log):
    path = tmp_path / "c.yaml"
    path.write_text("enable-lora: true\n")
    assert "--enable-lora" in serve_fails(capsys, served, "--config", str(path))
    path.write_text("use-v2-block-manager: true\nenable-lora: false\n")
    serve(served, "--config", str(path))
    assert "--use-v2-block-manager has no effect" in warnings_log.text


def test_config_file_negated_and_optional_booleans(served, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("no-enable-prefix-caching: true\nenable-chunked-prefill: true\ndisable-log-requests: true\n")
    engine, server = serve(served, "--config", str(path))
    assert not engine.enable_prefix_caching and engine.enable_chunked_prefill is True
    assert not server.enable_log_requests
    served.clear()
    path.write_text("enable_chunked_prefill: false\n")
    assert "--enable-chunked-prefill false" in serve_fails(capsys, served, "--config", str(path))


def test_config_file_bad_values_and_shapes_are_errors(served, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: not-a-port\n")
    err = serve_fails(capsys, served, "--config", str(path))
    assert str(path) in err and "--port" in err
    path.write_text("- port\n- 1\n")
    assert "mapping" in serve_fails(capsys, served, "--config", str(path))
    assert "cannot read" in serve_fails(capsys, served, "--config", str(tmp_path / "missing.yaml"))


# --- the flag table and --help -------------------------------------------------------------------


def _sample_argv(action: argparse.Action, flag: str) -> list[str]:
    if action.nargs == 0 or (isinstance(action, serve_args.OptionalValueAction) and action.convert is parse_bool):
        return [flag]
    if action.choices:
        return [flag, str(next(iter(action.choices)))]
    samples = {int: "7", float: "7.5", serve_args._max_model_len: "8k", serve_args._json_str_list: '["*"]',
               serve_args._json_object: '{"a": 1}', serve_args._none_or_str: "gguf", json_or_text: '{"a": 1}'}
    return [flag, samples.get(action.type, "some-value")]


def test_every_flag_in_the_table_is_accepted_by_the_parser(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    table = serve_args.flag_table()
    assert len(table) > 150
    for flag in table:
        _, parser = build_parser()
        action = parser._option_string_actions[flag]
        argv = [flag, str(tmp_path / "empty.yaml")] if flag == "--config" else _sample_argv(action, flag)
        namespace = serve_args.parse_serve_argv(parser, argv)
        assert getattr(namespace, action.dest) is not None, flag


def test_every_seed_flag_is_known():
    _, parser = build_parser()
    assert [flag for flag in SEED_FLAGS if flag not in parser._option_string_actions] == []


@pytest.mark.parametrize("spec", COMPAT_FLAGS, ids=lambda spec: spec.flag)
def test_each_compat_flag_does_what_the_table_says(spec, served, capsys, warnings_log):
    """An ignored flag warns and the launch goes on; an unsupported one, given a real value, stops it."""
    _, parser = build_parser()
    argv = _sample_argv(parser._option_string_actions[spec.flag], spec.flag)
    if spec.status == "ignored" and spec.noop is None:
        serve(served, *argv)
        assert f"{spec.flag}" in warnings_log.text and "has no effect" in warnings_log.text
    else:
        err = serve_fails(capsys, served, *argv)
        assert f"kiln does not support {spec.flag}" in err


def test_help_lists_every_flag_with_a_help_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    _, parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    for flag in serve_args.flag_table():
        assert flag in out


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    from kiln import __version__

    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_a_kiln_error_from_the_server_is_one_line_and_exit_1(monkeypatch, capsys):
    stub = types.ModuleType("kiln.entrypoints.openai.api_server")

    def run_server(engine_args: EngineArgs, server_config: ServerConfig) -> None:
        raise InvalidRequestError("Model 'nope' is not a local path.")

    stub.run_server = run_server
    monkeypatch.setitem(sys.modules, "kiln.entrypoints.openai.api_server", stub)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "nope"])
    assert exit_info.value.code == 1
    assert "Model 'nope' is not a local path." in capsys.readouterr().err


def test_parse_bool_accepts_vllm_spellings():
    assert parse_bool("True") and parse_bool("yes") and parse_bool("1") and not parse_bool("false")
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_the_cli_imports_neither_torch_nor_the_server():
    import subprocess

    code = "import sys, kiln.cli.main; print(sorted(m for m in ('torch', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flags_page_is_current():
    """docs/flags.md is generated from the flag tables; regenerate it with
    `python -m kiln.cli.flags_doc > docs/flags.md` when a flag changes."""
    from pathlib import Path

    from kiln.cli.flags_doc import render

    page = Path(__file__).resolve().parents[2] / "docs" / "flags.md"
    assert page.read_text() == render()


def test_cuda_graph_sizes_flag_reaches_the_engine_args(served):
    engine_args, _ = serve(served, "--cuda-graph-sizes", "1", "2", "8")
    assert engine_args.cuda_graph_sizes == [1, 2, 8]
