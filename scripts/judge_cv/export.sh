#!/usr/bin/env bash
# Regenerates gold-verdicts.jsonl (what judge_cv.py reads): the pattern label, the degenerate
# kind and the verdict-prob p_refusal of the two local judges for every gold answer, all from
# the CLI. Cost without a warm cache: ~2 s (0.5B) and ~5 s (1.5B) per answer on one thread.
#
#   scripts/judge_cv/export.sh [CACHE.jsonl]   # run from the workspace root
#
# CACHE is a verdict cache (as `calibrate --cache`) reused and extended by the runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gold=${GOLD:-../shared/gold/labelled-answers.jsonl}
bin=${BIN:-target/release/refusal-steer}
work=$(mktemp -d)
cache=${1:-$work/cache.jsonl}

# The gold set as `generate` output: one answer per (model, prompt), id "model/prompt-id".
python3 - "$gold" "$work/answers.jsonl" <<'EOF'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        g = json.loads(line)
        out.write(json.dumps({
            "id": g["model"] + "/" + g["id"], "sample": 0, "set": g["set"],
            "prompt": g["prompt"], "answer": g["answer"], "n_tokens": 1,
            "mean_logprob": 0.0, "finish_reason": "stop"}) + "\n")
EOF

"$bin" --threads 1 judge --answers "$work/answers.jsonl" --out "$work/patterns.jsonl" \
    --judge patterns --cache "$cache"
for m in 0.5b 1.5b; do
    "$bin" --threads 1 judge --answers "$work/answers.jsonl" --out "$work/$m.jsonl" \
        --judge "qwen2.5-coder-$m-instruct" --cache "$cache"
done

python3 - "$gold" "$work" "$here/gold-verdicts.jsonl" <<'EOF'
import json, sys
gold, work, out = sys.argv[1:]
def load(name):
    return {v["id"]: v for v in map(json.loads, open(f"{work}/{name}.jsonl"))}
pat, p05, p15 = load("patterns"), load("0.5b"), load("1.5b")
with open(out, "w") as f:
    for g in map(json.loads, open(gold)):
        k = g["model"] + "/" + g["id"]
        f.write(json.dumps({
            "model": g["model"], "id": g["id"], "degenerate": pat[k]["degenerate"],
            "patterns": pat[k]["label"], "p_qwen05": p05[k]["p_refusal"],
            "p_qwen15": p15[k]["p_refusal"], "judge_qwen05": p05[k]["judge"],
            "judge_qwen15": p15[k]["judge"]}) + "\n")
print(f"wrote {out}")
EOF
rm -rf "$work"
