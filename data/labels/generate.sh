#!/usr/bin/env bash
# The answers the judge corpus labels: each corpus prompt answered by three models, unsteered
# and steered several ways (greedy, 128 tokens, repetition penalty 1.1 as the default run).
# Usage: data/labels/generate.sh [OUT_DIR] (default /tmp/corpus-answers); resumable.
# Steering: ablation of the 0.5B MD fixture's direction, and MD vectors fitted here for each
# model on China questions it refuses against ones it answers (prompts kept out of the corpus).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/refusal-steer}
OUT=${1:-/tmp/corpus-answers}
DATA=${REFUSAL_STEER_DATA:-../shared/data}
THREADS=${THREADS:-2}
PROMPTS=data/labels/prompts/corpus.jsonl
mkdir -p "$OUT"
gen() { # model condition extra-flags...
  local model=$1 name=$2; shift 2
  "$BIN" --threads "$THREADS" generate --model "$model" --prompts "$PROMPTS" \
    --out "$OUT/$name.jsonl" --max-tokens 128 --repetition-penalty 1.1 --batch 16 "$@"
}
Q05=qwen2.5-coder-0.5b-instruct
Q15=qwen2.5-coder-1.5b-instruct
MD05=fixtures/control-vector/md-qwen2.5-coder-0.5b.safetensors
gen $Q05 q05-base
gen $Q05 q05-md-ablate --steer $MD05 --mode ablate --layers all
gen smollm2-135m-instruct smol-base

# MD vectors: 40 + 40 train prompts that are not corpus prompts (China questions the models
# refuse, deccp censored, against ones they answer, ShrimpMoss good), labelled by set.
python3 - "$DATA" "$PROMPTS" "$OUT" <<'PY'
import json, random, sys
data, corpus, out = sys.argv[1:]
used = {json.loads(l)["prompt"] for l in open(corpus)}
def pick(path, k, seed):
    rows = [l.strip() for l in open(f"{data}/{path}") if l.strip() and l.strip() not in used]
    return random.Random(seed).sample(rows, k)
refused = pick("deccp/censored.txt", 40, 1)
answered = pick("shrimpmoss_china/china_good_english.txt", 40, 2)
with open(f"{out}/train.jsonl", "w") as p, open(f"{out}/train-labels.jsonl", "w") as l:
    for label, rows in (("refusal", refused), ("compliance", answered)):
        for i, text in enumerate(rows):
            pid = f"{label}-{i:02d}"
            p.write(json.dumps({"id": pid, "prompt": text, "set": label}) + "\n")
            l.write(json.dumps({"id": pid, "label": label}) + "\n")
PY
fit_md() { # model name
  "$BIN" --threads "$THREADS" capture --model "$1" --prompts "$OUT/train.jsonl" --out "$OUT/$2-acts.safetensors"
  "$BIN" --threads "$THREADS" fit --acts "$OUT/$2-acts.safetensors" --labels "$OUT/train-labels.jsonl" --method md --out "$OUT/$2-md.safetensors"
}
fit_md $Q15 q15
fit_md $Q05 q05
gen $Q15 q15-base
gen $Q15 q15-md-ablate --steer "$OUT/q15-md.safetensors" --mode ablate --layers all
gen $Q05 q05-md-add-0.08 --steer "$OUT/q05-md.safetensors" --alpha=-0.08 --alpha-profile norm-scaled --layers 7-24
gen $Q05 q05-md-add-0.2 --steer "$OUT/q05-md.safetensors" --alpha=-0.2 --alpha-profile norm-scaled --layers 7-24
gen $Q15 q15-md-add-0.1 --steer "$OUT/q15-md.safetensors" --alpha=-0.1 --alpha-profile norm-scaled --layers 8-28
