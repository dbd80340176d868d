#!/usr/bin/env bash
# Nothing lost, whatever happens to the process (crates/cli/tests/interruptions.rs, long form):
# the miniature run SIGKILLed 30 times at random moments and resumed, compared with an
# uninterrupted run; then the run on a 1 MB tmpfs (needs root), resumed after it grows.
# Usage: scripts/robustness.sh [KILLS]   (prints each test's summary line)
set -euo pipefail
cd "$(dirname "$0")/.."
export REFUSAL_STEER_KILLS="${1:-30}"
cargo nextest run --release -p refusal-steer --test interruptions --run-ignored all \
  --no-capture 2>&1 | grep -E "kills landed|No space|PASS|FAIL|panicked|Summary"
