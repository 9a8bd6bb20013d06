#!/usr/bin/env bash
# Each method's own knob chosen on valid (issue: every knob by a recorded sweep), from one
# BIGRec π_0 (PI0, default RUNS_DIR/bigrec, trained here by methods-table.sh or named):
#   DMPO's k, SDPO's β, RosePO's ε_max, GDRT's τ (its own π_0 per trial), UFO-like's η;
#   D3's α is tune/sweep-d3.yaml (its own command: it decodes on transformers).
#   [PI0=RUN] bash scripts/methods-sweeps.sh [RUNS_DIR] [METHOD ...]
# (default RUNS_DIR: runs/methods; default methods: dmpo sdpo rosepo gdrt ufo). On 2 cores:
# DMPO 13 min, SDPO 10, RosePO 13, GDRT 39 (measured), UFO-like ~48 (estimated). A finished sweep (its report
# written) is skipped; an interrupted one resumes. RECRAY_NO_SETUP=1 skips scripts/setup.sh.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/runs.sh"     # set-up, runs_dir
RUNS="$(runs_dir "${1:-runs/methods}")"
shift || true
PI0="${PI0:-$RUNS/bigrec}"
[ -f "$PI0/it0/policy/adapter/adapter_model.safetensors" ] || {
  echo "no π_0 adapter under $PI0 (run scripts/methods-table.sh first, or set PI0)" >&2; exit 1; }

methods=("$@")
[ $# -gt 0 ] || methods=(dmpo sdpo rosepo gdrt ufo)
for m in "${methods[@]}"; do
  out="$RUNS/sweep-$m"
  # GDRT trains its own π_0: it takes only π_0's adapter, to group the answer tokens
  if [ "$m" = gdrt ]; then from=(train.gdrt.scorer="$PI0/it0/policy/adapter"); else from=(loop.init_from="$PI0"); fi
  if [ -f "$out/report.md" ]; then
    continue
  elif [ -f "$out/sweep.json" ]; then
    recray sweep --resume "$out"
  else
    recray sweep -c "tune/sweep-$m.yaml" --output "$out" "${from[@]}"
  fi
done
