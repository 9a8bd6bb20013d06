#!/usr/bin/env bash
# The main job on the embedded default: local Ray, MovieLens-100k, SmolLM2-135M.
# MostPop (the reference row that needs no LLM), then BIGRec (the initial SFT, iteration 0)
# and SPRec (self-play iterations) in one run; then one report of all rows on valid and
# test, with the paired bootstrap intervals of the differences to BIGRec, and its path.
# Extra arguments are config overrides of the SPRec run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
RUNS="runs/ml100k-$(date +%Y%m%d-%H%M%S)"
recray run -c configs/ml100k.yaml --runs "$RUNS" --name mostpop loop.method=mostpop
recray run -c configs/ml100k.yaml --runs "$RUNS" --name sprec "$@"
recray report "$RUNS/mostpop" "$RUNS/sprec" --output "$RUNS/report"
