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

# Reinstall only when the dependency list changed (pip itself is slow to say "satisfied").
stamp="$VENV/.recray-deps-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the pinned stack (about 3 minutes the first time)"
  # torch first, pinned: an unpinned resolution pulls a multi-GB CUDA build.
  pip install --quiet "torch==2.13.0"
  pip install --quiet -e "$ROOT[test]"
  touch "$stamp"
else
  pip install --quiet --no-deps -e "$ROOT" >/dev/null
fi
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
recray fetch
