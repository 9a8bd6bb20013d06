# Sourced by the scripts that write a set of runs (reproduce.sh, methods-table.sh,
# bifair-table.sh): the set-up (skipped with RECRAY_NO_SETUP=1: a venv set up and
# activated elsewhere), the repository as working directory, and
#   runs_dir DIR       DIR, created, as an absolute path
#   run NAME ARGS...   `recray run ARGS` as $RUNS/NAME, with the caller's COMMON arguments
#                      first; a finished run (its report written) is skipped, one an
#                      interruption left unfinished resumes
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${RECRAY_NO_SETUP:-}" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/scripts/setup.sh"
fi
cd "$ROOT"

runs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

run() {
  local name="$1"; shift
  if [ -f "$RUNS/$name/metrics.jsonl" ] && [ -f "$RUNS/$name/report/report.md" ]; then
    return
  elif [ -f "$RUNS/$name/manifest.json" ]; then
    recray run --resume "$RUNS/$name" "${COMMON[@]}" "$@"
  else
    recray run --runs "$RUNS" --name "$name" "${COMMON[@]}" "$@"
  fi
}
