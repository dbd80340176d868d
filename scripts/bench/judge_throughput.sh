#!/usr/bin/env bash
# Verdicts per second of each judge on a spread of labelled answers, one inference thread.
#
#   scripts/bench/judge_throughput.sh                    # patterns, probe, 0.5B and 1.5B, verdict-prob
#   MODES="verdict-prob sampled" N=8 scripts/bench/judge_throughput.sh
#
# The time is the judging only (as `calibrate` reports it, per answer that reached the judge:
# degenerate answers skip it), not model loading.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:-target/release/refusal-steer}
LABELS=${LABELS:-data/labels/answers/shared-gold.jsonl}
N=${N:-16}
THREADS=${THREADS:-1}
JUDGES=${JUDGES:-"patterns probe qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct"}
MODES=${MODES:-verdict-prob}

subset=$(mktemp --suffix=.jsonl)
trap 'rm -f "$subset"' EXIT
# Every k-th line, so all the gold file's models and sets are represented.
total=$(grep -c . "$LABELS")
step=$(( total / N > 0 ? total / N : 1 ))
awk -v step="$step" -v n="$N" 'NF && (NR - 1) % step == 0 && taken < n { print; taken++ }' "$LABELS" >"$subset"

printf '%-34s %-13s %8s %12s %12s\n' judge mode answers ms/answer verdicts/s
for judge in $JUDGES; do
    case $judge in
        patterns*) modes=patterns ;;
        probe*) modes=probe ;;
        *) modes=$MODES ;;
    esac
    for mode in $modes; do
        output=$("$BIN" --threads "$THREADS" calibrate --labels "$subset" --judge "$judge" --mode "$mode" 2>/dev/null)
        # The table's first row is the judge itself: "| <id> | ... | <ms/answer> |".
        ms=$(grep -m1 '^| [^j-]' <<<"$output" | awk -F'|' '{ gsub(/ /, "", $(NF-1)); print $(NF-1) }')
        rate=$(awk -v ms="$ms" 'BEGIN { if (ms > 0) printf "%.2f", 1000 / ms; else print "inf" }')
        printf '%-34s %-13s %8s %12s %12s\n' "$judge" "$mode" "$N" "$ms" "$rate"
    done
done
