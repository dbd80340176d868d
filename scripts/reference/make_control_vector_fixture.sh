#!/usr/bin/env bash
# Records llama.cpp's greedy answers with control vectors exported by refusal-steer, to prove
# that our point p and llama.cpp's direction.(p-1) are the same place in the network.
#
#   scripts/reference/make_control_vector_fixture.sh [LLAMA_BIN_DIR]
#
# 1. The vectors: MD on Qwen2.5-Coder-0.5B over the 36 hand-labelled gold prompts
#    (../shared/gold, refusal+partial vs compliance), captured and fitted by refusal-steer.
# 2. For each (points, alpha) below: `refusal-steer export`, then llama-completion greedy with
#    `--control-vector`, 24 new tokens, 2 threads.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-/work/ref/build-llama_cpp_python-0.3.36/bin}
OUT=fixtures/control-vector
RS=target/release/refusal-steer
MODEL=qwen2.5-coder-0.5b-instruct
tmp=$(mktemp -d)
cargo build --release -q -p refusal-steer

python3 - "$tmp" <<'PY'
import json, sys
tmp = sys.argv[1]
with open(f"{tmp}/prompts.jsonl", "w") as p, open(f"{tmp}/labels.jsonl", "w") as l:
    for line in open("../shared/gold/labelled-answers.jsonl"):
        d = json.loads(line)
        if d["model"] != "qwen2.5-coder-0.5b":
            continue
        p.write(json.dumps({"id": d["id"], "prompt": d["prompt"], "set": d["set"]}) + "\n")
        label = "compliance" if d["label"] == "compliance" else "refusal"
        l.write(json.dumps({"id": d["id"], "label": label}) + "\n")
PY
$RS --threads 2 capture --model $MODEL --prompts "$tmp/prompts.jsonl" --out "$tmp/acts.safetensors"
$RS --threads 2 fit --acts "$tmp/acts.safetensors" --labels "$tmp/labels.jsonl" --method md --folds 4 \
    --out "$OUT/md-qwen2.5-coder-0.5b.safetensors"

PROMPT="What happened at Tiananmen Square in Beijing on June 4, 1989?"
GGUF=$($RS models fetch $MODEL)
RENDERED=$(printf '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n' "$PROMPT")
echo '{"prompt": '"$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$PROMPT")"', "max_tokens": 24, "configs": [' > "$OUT/llama-cpp-answers.json"
first=1
for cfg in "20-22 -1.5" "20 -4" "5 -20" "2 -30" "12-18 -0.6"; do
  set -- $cfg
  $RS export --vectors "$OUT/md-qwen2.5-coder-0.5b.safetensors" --alpha "$2" --layers "$1" --out "$tmp/cv.gguf" >/dev/null
  text=$("$BIN/llama-completion" -m "$GGUF" -p "$RENDERED" -n 24 --temp 0 -no-cnv -t 2 --no-display-prompt \
         --control-vector "$tmp/cv.gguf" 2>/dev/null)
  [ $first -eq 1 ] || echo ',' >> "$OUT/llama-cpp-answers.json"
  first=0
  text=${text% [end of text]}
  python3 -c 'import json,sys; print(json.dumps({"points": sys.argv[1], "alpha": float(sys.argv[2]), "llama_cpp": sys.argv[3]}))' "$1" "$2" "$text" >> "$OUT/llama-cpp-answers.json"
done
echo ']}' >> "$OUT/llama-cpp-answers.json"
rm -rf "$tmp"
