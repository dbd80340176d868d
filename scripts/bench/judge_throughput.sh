#!/usr/bin/env bash
# Verdicts per second of each judge on a spread of gold answers, one inference thread.
#
#   scripts/bench/judge_throughput.sh                    # patterns, 0.5B and 1.5B, verdict-prob
#   MODES="verdict-prob sampled" N=8 scripts/bench/judge_throughput.sh
#
# The time is the judging only (as `calibrate` reports it), not model loading. Degenerate
# answers skip the judge, so the answers that reach it are counted too.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:-target/release/refusal-steer}
GOLD=${GOLD:-../shared/gold/labelled-answers.jsonl}
N=${N:-16}
THREADS=${THREADS:-1}
JUDGES=${JUDGES:-"patterns qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct"}
MODES=${MODES:-verdict-prob}

subset=$(mktemp --suffix=.jsonl)
trap 'rm -f "$subset"' EXIT
# Every k-th line, so all the gold file's models and sets are represented.
total=$(grep -c . "$GOLD")
step=$(( total / N > 0 ? total / N : 1 ))
awk -v step="$step" -v n="$N" 'NF && (NR - 1) % step == 0 && taken < n { print; taken++ }' "$GOLD" >"$subset"

printf '%-34s %-13s %8s %8s %10s %12s\n' judge mode answers judged seconds verdicts/s
for judge in $JUDGES; do
    if [[ $judge == patterns* ]]; then modes=patterns; else modes=$MODES; fi
    for mode in $modes; do
        output=$("$BIN" --threads "$THREADS" calibrate --gold "$subset" --judge "$judge" --mode "$mode" 2>/dev/null)
        report=${output%%$'\n'*}
        # "<id>  mode <mode>  (<n> answers, <d> degenerate, <u> unparsable, <s> s)"
        answers=$(sed -E 's/.*\(([0-9]+) answers.*/\1/' <<<"$report")
        degenerate=$(sed -E 's/.* ([0-9]+) degenerate.*/\1/' <<<"$report")
        seconds=$(sed -E 's/.*, ([0-9.]+) s\)$/\1/' <<<"$report")
        judged=$((answers - degenerate))
        # "  <r> verdicts/s (...)" from calibrate itself (exact for sub-second runs).
        rate=$(sed -nE 's/^  ([0-9.]+) verdicts\/s.*/\1/p' <<<"$output")
        if [[ -z $rate ]]; then
            rate=$(awk -v n="$judged" -v s="$seconds" 'BEGIN { if (s > 0) printf "%.2f", n / s; else print "inf" }')
        fi
        printf '%-34s %-13s %8s %8s %10s %12s\n' "$judge" "$mode" "$answers" "$judged" "$seconds" "$rate"
    done
done
