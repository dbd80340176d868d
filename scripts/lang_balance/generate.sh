#!/bin/bash
# Answers of the unsteered model and of each variant (as made and at half strength) to the
# held-out prompts: greedy, 128 tokens, repetition penalty 1.1, as the run answers.
#   scripts/lang_balance/generate.sh RUN_FOLDER OUT_DIR   (about 15 minutes on 2 cores)
set -euo pipefail
run=$1; out=$2; here=$(dirname "$0")
mkdir -p "$out"
python3 "$here/make_prompts.py" "$run" "${REFUSAL_STEER_DATA:-../shared/data}" > "$out/prompts.jsonl"
python3 "$here/variants.py" "$run" "$out"
answer() { refusal-steer generate --prompts "$out/prompts.jsonl" --max-tokens 128 --repetition-penalty 1.1 --batch 8 "$@"; }
answer --out "$out/ans-base.jsonl"
for v in orig balanced projected random; do
  answer --recipe "$out/$v.steer.safetensors" --out "$out/ans-$v.jsonl"
done
for v in orig balanced; do
  answer --recipe "$out/$v.steer.safetensors" --recipe-scale 0.5 --out "$out/ans-$v-half.jsonl"
done
python3 "$here/count.py" "$out"/ans-*.jsonl
