#!/usr/bin/env bash
# The reproduction of docs/results.md at the main job's sizes (configs/ml100k.yaml: the π_0
# curve of docs/results.md found no larger size reachable on 2 cores that learns more):
#   0. the reference rows that need no LLM: MostPop, Random, SASRec (80 s here);
#   1. π_0 (= BIGRec) for each seed of SEEDS (default "0 1 2"): `loop.method=bigrec train.seed=S`;
#   2. SPRec (T = the config's loop.iterations, 2 here) from each seed's π_0
#      (`loop.init_from`, `train.seed=S loop.seed=S`);
#   3. from the first seed's π_0: the ablations SPRec-noSFT, SPRec-noDPO and SPRec-RN, and
#      the paper's DPO baselines DMPO and SDPO (k = 3 random negatives, one pass);
#   4. RW (the re-weighted SFT baseline: a π_0 of its own, first seed);
#   5. one report over all runs (RUNS_DIR/report): mean ± std over the seeds, each run's
#      paired bootstrap interval against its own seed's BIGRec, the per-iteration plot.
#   [CONFIG=FILE] [SEEDS="0 1 2"] bash scripts/reproduce.sh [RUNS_DIR] [key=value ...]
#   (default RUNS_DIR: runs/repro; the overrides apply to every run)
# SPRec's settings (β, learning rates, samples per iteration) are CONFIG's: for
# configs/ml100k.yaml the main job's, whose valid sweep is tune/sweep-main.yaml (run it from
# RUNS_DIR/bigrec-s0 to choose them again). The paper's sizes on a GPU cluster:
#   CONFIG=configs/paper-movielens.yaml bash scripts/reproduce.sh runs/paper
# Each run is a resumable piece (an LLM run 8-17 min here): an interrupted reproduction continues
# where it stopped, finished runs skipped, a started one resumed. RECRAY_NO_SETUP=1 skips
# scripts/setup.sh (a venv set up and activated elsewhere).
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir, run
RUNS="$(runs_dir "${1:-runs/repro}")"
shift || true
COMMON=(-c "${CONFIG:-configs/ml100k.yaml}")
read -r -a seeds <<< "${SEEDS:-0 1 2}"
first="$RUNS/bigrec-s${seeds[0]}"

names=()
for method in mostpop random sasrec; do
  run "$method" loop.method=$method "$@"
  names+=("$RUNS/$method")
done
for seed in "${seeds[@]}"; do
  run "bigrec-s$seed" loop.method=bigrec train.seed="$seed" "$@"
  names+=("$RUNS/bigrec-s$seed")
done
for seed in "${seeds[@]}"; do
  run "sprec-s$seed" loop.init_from="$RUNS/bigrec-s$seed" train.seed="$seed" loop.seed="$seed" "$@"
  names+=("$RUNS/sprec-s$seed")
done
for method in sprec-nosft sprec-nodpo sprec-rn dmpo sdpo; do
  run "$method" loop.method=$method loop.init_from="$first" train.seed="${seeds[0]}" \
    loop.seed="${seeds[0]}" "$@"
  names+=("$RUNS/$method")
done
run rw loop.method=rw train.seed="${seeds[0]}" "$@"
names+=("$RUNS/rw")
recray report "${names[@]}" --output "$RUNS/report"
