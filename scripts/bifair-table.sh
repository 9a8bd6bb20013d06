#!/usr/bin/env bash
# BiFair's table of docs/results.md (seed 003, Table 2's form) on MovieLens-100k under the
# seed's general-recommendation protocol, about 70 min on a 2-core CPU machine:
#   MostPop (this split's train counts; the row every model is read against), AlphaRec (MLP over the MiniLM title embeddings), its Reweight baseline and BiFair, each
#   made fair over popularity [pop] and genre [genre] groups, seeds 0-2 (AlphaRec itself
#   ignores groups: one row); the ablations (Separate, noEntropy, Eq11) and the Linear
#   projector for seed 0, popularity groups; then one report.
#   bash scripts/bifair-table.sh [RUNS_DIR] [key=value ...]    (default RUNS_DIR: runs/bifair)
# RECRAY_NO_SETUP=1 skips scripts/setup.sh. The overrides apply to every run; an interrupted
# table continues where it stopped (finished runs are skipped, a started one resumes).
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir, run
RUNS="$(runs_dir "${1:-runs/bifair}")"
shift || true
COMMON=(-c configs/ml100k.yaml bifair.protocol=general bifair.max_epochs=40 "evaluate.splits=[valid,test]")

run mostpop-general loop.method=mostpop-general "$@"
names=(mostpop-general)
for seed in 0 1 2; do
  run "alpharec-s$seed" loop.method=alpharec bifair.seed=$seed "$@"
  names+=("alpharec-s$seed")
  for groups in pop genre; do
    for method in alpharec-reweight bifair; do
      run "$method-$groups-s$seed" loop.method=$method bifair.groups=$groups bifair.seed=$seed "$@"
      names+=("$method-$groups-s$seed")
    done
  done
done
for method in bifair-separate bifair-noentropy bifair-eq11; do
  run "$method-pop-s0" loop.method=$method bifair.groups=pop "$@"
  names+=("$method-pop-s0")
done
for method in alpharec bifair; do
  run "linear-$method-pop-s0" loop.method=$method bifair.groups=pop bifair.projector=linear "$@"
  names+=("linear-$method-pop-s0")
done
recray report "${names[@]/#/$RUNS/}" --output "$RUNS/report"
