#!/usr/bin/env bash
# Set up and run the whole test suite (CI runs exactly this).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
python -m pytest -q --durations=15 "$@"
