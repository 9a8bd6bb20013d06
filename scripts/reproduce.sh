#!/usr/bin/env bash
# The reproduction of docs/results.md: BIGRec and SPRec with 2 seeds, SPRec-noSFT,
# SPRec-noDPO and SPRec-RN with seed 0, then one report over all runs.
#   bash scripts/reproduce.sh [RUNS_DIR] [key=value ...]    (default RUNS_DIR: runs/repro)
# Sizes: configs/ml100k.yaml; for the paper's sizes on a GPU cluster pass
# `-c configs/paper-movielens.yaml` through CONFIG=..., e.g.
#   CONFIG=configs/paper-movielens.yaml bash scripts/reproduce.sh runs/paper
# The ablations share seed 0's π_0 (loop.init_from): the same model, trained once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
RUNS="${1:-runs/repro}"
shift || true
CONFIG="${CONFIG:-configs/ml100k.yaml}"

run() {   # NAME OVERRIDES...: run, or continue a run an interruption left unfinished
  local name="$1"; shift
  if [ -f "$RUNS/$name/manifest.json" ]; then
    recray run -c "$CONFIG" --resume "$RUNS/$name" "$@"
  else
    recray run -c "$CONFIG" --runs "$RUNS" --name "$name" "$@"
  fi
}

run sprec-s0 loop.seed=0 train.seed=0 "$@"
run sprec-s1 loop.seed=1 train.seed=1 "$@"
for method in sprec-nosft sprec-nodpo sprec-rn; do
  run "$method-s0" loop.method="$method" loop.init_from="$RUNS/sprec-s0" "$@"
done
recray report "$RUNS"/sprec-s0 "$RUNS"/sprec-s1 "$RUNS"/sprec-nosft-s0 "$RUNS"/sprec-nodpo-s0 \
  "$RUNS"/sprec-rn-s0 --output "$RUNS/report"
