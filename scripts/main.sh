#!/usr/bin/env bash
# The main job on the embedded default: local Ray, MovieLens-100k, SmolLM2-135M.
# BIGRec (the initial SFT, iteration 0) and SPRec (self-play iterations), then the
# comparison table and the report path. Extra arguments are config overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
recray run -c configs/ml100k.yaml --runs runs --name "ml100k-$(date +%Y%m%d-%H%M%S)" "$@"
