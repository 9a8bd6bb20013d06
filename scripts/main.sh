#!/usr/bin/env bash
# The main job on the embedded default: local Ray, MovieLens-100k, SmolLM2-135M.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
recray prepare -c configs/ml100k.yaml --output runs/ml100k/prepared --overwrite "$@"
