#!/usr/bin/env bash
# Every LLM-side method of docs/results.md's methods table at the main job's sizes
# (configs/ml100k.yaml), all from one π_0 (BIGRec), about an hour on a 2-core CPU machine
# (D3 10 min of it; SKIP_D3=1 leaves it out):
#   the rows that need no LLM (MostPop, Random, SASRec); BIGRec = π_0, trained here unless
#   PI0 names a run that holds it (e.g. the main job's SPRec run); BIGRec + IFairLRS
#   re-ranking; SPRec (T = 2); DMPO and SDPO (k = 3 random negatives); RosePO; UFO-like
#   (T = 2); GDRT and RW, each of which trains its own π_0; D3 (π_0 decoded over the
#   catalog with SASRec's scores); then one report of all rows.
#   [PI0=RUN] [SKIP_D3=1] bash scripts/methods-table.sh [RUNS_DIR] [key=value ...]
#   (default RUNS_DIR: runs/methods)
# RECRAY_NO_SETUP=1 skips scripts/setup.sh. The overrides apply to every run; an interrupted
# table continues where it stopped (finished runs are skipped, a started one resumes).
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir, run
RUNS="$(runs_dir "${1:-runs/methods}")"
shift || true
COMMON=(-c configs/ml100k.yaml)

names=()
for method in mostpop random sasrec; do
  run "$method" loop.method=$method "$@"
  names+=("$RUNS/$method")
done
PI0="${PI0:-$RUNS/bigrec}"
if [ "$PI0" = "$RUNS/bigrec" ]; then
  run bigrec loop.method=bigrec "$@"
fi
names+=("$PI0")
from=(loop.init_from="$PI0")
run bigrec-rerank loop.method=bigrec evaluate.rerank.enabled=true "${from[@]}" "$@"
methods=(dmpo sdpo rosepo ufo)
if grep -q '"method": "sprec"' "$PI0/metrics.jsonl"; then   # PI0 is an SPRec run: its row
  names+=("$RUNS"/{bigrec-rerank,dmpo,sdpo,rosepo,ufo,gdrt,rw})
else
  methods=(sprec "${methods[@]}")
  names+=("$RUNS"/{bigrec-rerank,sprec,dmpo,sdpo,rosepo,ufo,gdrt,rw})
fi
for method in "${methods[@]}"; do
  run "$method" loop.method=$method "${from[@]}" "$@"
done
run gdrt loop.method=gdrt train.gdrt.scorer="$PI0/it0/policy/adapter" "$@"
run rw loop.method=rw "$@"
# D3 last, on transformers: the hf step reuses each prompt's states (bench/d3.py) and
# decoded the 64 valid prompts in 172 s here; on vLLM they were unfinished after 10 min.
if [ -z "${SKIP_D3:-}" ]; then
  run d3 loop.method=d3 generate.backend=hf "${from[@]}" "$@"
  names+=("$RUNS/d3")
fi
recray report "${names[@]}" --output "$RUNS/report"
