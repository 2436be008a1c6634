#!/usr/bin/env bash
# Run ON a lent GPU machine (the device tool), after benchmarks/gpu/prepare_kit.sh here. Four stages:
#   1. correctness: the CUDA tests (float32 greedy parity with transformers on the same GPU, through
#      the Triton kernel, decode CUDA graphs, fp8 caches, ...; tests/engine/test_cuda.py's docstring);
#   2. offline throughput and latency on SmolLM2-135M's shape with dummy weights (bfloat16), with
#      decode graphs, with graphs and --async-scheduling (the larger runs only), and with --enforce-eager;
#   3. kiln serve + kiln bench serve at concurrency 1, 16 and 64 (benchmarks/serve_sweep.sh);
#   4. the same sweep with --async-scheduling (a third call, if the device time allows:
#      run(command="STAGES=4 bash benchmarks/gpu/check.sh", carry=[".device_kit"], timeout_s=300)).
# Each stage has a time limit (stage 1: 5 minutes, the others about 3). With ~15 minutes of device
# time a session, run them as two calls on the same warm machine, so that a failed first call
# leaves time to fix and rerun:
#   run(command="STAGES=1 bash benchmarks/gpu/check.sh", carry=[".device_kit"], timeout_s=360)
#   run(command="STAGES='2 3' bash benchmarks/gpu/check.sh", carry=[".device_kit"], timeout_s=420)
# Up to six files come back under $OUT (a call returns at most 8): env.txt, tests.log, junit.xml,
# bench.txt (each benchmark's lines and JSON), sweep.txt (the same for serving) and server.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu-check}
STAGES=${STAGES:-1 2 3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 KILN_TEST_TOKENIZER=$PWD/.device_kit/smollm2
export PYTHONPATH=/tmp/site:$PWD
MODEL=.device_kit/smollm2
KILN="python3 -m kiln.cli.main"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device_kit/wheels/*.whl || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  python3 -c "import sys, importlib.metadata as m, torch
print('python', sys.version.split()[0], 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and
      torch.cuda.get_device_name(), *(f'{n} {m.version(n)}' for n in ('torch', 'triton', 'transformers', 'xgrammar')))"
} 2>&1 | tee "$OUT/env.txt"

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage 1; then
  echo "== 1. CUDA tests" | tee -a "$OUT/env.txt"
  timeout 300 python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    tests/engine/test_cuda.py tests/engine/test_tiny_archs.py tests/models/test_attention.py -k cuda \
    > "$OUT/tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/tests.log"
  tail -15 "$OUT/tests.log"
fi

if stage 2; then
  echo "== 2. offline benchmarks (dummy weights, bfloat16)" | tee "$OUT/bench.txt"
  mkdir -p /tmp/kiln-bench
  common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --skip-tokenizer-init --disable-log-stats)
  for mode in graphs async eager; do
    flags=(); [ "$mode" = eager ] && flags=(--enforce-eager)
    [ "$mode" = async ] && flags=(--async-scheduling)
    for prompts in 64 1024; do
      [ "$mode" = async ] && [ $prompts = 64 ] && continue
      echo "-- throughput, $mode, $prompts prompts of 256 + 128 tokens" | tee -a "$OUT/bench.txt"
      timeout 120 $KILN bench throughput "${common[@]}" "${flags[@]}" --input-len 256 --output-len 128 \
        --num-prompts $prompts --disable-tqdm --output-json /tmp/kiln-bench/result.json 2>&1 \
        | grep -v -E '^INFO |Iterations:' | tee -a "$OUT/bench.txt"
      cat /tmp/kiln-bench/result.json >> "$OUT/bench.txt"; echo >> "$OUT/bench.txt"
    done
    for batch in 1 64; do
      [ "$mode" = async ] && [ $batch = 1 ] && continue
      echo "-- latency, $mode, batch $batch, 256 + 128 tokens" | tee -a "$OUT/bench.txt"
      timeout 120 $KILN bench latency "${common[@]}" "${flags[@]}" --input-len 256 --output-len 128 \
        --batch-size $batch --num-iters-warmup 3 --num-iters 10 --output-json /tmp/kiln-bench/result.json 2>&1 \
        | grep -v -E '^INFO |Iterations:' | tee -a "$OUT/bench.txt"
      cat /tmp/kiln-bench/result.json >> "$OUT/bench.txt"; echo >> "$OUT/bench.txt"
    done
  done
fi

if stage 3; then
  echo "== 3. serving sweep (dummy weights, bfloat16)" | tee "$OUT/sweep.txt"
  KILN="$KILN" OUT_DIR=/tmp/kiln-sweep timeout 240 bash benchmarks/serve_sweep.sh --model "$MODEL" \
    --load-format dummy 2>&1 | tee -a "$OUT/sweep.txt"
  cat /tmp/kiln-sweep/c*.json >> "$OUT/sweep.txt" 2>/dev/null
  cp /tmp/kiln-sweep/server.log "$OUT/server.log" 2>/dev/null
fi

if stage 4; then
  echo "== 4. serving sweep with --async-scheduling (dummy weights, bfloat16)" | tee "$OUT/sweep.txt"
  KILN="$KILN" OUT_DIR=/tmp/kiln-sweep-async timeout 240 bash benchmarks/serve_sweep.sh --model "$MODEL" \
    --load-format dummy --async-scheduling 2>&1 | tee -a "$OUT/sweep.txt"
  cat /tmp/kiln-sweep-async/c*.json >> "$OUT/sweep.txt" 2>/dev/null
  cp /tmp/kiln-sweep-async/server.log "$OUT/server.log" 2>/dev/null
fi
