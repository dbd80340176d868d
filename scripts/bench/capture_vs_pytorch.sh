#!/usr/bin/env bash
# Capture throughput of `refusal-steer capture` against the same capture done with
# transformers/PyTorch on CPU (capture_vs_pytorch.py), on the same GGUF file and the same
# chat-formatted prompts, measured in the same run; prints prompts/s, peak RSS and the ratios.
#
#   scripts/bench/capture_vs_pytorch.sh
#
# PYTHON: a Python with torch, transformers and gguf, installed outside the repo, e.g.
#   python3 -m venv /work/venv-bench && /work/venv-bench/bin/pip install torch transformers gguf accelerate
# MODEL: GGUF file (default: qwen2.5-coder-0.5b-instruct-q4_k_m, fetched by `models fetch`).
# PROMPTS_CSV (JailbreakBench harmful behaviours, column `goal`), N prompts (64),
# BATCHES ("1 8"), THREADS (1), REPEATS (3; the table shows medians).
#
# Both engines run one at a time, repetitions interleaved, so a loaded machine slows both
# alike. Ours is timed over the whole process (loading and hashing the model file, writing
# the activations); PyTorch's capture loop is timed inside the script, without loading
# the model, so the headline ratio understates ours. Peak RSS comes from /usr/bin/time -v.
# The last column checks that both computed the same thing: the median cosine between the two
# engines' activations over prompts and points 1..L-1 (transformers applies the final norm to
# its last hidden state, our last point is before it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/work/venv-bench/bin/python}
PROMPTS_CSV=${PROMPTS_CSV:-../shared/data/jailbreakbench/harmful-behaviors.csv}
[ -f "$PROMPTS_CSV" ] || PROMPTS_CSV=/work/shared/data/jailbreakbench/harmful-behaviors.csv
N=${N:-64}
BATCHES=${BATCHES:-"1 8"}
THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }
"$PYTHON" -c "import torch, transformers, gguf" || { echo "set PYTHON to a Python with torch, transformers and gguf" >&2; exit 1; }
cargo build --release -q -p refusal-steer
ours=target/release/refusal-steer
MODEL=${MODEL:-$($ours models fetch qwen2.5-coder-0.5b-instruct)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" - "$PROMPTS_CSV" "$N" > "$work/prompts.jsonl" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))[: int(sys.argv[2])]
for i, r in enumerate(rows):
    print(json.dumps({"id": str(i), "prompt": r["goal"]}))
PY

# "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.34" and "Maximum resident set size (kbytes): N".
measure() {
  local t=$1
  awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; wall = s}
              /Maximum resident set size/ {rss = $2 / 1024}
              END {printf "{\"wall_s\": %f, \"rss_mib\": %f}", wall, rss}' "$t"
}

echo "[" > "$work/runs.json"
first=1
for b in $BATCHES; do
  for r in $(seq "$REPEATS"); do
    rm -f "$work/ours-b$b.safetensors"
    /usr/bin/time -v -o "$work/time-ours" "$ours" --threads "$THREADS" capture --model "$MODEL" \
      --prompts "$work/prompts.jsonl" --out "$work/ours-b$b.safetensors" --batch "$b" 2>/dev/null
    o=$(measure "$work/time-ours")
    /usr/bin/time -v -o "$work/time-py" env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" \
      THREADS="$THREADS" "$PYTHON" scripts/bench/capture_vs_pytorch.py "$MODEL" "$work/prompts.jsonl" \
      "$b" "$work/py-b$b.npy" > "$work/py.json" 2> "$work/py.err" || { cat "$work/py.err" >&2; exit 1; }
    p=$(measure "$work/time-py")
    [ $first = 1 ] || echo "," >> "$work/runs.json"
    first=0
    echo "{\"batch\": $b, \"repeat\": $r, \"ours\": $o, \"py_time\": $p, \"py\": $(cat "$work/py.json")}" >> "$work/runs.json"
    echo "batch $b repeat $r: ours $o; pytorch $p $(cat "$work/py.json")" >&2
  done
done
echo "]" >> "$work/runs.json"

"$PYTHON" - "$work" "$N" "$THREADS" "$MODEL" <<'PY'
import json, statistics as st, sys
import numpy as np
from safetensors.numpy import load_file
work, n, threads, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = json.load(open(f"{work}/runs.json"))
print(f"model {model}, {n} chat-formatted prompts, {threads} thread(s), median of "
      f"{max(r['repeat'] for r in runs)} runs; torch {runs[0]['py']['torch']}, "
      f"{runs[0]['py']['mean_prompt_tokens']:.1f} prompt tokens on average")
head = ("batch", "ours p/s", "torch p/s", "ratio", "torch p/s", "ratio", "ours MiB", "torch MiB", "mem",
        "cosine")
sub = ("", "(process)", "(loop)", "", "(process)", "", "peak RSS", "peak RSS", "ratio", "median")
fmt = "%5s %10s %10s %7s %10s %7s %9s %10s %6s %7s"
print(fmt % head)
print(fmt % sub)
for b in sorted({r["batch"] for r in runs}):
    rs = [r for r in runs if r["batch"] == b]
    ours = st.median(n / r["ours"]["wall_s"] for r in rs)
    loop = st.median(r["py"]["prompts_per_s"] for r in rs)
    proc = st.median(n / r["py_time"]["wall_s"] for r in rs)
    ours_mib = st.median(r["ours"]["rss_mib"] for r in rs)
    py_mib = st.median(r["py_time"]["rss_mib"] for r in rs)
    a = load_file(f"{work}/ours-b{b}.safetensors")["activations"]
    t = np.load(f"{work}/py-b{b}.npy")
    x, y = a[:, 1:-1].astype(np.float64), t[:, 1:-1].astype(np.float64)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    print(fmt % (b, "%.2f" % ours, "%.2f" % loop, "%.2fx" % (ours / loop), "%.2f" % proc,
                 "%.2fx" % (ours / proc), "%.0f" % ours_mib, "%.0f" % py_mib,
                 "%.2f" % (ours_mib / py_mib), "%.4f" % np.median(cos)))
PY
