#!/usr/bin/env bash
# Why π_0 does not learn (issue "models that learn", step 2): one setting of BIGRec's SFT
# changed at a time from the main job's (128 samples × 2 epochs, lr 3e-4, LoRA r 16 on
# every linear layer, 5 titles of history), each evaluated on the 512-sample valid
# subset only (never test), then one report beside MostPop (RUNS_DIR/report; each probe is
# its own row, named by run, since the runs differ in more than their seeds):
#   [PROBES="lr1e-3 full ..."] bash scripts/pi0-probes.sh [RUNS_DIR]   (default runs/probe)
# About 7 minutes a probe on 2 cores (full fine-tuning and history 10 longer); a finished
# probe is skipped, an interrupted one resumes. RECRAY_NO_SETUP=1 skips scripts/setup.sh.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir, run
RUNS="$(runs_dir "${1:-runs/probe}")"
COMMON=(-c configs/ml100k.yaml data.n_valid=512 "evaluate.splits=[valid]")

declare -A PROBE=(
  [base]="loop.method=bigrec"
  [lr1e-3]="loop.method=bigrec train.sft.learning_rate=1e-3"
  [lr1e-4]="loop.method=bigrec train.sft.learning_rate=1e-4"
  [r64]="loop.method=bigrec train.lora.r=64 train.lora.alpha=128 generate.max_lora_rank=64"
  [full]="loop.method=bigrec train.lora.enabled=false train.sft.learning_rate=2e-5"
  [history10]="loop.method=bigrec data.history_len=10"
)
read -r -a probes <<< "${PROBES:-base lr1e-3 full history10 r64 lr1e-4}"
run mostpop loop.method=mostpop
names=("$RUNS/mostpop")
for probe in "${probes[@]}"; do
  # shellcheck disable=SC2086
  run "$probe" ${PROBE[$probe]}
  names+=("$RUNS/$probe")
done
recray report "${names[@]}" --split valid --baseline mostpop --output "$RUNS/report"
