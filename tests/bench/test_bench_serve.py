"""`kiln bench serve` end to end against the fake streaming server (conftest.py), and its arrival schedule.

Timing assertions are lower bounds that follow from the fake's schedule (a chunk cannot arrive
before the server sends it) and summaries checked against the per-request samples they come from;
nothing bounds a duration from above, and nothing here times kiln itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics

import pytest
from fake_openai_server import MODEL_ID, FakeSchedule

from kiln.bench import serve
from kiln.bench.datasets import random_serve_requests, random_token_prompt
from kiln.cli.main import build_parser, main

VLLM_FIELDS = (
    "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "duration", "max_concurrency", "request_rate",
    "num_prompts", "input_lens", "output_lens", "ttfts", "itls", "errors",
)


def run_cli(url: str, tmp_path, *extra: str, num_prompts: int = 6, output_len: int = 4) -> tuple[int, dict]:
    path = tmp_path / "result.json"
    code = main(["bench", "serve", "--base-url", url, "--num-prompts", str(num_prompts),
                 "--random-input-len", "8", "--random-output-len", str(output_len), "--disable-tqdm",
                 "--result-filename", str(path), *extra])
    return code, json.loads(path.read_text()) if path.exists() else {}


def test_metrics_follow_the_fake_schedule_and_the_file_has_vllm_names(fake_server, tmp_path, capsys, monkeypatch):
    schedule = FakeSchedule(first_token_delay=0.2, token_gap=0.05)
    fake = fake_server(schedule)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    code, result = run_cli(fake.url, tmp_path, "--max-concurrency", "2", "--ignore-eos")
    assert code == 0
    assert set(VLLM_FIELDS) <= set(result)
    assert (result["completed"], result["failed"], result["num_prompts"]) == (6, 0, 6)
    assert result["max_concurrency"] == 2 and result["request_rate"] == "inf"
    assert result["model_id"] == MODEL_ID and fake.models_calls == 1  # the first id of /v1/models
    assert result["total_output_tokens"] == 6 * 4 and result["output_lens"] == [4] * 6
    assert result["total_input_tokens"] == 6 * 8 and result["input_lens"] == [8] * 6  # the server's usage
    assert result["errors"] == [""] * 6
    # Bounds from the schedule: the first chunk leaves the server 0.2 s after the request arrives,
    # the last one 3 gaps later.
    assert all(t >= schedule.first_token_delay for t in result["ttfts"])
    assert result["mean_ttft_ms"] >= 200
    assert result["median_ttft_ms"] == pytest.approx(statistics.median(result["ttfts"]) * 1000)
    assert result["mean_e2el_ms"] >= 200 + 3 * 50 and result["p99_e2el_ms"] >= result["median_e2el_ms"]
    assert all(len(gaps) == 3 for gaps in result["itls"])
    gaps = [gap for request_gaps in result["itls"] for gap in request_gaps]
    assert all(gap >= 0 for gap in gaps)
    assert result["median_itl_ms"] == pytest.approx(statistics.median(gaps) * 1000)
    # TPOT = (E2E - TTFT) / (4 - 1) for every request, so the means obey the same relation
    assert result["mean_tpot_ms"] == pytest.approx((result["mean_e2el_ms"] - result["mean_ttft_ms"]) / 3)
    assert result["mean_tpot_ms"] > 0
    assert result["duration"] >= 2 * (0.2 + 3 * 0.05)  # 6 requests, 2 at a time: 3 rounds, less slack
    assert math.isclose(result["request_throughput"], 6 / result["duration"])
    assert math.isclose(result["total_token_throughput"], (48 + 24) / result["duration"])
    # What went over the wire.
    assert fake.peak == 2  # the limit is reached and never passed
    body = fake.bodies[0]
    assert body["model"] == MODEL_ID and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 4
    assert len(body["prompt"].split()) == 8
    assert len({b["prompt"] for b in fake.bodies}) == 6
    assert fake.headers[0]["authorization"] == "Bearer sk-env"
    table = capsys.readouterr().out
    for line in ("Serving Benchmark Result", "Successful requests:", "Maximum request concurrency:",
                 "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P99 E2EL (ms):"):
        assert line in table


def test_unlimited_concurrency_sends_everything_at_once(fake_server, tmp_path):
    fake = fake_server(FakeSchedule(first_token_delay=0.3))
    code, result = run_cli(fake.url, tmp_path)
    assert code == 0 and result["completed"] == 6 and result["max_concurrency"] is None
    assert fake.peak > 2
    assert "ignore_eos" not in fake.bodies[0] and "authorization" not in fake.headers[0]


def test_a_failed_request_is_counted_with_its_message(fake_server, tmp_path):
    fake = fake_server(FakeSchedule(fail=frozenset({2})))
    code, result = run_cli(fake.url, tmp_path, "--max-concurrency", "3")
    assert code == 0
    assert (result["completed"], result["failed"]) == (5, 1)
    assert result["total_output_tokens"] == 5 * 4
    failed = [e for e in result["errors"] if e]
    assert len(failed) == 1 and failed[0].startswith("HTTP 500") and "injected failure" in failed[0]
    assert sorted(result["output_lens"]) == [0, 4, 4, 4, 4, 4]


def test_a_request_past_the_timeout_fails_alone(fake_server, tmp_path):
    fake = fake_server(FakeSchedule(hang=frozenset({0}), hang_s=5.0, first_token_delay=0.05, token_gap=0.01))
    code, result = run_cli(fake.url, tmp_path, "--timeout", "0.6", num_prompts=3)
    assert code == 0 and (result["completed"], result["failed"]) == (2, 1)
    assert [e for e in result["errors"] if e] == ["timed out after 0.6 s"]


def test_chat_endpoint_skips_the_empty_role_chunk(fake_server, tmp_path):
    fake = fake_server(FakeSchedule(first_token_delay=0.25, token_gap=0.02))
    code, result = run_cli(fake.url, tmp_path, "--endpoint", "/v1/chat/completions", "--model", "given",
                           "--api-key", "sk-flag", num_prompts=3, output_len=3)
    assert code == 0 and result["completed"] == 3 and result["total_output_tokens"] == 9
    assert fake.models_calls == 0 and fake.bodies[0]["model"] == "given"
    assert fake.bodies[0]["messages"][0]["role"] == "user" and fake.bodies[0]["max_completion_tokens"] == 3
    assert fake.headers[0]["authorization"] == "Bearer sk-flag"
    assert all(t >= 0.25 for t in result["ttfts"])  # the role chunk came at once; content 0.25 s later
    assert all(len(gaps) == 2 for gaps in result["itls"])
    assert result["generated_texts"][0] == "tok0 tok1 tok2 "


class WordTokenizer:
    """One token per space-separated word of a fixed vocabulary (a stand-in for an HF tokenizer)."""

    all_special_ids = [0]

    def __init__(self) -> None:
        self.vocab = ["<s>"] + [f"w{i}" for i in range(50)] + [f"tok{i}" for i in range(10)]

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.index(w) for w in text.split()]


def _args(url: str, *extra: str):
    parser, _ = build_parser()
    return parser.parse_args(["bench", "serve", "--base-url", url, "--random-input-len", "7",
                              "--random-output-len", "3", "--num-prompts", "3", "--disable-tqdm", *extra])


def test_without_usage_the_tokenizer_counts_output_and_sizes_prompts(fake_server):
    fake = fake_server(FakeSchedule(first_token_delay=0.01, token_gap=0.01, send_usage=False))
    result = asyncio.run(serve.benchmark(_args(fake.url), tokenizer=WordTokenizer()))
    assert result["completed"] == 3 and result["output_lens"] == [3, 3, 3]
    assert result["input_lens"] == [7, 7, 7] and result["total_input_tokens"] == 21
    assert all(len(b["prompt"].split()) == 7 and "<s>" not in b["prompt"] for b in fake.bodies)


def test_without_usage_or_tokenizer_each_content_chunk_is_a_token(fake_server):
    fake = fake_server(FakeSchedule(first_token_delay=0.01, token_gap=0.01, send_usage=False))
    result = asyncio.run(serve.benchmark(_args(fake.url)))
    assert result["output_lens"] == [3, 3, 3] and result["input_lens"] == [0, 0, 0]


def test_an_unreachable_server_is_one_error_line(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: connection refused
        assert main(["bench", "serve", "--base-url", url, "--disable-tqdm"]) == 1
        assert "cannot list models" in capsys.readouterr().err
        code, result = run_cli(url, tmp_path, "--model", "m", num_prompts=2)
    assert code == 1 and result["completed"] == 0 and result["failed"] == 2
    assert all(e.startswith("ConnectError") for e in result["errors"])


def test_arrival_schedule_is_seeded_poisson():
    times = serve.arrival_times(2000, 4.0, seed=7)
    assert times == serve.arrival_times(2000, 4.0, seed=7)
    assert times != serve.arrival_times(2000, 4.0, seed=8)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.15)  # exponential: stdev = mean
    even = serve.arrival_times(2000, 4.0, seed=7, burstiness=20.0)
    even_gaps = [b - a for a, b in zip([0.0, *even], even)]
    assert statistics.mean(even_gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(even_gaps) < statistics.stdev(gaps) / 2
    assert serve.arrival_times(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError):
        serve.arrival_times(3, 0.0, seed=0)


def test_request_rate_paces_the_run(fake_server, tmp_path):
    fake = fake_server(FakeSchedule(first_token_delay=0.01, token_gap=0.01))
    code, result = run_cli(fake.url, tmp_path, "--request-rate", "20", "--seed", "3", num_prompts=5, output_len=2)
    assert code == 0 and result["request_rate"] == 20.0
    assert result["duration"] >= serve.arrival_times(5, 20.0, seed=3)[-1]


def test_prompts_are_seeded_and_distinct():
    a = random_serve_requests(4, 16, 8, seed=1)
    assert a == random_serve_requests(4, 16, 8, seed=1) and a != random_serve_requests(4, 16, 8, seed=2)
    assert len({r.prompt for r in a}) == 4 and all(len(r.prompt.split()) == 16 for r in a)


class MergingTokenizer:
    """Greedy longest match over {"a", "b", "ab"}: decoding then encoding can merge tokens."""

    all_special_ids: list[int] = []
    vocab = ["a", "b", "ab"]

    def __len__(self) -> int:
        return 3

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            step = 2 if text.startswith("ab", i) else 1
            ids.append(self.vocab.index(text[i:i + step]))
            i += step
        return ids


def test_token_prompts_report_their_true_length():
    import random

    tokenizer = MergingTokenizer()
    for seed in range(20):
        text, num_tokens = random_token_prompt(tokenizer, 12, random.Random(seed))
        assert num_tokens == len(tokenizer.encode(text))
