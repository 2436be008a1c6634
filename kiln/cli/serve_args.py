"""`kiln serve` arguments: the flags of `vllm serve`, parsed into `EngineArgs` and `ServerConfig`.

Where each flag goes (`flag_table()` lists them all):

| flags | source | destination |
| --- | --- | --- |
| one per field (`max_model_len` -> `--max-model-len`) | `EngineArgs` fields | `EngineArgs` |
| one per field | `ServerConfig` fields | `ServerConfig` |
| `--served-model-name` | `EngineArgs.served_model_name` | both (`ServerConfig.served_model_names`) |
| `MODEL` (positional), `--model` | | `EngineArgs.model` |
| `-tp`, `-pp`, `-q` | `_FIELD_FLAGS` (aliases) | their field |
| `--disable-log-requests` | vLLM's older inverse flag | `ServerConfig.enable_log_requests` |
| `--tool-call-parser`, `--reasoning-parser`, `--tool-parser-plugin` | `ServerConfig` fields | checked here (plugin imported, names known) |
| deprecated, no-effect and unsupported flags | `vllm_flags.COMPAT_FLAGS` | a warning, or exit 2 |
| `--config FILE.yaml` | long flag names as keys | precedence: command line > file > defaults |

The field docstrings are the `--help` texts. Nothing here loads a model or imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from kiln.cli.vllm_flags import COMPAT_FLAGS, CompatFlag, json_or_text, parse_bool
from kiln.config import EngineArgs, ServerConfig, env_api_key, field_docs, parse_max_model_len
from kiln.errors import KilnError
from kiln.logger import init_logger

logger = init_logger(__name__)

_ENGINE_SKIP = ("model", "extra")
_SERVER_SKIP = ("served_model_names",)
_LOG_LEVELS = ("critical", "debug", "error", "info", "trace", "warning")

# Per-field extras beyond what the type annotation gives: vLLM's short aliases and choices.
_FIELD_FLAGS: dict[str, dict[str, Any]] = {
    "tensor_parallel_size": {"aliases": ("-tp",)},
    "pipeline_parallel_size": {"aliases": ("-pp",)},
    "quantization": {"aliases": ("-q",)},
    "scheduling_policy": {"choices": ("fcfs", "priority")},
    "prefix_caching_hash_algo": {"choices": ("builtin", "sha256")},
    "uvicorn_log_level": {"choices": _LOG_LEVELS},
    "chat_template_content_format": {"choices": ("auto", "string", "openai")},
}


class KilnArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors can name where the arguments came from (a config file)."""

    error_context: str | None = None

    def error(self, message: str) -> Any:
        if self.error_context:
            message = f"{self.error_context}: {message}"
        return super().error(message)


class OptionalValueAction(argparse.Action):
    """`--flag`, `--flag VALUE` (and `--no-flag` for booleans): vLLM's `--enable-chunked-prefill [BOOL]`."""

    def __init__(self, option_strings: list[str], dest: str, convert: Any = parse_bool,
                 negatable: bool = True, **kwargs: Any) -> None:
        self.convert = convert
        if negatable:
            option_strings = [*option_strings, "--no-" + option_strings[0].removeprefix("--")]
        kwargs.setdefault("metavar", "BOOL" if convert is parse_bool else None)
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            value: Any = False
        elif values is None:
            value = True
        else:
            try:
                value = self.convert(values)
            except ValueError as exc:
                raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, value)


def _max_model_len(text: str) -> int | None:
    try:
        return parse_max_model_len(text)
    except KilnError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _none_or_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _json_object(text: str) -> dict[str, Any]:
    value = json_or_text(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object such as '{{\"key\": 1}}'")
    return value


def _json_str_list(text: str) -> list[str]:
    """A JSON list of strings as vLLM takes them ('["*"]'), or one plain string."""
    value = json_or_text(text)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, str):
        return [value]
    raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings such as '[\"*\"]'")


def _help(doc: str | None, default: Any) -> str:
    text = (doc or "").replace("%", "%%")
    if default not in (None, False, "", ()) and not isinstance(default, dict):
        text += f" (default: {list(default) if isinstance(default, tuple) else default})".replace("%", "%%")
    return text


def _field_kwargs(f: dataclasses.Field, doc: str | None) -> dict[str, Any]:
    """argparse keywords for one dataclass field, from its type annotation (a string here)."""
    annotation = str(f.type)
    default = f.default if f.default is not dataclasses.MISSING else None
    extras = _FIELD_FLAGS.get(f.name, {})
    kwargs: dict[str, Any] = {"default": default, "help": _help(doc, default), "dest": f.name}
    if "choices" in extras:
        kwargs["choices"] = extras["choices"]
    if f.name == "max_model_len":
        kwargs["type"] = _max_model_len
    elif f.name == "quantization":
        kwargs["type"] = _none_or_str
    elif annotation == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif annotation == "bool | None":
        kwargs["action"] = OptionalValueAction
    elif "list[str]" in annotation:
        kwargs["nargs"] = "+"
    elif annotation == "list[int] | None":
        kwargs.update(nargs="+", type=int)
    elif annotation == "tuple[str, ...]":
        kwargs["type"] = _json_str_list
    elif annotation.startswith("dict["):
        kwargs["type"] = _json_object
    elif annotation in ("int", "int | None"):
        kwargs["type"] = int
    elif annotation in ("float", "float | None"):
        kwargs["type"] = float
    elif annotation not in ("str", "str | None"):
        raise TypeError(f"No command-line form for field {f.name}: {annotation}; add one in serve_args.")
    return kwargs


def _add_field_flags(group: argparse._ArgumentGroup, cls: type, skip: Sequence[str]) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *_FIELD_FLAGS.get(f.name, {}).get("aliases", ())]
        group.add_argument(*flags, **_field_kwargs(f, docs.get(f.name)))


def add_engine_field_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (all but the model), for every command that builds an engine."""
    _add_field_flags(parser.add_argument_group("engine"), EngineArgs, _ENGINE_SKIP)


def engine_kwargs_of(values: dict[str, Any]) -> dict[str, Any]:
    """The EngineArgs keyword arguments among parsed flag values (the model excluded)."""
    return {f.name: values[f.name] for f in dataclasses.fields(EngineArgs) if f.name not in _ENGINE_SKIP}


def _add_compat_flag(group: argparse._ArgumentGroup, spec: CompatFlag) -> None:
    kwargs: dict[str, Any] = {"default": None, "dest": spec.dest, "help": spec.what.replace("%", "%%")}
    if spec.arity == "switch":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.arity == "optional":
        kwargs.update(action=OptionalValueAction, convert=spec.type, negatable=spec.type is parse_bool)
    else:
        kwargs["type"] = spec.type
        if spec.arity == "list":
            kwargs["nargs"] = "+"
    group.add_argument(spec.flag, *spec.aliases, **kwargs)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Every `kiln serve` flag: the model, --config, the config fields, and the compatibility table."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="Model directory, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--model", default=None, help="The model, as the positional argument (which wins).")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="A YAML file of flags (long names as keys); the command line wins over it.")
    add_engine_field_flags(parser)
    server = parser.add_argument_group("server")
    _add_field_flags(server, ServerConfig, _SERVER_SKIP)
    server.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_const", const=False,
                        help="The inverse of --enable-log-requests (vLLM's older flag).")
    server.add_argument("--no-disable-log-requests", dest="enable_log_requests", action="store_const", const=True,
                        help=argparse.SUPPRESS)
    ignored = parser.add_argument_group("accepted for vLLM compatibility, with a warning (no effect in kiln)")
    unsupported = parser.add_argument_group("not supported by kiln yet (the launch stops; defaults pass)")
    for spec in COMPAT_FLAGS:
        _add_compat_flag(ignored if spec.status == "ignored" else unsupported, spec)


def flag_table() -> dict[str, str]:
    """Every long flag of `kiln serve` -> where it goes (a config field, or what happens)."""
    table: dict[str, str] = {"--model": "EngineArgs.model", "--config": "read as flags"}
    for cls, skip in ((EngineArgs, _ENGINE_SKIP), (ServerConfig, _SERVER_SKIP)):
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                table["--" + f.name.replace("_", "-")] = f"{cls.__name__}.{f.name}"
    table["--served-model-name"] += " + ServerConfig.served_model_names"
    table["--disable-log-requests"] = "ServerConfig.enable_log_requests (inverse)"
    for spec in COMPAT_FLAGS:
        table[spec.flag] = spec.status
    return table


# --- the --config file ---------------------------------------------------------------------------


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--max_model_len=8k` -> `--max-model-len=8k`: vLLM takes flag names with underscores too."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        out.append(token)
    return out


def _find_config(argv: Sequence[str]) -> str | None:
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.partition("=")[2]
    return path


def _config_tokens(parser: argparse.ArgumentParser, key: str, value: Any) -> list[str]:
    """One YAML entry as command-line tokens (raises KeyError for an unknown key)."""
    flag = "--" + str(key).replace("_", "-")
    if flag == "--config":
        raise KeyError(key)
    action = parser._option_string_actions[flag]  # KeyError: unknown key
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        positive = action.option_strings[0]
        on = parse_bool(value) != (flag != positive and flag.startswith("--no-"))
        return [positive] if on else ["--no-" + positive.removeprefix("--")]
    if isinstance(action, argparse._StoreConstAction):
        return [flag] if parse_bool(value) else []
    if isinstance(value, bool):
        return [f"{flag}={str(value).lower()}"]
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in items)]
    if isinstance(value, (dict, list)):
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={value}"]


def apply_config_file(parser: KilnArgumentParser, path: str) -> None:
    """Make the file's values the parser's defaults, so that the command line still wins."""
    import yaml

    parser.error_context = f"config file {path}"
    try:
        with open(path, encoding="utf-8") as file:
            content = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read it: {exc}")
    if content is None:
        content = {}
    if not isinstance(content, dict):
        parser.error("it must be a mapping of flag names to values, such as `max-model-len: 8k`")
    tokens: list[str] = []
    unknown: list[str] = []
    for key, value in content.items():
        try:
            tokens += _config_tokens(parser, key, value)
        except KeyError:
            unknown.append(str(key))
        except ValueError as exc:
            parser.error(f"{key}: {exc}")
    if unknown:
        parser.error(f"unknown key(s) {', '.join(unknown)} (keys are the long flag names, such as max-model-len)")
    values = parser.parse_args(tokens)
    dests = {parser._option_string_actions["--" + str(k).replace("_", "-")].dest for k in content}
    parser.set_defaults(**{dest: getattr(values, dest) for dest in dests})
    parser.error_context = None


def parse_serve_argv(parser: KilnArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `kiln serve` arguments, reading --config first (command line > config file > defaults)."""
    argv = normalize_argv(argv)
    config_path = _find_config(argv)
    if config_path is not None:
        apply_config_file(parser, config_path)
    return parser.parse_args(argv)


# --- namespace -> configs ------------------------------------------------------------------------


def _check_compat_flags(namespace: argparse.Namespace) -> list[str]:
    """Warn about ignored flags; return the unsupported ones as `--flag VALUE (what)`."""
    problems = []
    for spec in COMPAT_FLAGS:
        value = getattr(namespace, spec.dest, None)
        if value is None:
            continue
        if not spec.is_noop(value):
            shown = "" if value is True else " " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
            problems.append(f"{spec.flag}{shown} ({spec.what})")
        elif spec.status == "ignored":
            logger.warning("%s has no effect: %s.", "/".join((spec.flag, *spec.aliases)), spec.what)
    return problems


def configs_from(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> tuple[EngineArgs, ServerConfig]:
    """Build the two configs, or stop (exit 2) naming every flag kiln cannot honour."""
    problems = _check_compat_flags(namespace)
    values = vars(namespace)
    engine_kwargs = engine_kwargs_of(values)
    engine_args = EngineArgs(model=namespace.model_tag or namespace.model, **engine_kwargs)
    messages = [f"kiln does not support {', '.join(problems)} yet."] if problems else []
    try:
        engine_args.check_supported()
    except KilnError as exc:
        messages.append(str(exc))
    if messages:
        parser.error(" ".join(messages))
    server_kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name in _SERVER_SKIP:
            continue
        value = values[f.name]
        server_kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    names = engine_args.served_model_name
    server_kwargs["served_model_names"] = tuple([names] if isinstance(names, str) else names or ())
    server_kwargs["api_key"] = server_kwargs["api_key"] or env_api_key()
    server_config = ServerConfig(**server_kwargs)
    from kiln.entrypoints.openai.tool_calling import check_parser_flags  # imports the parsers, not torch

    parser_problems = check_parser_flags(server_config)
    if parser_problems:
        parser.error(" ".join(parser_problems))
    return engine_args, server_config


def serve(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> int:
    """`kiln serve`: build the configs, then run the server until SIGINT/SIGTERM."""
    engine_args, server_config = configs_from(parser, namespace)
    from kiln.entrypoints.openai.api_server import run_server  # lazy: --help and parsing stay light

    try:
        run_server(engine_args, server_config)
    except KilnError as exc:  # a bad model path, a model kiln cannot run: one line, no traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0

