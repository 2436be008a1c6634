#!/usr/bin/env bash
# kiln serve + kiln bench serve at concurrency 1, 16 and 64 (256 prompt tokens, 128 output
# tokens, ignore_eos), the workload of the vLLM-CPU reference numbers in benchmarks/README.md.
# Each concurrency level draws its own prompts (seed = concurrency): with one seed the later runs
# would find the earlier runs' prompts in the prefix cache and skip their prefill.
# Prints startup time (launch to /health OK; for kiln also until its KV cache is faulted in, which
# it does while idle), the server's peak RSS and one line per concurrency.
# Usage: benchmarks/serve_sweep.sh [extra kiln serve flags...]   (results in $OUT_DIR, default /tmp/kiln-sweep)
# A peer server instead of kiln: SERVER="vllm serve /path/to/model --port 8011 ..." benchmarks/serve_sweep.sh
# (it must listen on $PORT; the same kiln bench serve client loads it).
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-.venv/bin/kiln}
PORT=${PORT:-8011}
OUT_DIR=${OUT_DIR:-/tmp/kiln-sweep}
mkdir -p "$OUT_DIR"
# curl where it exists, python3 otherwise (the GPU machines' image may lack curl)
healthy() {
  if command -v curl > /dev/null; then curl -sf "http://127.0.0.1:$PORT/health" > /dev/null
  else python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
         "http://127.0.0.1:$PORT/health" 2> /dev/null; fi
}
since_start() { awk -v now="$(date +%s.%N)" -v start="$start" 'BEGIN { printf "%.2f", now - start }'; }
if healthy; then
  echo "port $PORT already answers /health: stop that server first" >&2
  exit 1
fi
start=$(date +%s.%N)
if [ -n "${SERVER:-}" ]; then
  $SERVER > "$OUT_DIR/server.log" 2>&1 &
else
  $KILN serve --port "$PORT" --dtype bfloat16 --max-model-len 2048 "$@" > "$OUT_DIR/server.log" 2>&1 &
fi
server=$!
# wait for the server to exit, so that a sweep started right after finds the port free
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
until healthy; do
  kill -0 $server 2>/dev/null || { tail -20 "$OUT_DIR/server.log"; exit 1; }
  sleep 0.2
done
echo "startup to /health OK: $(since_start) s"
if [ -z "${SERVER:-}" ] && grep -q "Engine ready .* on cpu" "$OUT_DIR/server.log"; then
  # kiln faults a CPU KV cache in while idle (vLLM zero-fills its own during startup): measure the
  # warm server, and say how long warming took
  for _ in $(seq 600); do grep -q "KV cache memory fully faulted in\|stays lazily mapped" "$OUT_DIR/server.log" && break; sleep 0.2; done
  echo "KV cache faulted in: $(since_start) s after launch"
fi
for conc in 1 16 64; do
  prompts=$(( conc == 1 ? 8 : 64 ))
  $KILN bench serve --base-url "http://127.0.0.1:$PORT" --num-prompts $prompts --random-input-len 256 \
    --random-output-len 128 --ignore-eos --seed $conc --max-concurrency $conc --disable-tqdm --save-result \
    --result-dir "$OUT_DIR" --result-filename "c$conc.json" > "$OUT_DIR/c$conc.txt" 2>&1
  python3 - "$OUT_DIR/c$conc.json" "$conc" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"c={sys.argv[2]:>2}: {r['completed']} done, {r['failed']} failed, output {r['output_throughput']:.1f} tok/s, "
      f"median TTFT {r['median_ttft_ms']:.0f} ms, median TPOT {r['median_tpot_ms']:.1f} ms")
PY
done
# the server and its children (vLLM runs its engine core in a child process)
rss=0
for pid in $server $(pgrep -P $server) $(for c in $(pgrep -P $server); do pgrep -P $c; done); do
  kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
  rss=$((rss + ${kb:-0}))
done
echo "server peak RSS (summed over its processes): $((rss / 1024)) MiB"
