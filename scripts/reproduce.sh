#!/usr/bin/env bash
# The reproduction of docs/results.md, 2 h 25 min on a 2-core CPU machine:
#   0. the reference rows that need no LLM: MostPop, Random, SASRec (a minute);
#   1. π_0 (= BIGRec) for seeds 0 and 1;
#   2. the SPRec settings chosen on the valid split: a sweep of one self-play iteration
#      from seed 0's π_0 (tune/sweep-repro.yaml); its best trial is SPRec seed 0;
#   3. SPRec seed 1, and SPRec-noSFT, SPRec-noDPO and SPRec-RN from seed 0's π_0, all with
#      the chosen settings (the sweep's best.yaml);
#   4. one report over all runs, written to RUNS_DIR/report.
#   bash scripts/reproduce.sh [RUNS_DIR] [key=value ...]    (default RUNS_DIR: runs/repro)
# RECRAY_NO_SETUP=1 skips scripts/setup.sh (a venv set up and activated elsewhere).
# The overrides apply to every run. An interrupted reproduction continues where it stopped.
# The paper's sizes on a GPU cluster are one variable away (the sweep then starts from it):
#   CONFIG=configs/paper-movielens.yaml bash scripts/reproduce.sh runs/paper
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir, run
RUNS="$(runs_dir "${1:-runs/repro}")"
shift || true
CONFIG="${CONFIG:-configs/repro-movielens.yaml}"

COMMON=()                 # each run names its config

for method in mostpop random sasrec; do
  run "$method" -c "$CONFIG" loop.method=$method "$@"
done
for seed in 0 1; do
  run "bigrec-s$seed" -c "$CONFIG" loop.method=bigrec train.seed=$seed "$@"   # π_0: no loop seed
done

if [ -f "$RUNS/sweep/sweep.json" ]; then
  recray sweep --resume "$RUNS/sweep"
else
  sed "s|^base: .*|base: $CONFIG|" tune/sweep-repro.yaml > "$RUNS/sweep-repro.yaml"
  recray sweep -c "$RUNS/sweep-repro.yaml" --output "$RUNS/sweep" \
    loop.init_from="$RUNS/bigrec-s0" "$@"
fi
best="$RUNS/sweep/report/best.yaml"
sprec_s0="$(python -c 'import csv, sys; print(next(csv.DictReader(open(sys.argv[1])))["run_dir"])' \
  "$RUNS/sweep/report/trials.csv")"   # trials.csv lists the best trial first

run sprec-s1 -c "$best" loop.init_from="$RUNS/bigrec-s1" train.seed=1 loop.seed=1 "$@"
for method in sprec-nosft sprec-nodpo sprec-rn; do
  run "$method-s0" -c "$best" loop.method="$method" "$@"
done
recray report "$RUNS/mostpop" "$RUNS/random" "$RUNS/sasrec" "$RUNS/bigrec-s0" "$RUNS/bigrec-s1" "$sprec_s0" "$RUNS/sprec-s1" \
  "$RUNS/sprec-nosft-s0" "$RUNS/sprec-nodpo-s0" "$RUNS/sprec-rn-s0" --output "$RUNS/report"
