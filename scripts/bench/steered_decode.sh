#!/usr/bin/env bash
# Cost of steering at decode: tokens/s with no hooks against the same decode with a vector
# added at every point (all layers steered), measured in the same run by `refusal-steer bench
# --steer`, repetitions interleaved; prints both medians and the ratio.
#
#   scripts/bench/steered_decode.sh [model]
#
# The vector file is fitted here (mean difference) from 8 harmful and 8 benign JailbreakBench
# prompts; its values do not change the cost. THREADS (1), TG decoded tokens (128),
# PP prompt tokens (128; 0 skips prefill), REPEATS (5 interleaved pairs after a warm-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/jailbreakbench}
[ -d "$DATA" ] || DATA=/work/shared/data/jailbreakbench
THREADS=${THREADS:-1}
TG=${TG:-128}
PP=${PP:-128}
REPEATS=${REPEATS:-5}
model=${1:-qwen2.5-coder-0.5b-instruct}
cargo build --release -q -p refusal-steer
ours=target/release/refusal-steer
path=$($ours models fetch "$model")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$DATA" "$work" <<'PY'
import csv, json, sys
data, work = sys.argv[1], sys.argv[2]
with open(f"{work}/prompts.jsonl", "w") as prompts, open(f"{work}/labels.jsonl", "w") as labels:
    for name, label in (("harmful", "refusal"), ("benign", "compliance")):
        for i, r in enumerate(list(csv.DictReader(open(f"{data}/{name}-behaviors.csv", newline="")))[:8]):
            prompts.write(json.dumps({"id": f"{name}-{i}", "prompt": r["goal"]}) + "\n")
            labels.write(json.dumps({"id": f"{name}-{i}", "label": label}) + "\n")
PY
$ours --threads "$THREADS" capture --model "$path" --prompts "$work/prompts.jsonl" \
  --out "$work/acts.safetensors" --batch 8 2>/dev/null
$ours --threads "$THREADS" fit --acts "$work/acts.safetensors" --labels "$work/labels.jsonl" \
  --method md --folds 2 --out "$work/md.safetensors" > /dev/null
o=$($ours --threads "$THREADS" bench --model "$path" --prompt-tokens "$PP" --gen-tokens "$TG" \
  --repetitions "$REPEATS" --steer "$work/md.safetensors" --alpha -4 --layers all)
OURS="$o" MODEL="$model" T="$THREADS" python3 - <<'PY'
import json, os
o = json.loads(os.environ["OURS"])
rate = {r["test"]: r["median"] for r in o["results"]}
print("%s, %s thread(s), %d points steered (add alpha*v at every position), median of %s"
      % (os.environ["MODEL"], os.environ["T"], len(o["steer"]["points"]), "interleaved repetitions"))
print("%-8s %14s %14s %9s" % ("test", "plain tok/s", "steered tok/s", "ratio"))
for r in o["steered_over_plain"]:
    t = r["test"]
    print("%-8s %14.2f %14.2f %8.4f  (%+.2f%% tok/s)" % (t, rate[t], rate[t + "+steer"], r["steered_over_plain"],
                                                     100 * (r["steered_over_plain"] - 1)))
PY
