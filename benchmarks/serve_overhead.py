"""The server's host-side cost per streamed token, with the model taken out.

`kiln serve` runs in a child process with its model stubbed as in engine_overhead.py (the forward
and LM head return preallocated tensors; `--step-ms` makes each forward sleep that long with the
GIL released, as a host thread waiting on a GPU does). `kiln bench serve` then streams
completions from it. What is left is everything a token costs besides the model: HTTP, SSE and
JSON, the asyncio streams, tokenization, the engine's scheduling, input preparation, sampling and
detokenization. On a GPU serving a small model that is the bottleneck; on this CPU it takes
cores from the model.

Reported per run: output tokens/s, and the server's CPU time per output token, split between its
main thread (the event loop: HTTP and the OpenAI layer), its engine thread (output processing and
detokenization; with --disable-frontend-multiprocessing also scheduling, the runner and the
sampler's argmax over the stub logits on one thread), the engine core process (those, by default)
and any other thread. CPU time is the steadier figure on a shared 2-core machine: the bench client
runs on the same cores. The core process gets its stub when it imports this file as its main
module (multiprocessing's spawn does), told the step time by an environment variable.

    python benchmarks/serve_overhead.py --concurrency 64 --num-prompts 256
    python benchmarks/serve_overhead.py --concurrency 64 --step-ms 5    # a "GPU" step of 5 ms
    python benchmarks/serve_overhead.py --concurrency 64 --disable-frontend-multiprocessing
    python benchmarks/serve_overhead.py --concurrency 64 --device-ms 3 [--async-scheduling]

`--device-ms` simulates an asynchronous device instead (engine_overhead.simulate_device): a step
occupies it after the one before, and only reading the step's tokens back waits. Flags the script
does not know (`--async-scheduling`, ...) go to `kiln serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KILN_SERVE_FLAGS = ["--load-format", "dummy", "--max-model-len", "2048", "--no-enable-prefix-caching",
                    "--disable-uvicorn-access-log", "--disable-log-stats"]


STEP_MS_ENV = "KILN_SERVE_OVERHEAD_STEP_MS"
DEVICE_MS_ENV = "KILN_SERVE_OVERHEAD_DEVICE_MS"


def stub_engine_cores(step_ms: float, device_ms: float) -> None:
    """Stub the model of every EngineCore this process builds, right after it is built."""
    import torch

    from engine_overhead import simulate_device, stub_runner_model
    from kiln.engine.core import EngineCore

    build = EngineCore.__init__

    def build_stubbed(self: EngineCore, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        # torch's work left (the argmax over stub logits) runs on this thread: an OpenMP team
        # would spin ~8 ms after every step on a core the event loop needs
        torch.set_num_threads(1)
        stub_runner_model(self.worker.model_runner, self.config.model_config.hf_config,
                          max_rows=4096, step_seconds=step_ms / 1e3)
        if device_ms:
            simulate_device(self.worker.model_runner, device_ms / 1e3)

    EngineCore.__init__ = build_stubbed


if __name__ == "__mp_main__" and STEP_MS_ENV in os.environ:  # the engine core process of `kiln serve`
    stub_engine_cores(float(os.environ[STEP_MS_ENV]), float(os.environ[DEVICE_MS_ENV]))


def serve_stubbed(port: int, step_ms: float, device_ms: float, tid_file: str, extra: list[str]) -> None:
    """Run `kiln serve` in this process with every engine core's model stubbed (here, or in the core
    process it spawns); the native id of the engine thread goes to `tid_file`."""
    import threading

    import kiln.engine.async_llm as async_llm
    from kiln.cli.main import main

    class RecordedEngine(async_llm.LLMEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            Path(tid_file).write_text(str(threading.get_native_id()))

    os.environ[STEP_MS_ENV], os.environ[DEVICE_MS_ENV] = str(step_ms), str(device_ms)
    stub_engine_cores(step_ms, device_ms)
    async_llm.LLMEngine = RecordedEngine
    sys.exit(main(["serve", "--port", str(port), *KILN_SERVE_FLAGS, *extra]))


def child_pids(pid: int) -> list[int]:
    """The children of all of a process's threads (the engine thread spawns the core process)."""
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            pids += [int(p) for p in children.read().split()]
    return pids


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(port: int, server: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    """Until /health answers and the idle engine has faulted its KV cache in (work that would
    otherwise count against the first run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            text = log.read_text()
            if "fully faulted in" in text or "lazily mapped" in text or "on cpu" not in text:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def bench(port: int, args: argparse.Namespace, out_dir: str, seed: int) -> dict:
    kiln = Path(sys.executable).with_name("kiln")
    subprocess.run([str(kiln), "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", args.endpoint,
                    "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len), "--ignore-eos", "--seed", str(seed),
                    "--max-concurrency", str(args.concurrency), "--disable-tqdm", "--save-result",
                    "--result-dir", out_dir, "--result-filename", "result.json"],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "result.json")) as result:
        return json.load(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    parser.add_argument("--step-ms", type=float, default=0.0, help="each stubbed forward sleeps this long")
    parser.add_argument("--device-ms", type=float, default=0.0, help="simulate a device taking this long per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tid-file", default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.serve_port is not None:
        serve_stubbed(args.serve_port, args.step_ms, args.device_ms, args.tid_file, extra)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        log, tid_file = Path(out_dir, "server.log"), Path(out_dir, "engine.tid")
        with open(log, "w") as log_stream:
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve-port", str(port), "--step-ms", str(args.step_ms),
                 "--device-ms", str(args.device_ms),
                 "--tid-file", str(tid_file), "--max-num-seqs", str(max(args.concurrency, 1)), *extra],
                stdout=log_stream, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, server, log)
            engine_tid = int(tid_file.read_text())
            bench(port, argparse.Namespace(**{**vars(args), "num_prompts": args.concurrency}), out_dir, seed=99)
            core_pids = child_pids(server.pid)  # the engine core process, unless it runs in-process
            print(f"{'c':>4} {'tok/s':>8} {'TPOT ms':>8} | server CPU us/token: {'all':>6} {'main':>6} "
                  f"{'engine':>6} {'core':>6} {'other':>6}")
            for repeat in range(args.repeats):
                before = [cpu_seconds(server.pid), cpu_seconds(server.pid, server.pid),
                          cpu_seconds(server.pid, engine_tid), sum(cpu_seconds(p) for p in core_pids)]
                result = bench(port, args, out_dir, seed=repeat)
                after = [cpu_seconds(server.pid), cpu_seconds(server.pid, server.pid),
                         cpu_seconds(server.pid, engine_tid), sum(cpu_seconds(p) for p in core_pids)]
                frontend, main_thread, engine, core = ((b - a) / result["total_output_tokens"] * 1e6
                                                       for a, b in zip(before, after))
                print(f"{args.concurrency:>4} {result['output_throughput']:>8.1f} {result['median_tpot_ms']:>8.2f} | "
                      f"{'':>20} {frontend + core:>6.1f} {main_thread:>6.1f} {engine:>6.1f} {core:>6.1f} "
                      f"{frontend - main_thread - engine:>6.1f}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
