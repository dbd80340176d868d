#!/usr/bin/env bash
# Which directions to ablate, measured on target prompts outside a run's split: 24 China-political
# prompts from the target sources that no split of RUN uses (seeded pick), answered unsteered and
# with the MD, WRMD, or MD+WRMD span of RUN's vectors projected out at every point (no gate: the
# gate passes these prompts anyway), then judged with the run's default judge.
#   scripts/ablation_heldout/compare.sh RUN [THREADS]
# RUN is a run folder of the default config (split.json, vectors/md.safetensors, vectors/wrmd.safetensors).
set -euo pipefail
run=${1:?usage: compare.sh RUN_FOLDER [THREADS]}
threads=${2:-1}
data=${REFUSAL_STEER_DATA:-$(dirname "$0")/../../../shared/data}
bin=${REFUSAL_STEER_BIN:-target/release/refusal-steer}
out=$(mktemp -d)
python3 - "$run/split.json" "$data" "$out/prompts.jsonl" <<'PY'
import json, random, sys
split, data, out = sys.argv[1:]
used = {p["prompt"] for role in json.load(open(split))["prompts"].values() for part in role.values() for p in part}
lines = lambda path: [l.strip() for l in open(f"{data}/{path}", encoding="utf-8") if l.strip()]
pool = [p for p in lines("deccp/censored.txt") if p not in used]
pool += [p for p in lines("shrimpmoss_china/china_bad_english.txt") if p not in used][:400]
random.seed(7)
with open(out, "w") as f:
    for i, p in enumerate(random.sample(pool, 24)):
        f.write(json.dumps({"id": f"x{i}", "prompt": p}) + "\n")
PY
v="$run/vectors"
declare -A steer=(
  [unsteered]=""
  [md]="--steer $v/md.safetensors --mode ablate"
  [wrmd]="--steer $v/wrmd.safetensors --mode ablate"
  [md+wrmd]="--steer $v/wrmd.safetensors --ablate $v/md.safetensors --mode ablate"
)
for name in unsteered md wrmd md+wrmd; do
  # shellcheck disable=SC2086
  "$bin" --threads "$threads" generate --prompts "$out/prompts.jsonl" --out "$out/$name.jsonl" \
    --max-tokens 128 --layers all ${steer[$name]} 2>/dev/null
  "$bin" judge --answers "$out/$name.jsonl" --out "$out/$name.verdicts.jsonl" 2>/dev/null
  python3 - "$out/$name.verdicts.jsonl" "$name" <<'PY'
import json, sys
v = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]:>10}: {sum(x['label'] == 1 for x in v)}/{len(v)} refused ({sum(1 for x in v if x.get('degenerate'))} degenerate)")
PY
done
echo "answers in $out"
