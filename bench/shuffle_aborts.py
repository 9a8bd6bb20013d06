"""Reliability check: does Ray 2.60's `HashShuffleMap` worker still abort (abseil "Mutex
corrupt", SIGABRT) in `recray prepare`? Seen once in 72 worker processes on 2026-12-01,
in a Ray session started while another one was busy on the machine (docs/prepare.md).

    python bench/shuffle_aborts.py --runs 60 --parallel 2       # venv active

Runs `recray prepare` on a synthetic log (10 files, so 10 shuffle map tasks per run)
`--runs` times, `--parallel` at once (each its own local Ray instance, as on 2026-12-01),
then reads every Ray session those runs left under /tmp/ray: the worker processes that ran
a `HashShuffleMap` task, the tasks, and every abort marker in any of the session's logs.
Every run's output must be byte-identical to the first's (a retried task must not change
it). Prints the counts and what they bound: the 95% upper limit on the abort rate per
process and per task, and how likely zero aborts would be at 2026-12-01's rate.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare import synthetic_log  # noqa: E402  (bench/prepare.py: the benchmark's log)

RAY_TMP = Path("/tmp/ray")
TASK_MARKER = ":task_name:HashShuffleMap"
ABORT = re.compile(r"Mutex corrupt|RAW: Lock blocking|SIGABRT|Fatal Python error|"
                   r"\*\*\* SIG[A-Z]+ received|Check failed")
OBSERVED_2026_12_01 = (1, 72)    # aborts, worker processes that ran HashShuffleMap


def run_prepare(data: Path, out: Path, cpus: int) -> tuple[int, str]:
    cmd = ["recray", "prepare", "--format", "table", "--input", str(data / "log"),
           "--output", str(out), f"data.catalog={data / 'catalog.parquet'}", f"ray.num_cpus={cpus}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.returncode, done.stderr[-2000:]


def output_digest(out: Path) -> str:
    """Every file of a prepared directory but stats.json (it holds timings)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "stats.json"):
        digest.update(path.relative_to(out).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def scan_session(session: Path) -> dict:
    """HashShuffleMap processes and tasks of one Ray session, and its abort lines."""
    processes = tasks = 0
    for out in (session / "logs").glob("worker-*.out"):
        n = out.read_text(errors="replace").count(TASK_MARKER)
        processes += n > 0
        tasks += n
    aborts = []
    for path in (session / "logs").rglob("*"):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            for line in path.read_text(errors="replace").splitlines():
                if ABORT.search(line):
                    aborts.append(f"{path.name}: {line.strip()[:200]}")
    return {"processes": processes, "tasks": tasks, "aborts": aborts}


def upper_95(n: int) -> float:
    """The largest per-trial rate that still gives zero events in n trials 5% of the time."""
    return 1 - 0.05 ** (1 / n) if n else 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--parallel", type=int, default=2, help="prepare runs at once")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cpus", type=int, default=2, help="ray.num_cpus of each run")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recray-aborts-"))
    data = work / "log"
    if not (data / "catalog.parquet").exists():
        synthetic_log(args.rows, data, rows_per_file=args.rows // 10)
    before = set(RAY_TMP.glob("session_2*")) if RAY_TMP.exists() else set()
    start = time.time()
    done = 0

    def one(k: int) -> tuple[int, int, str, str]:
        nonlocal done
        out = work / f"out-{k:03d}"
        rc, err = run_prepare(data, out, args.cpus)
        digest = output_digest(out) if rc == 0 else ""
        done += 1
        print(f"run {k}: rc {rc}, {done}/{args.runs} done, {time.time() - start:.0f} s", flush=True)
        return k, rc, err, digest

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(one, range(args.runs)))
    seconds = time.time() - start

    failed = [(k, err) for k, rc, err, _ in results if rc != 0]
    digests = {d for _, rc, _, d in results if rc == 0}
    sessions = sorted(set(RAY_TMP.glob("session_2*")) - before)
    scans = [scan_session(s) for s in sessions]
    processes = sum(s["processes"] for s in scans)
    tasks = sum(s["tasks"] for s in scans)
    aborts = [(s.name, line) for s, scan in zip(sessions, scans) for line in scan["aborts"]]

    seen, of = OBSERVED_2026_12_01
    print(f"\n{args.runs} `recray prepare` runs of {args.rows:,} rows, {args.parallel} at once, "
          f"{args.cpus} Ray CPUs each, {seconds / 60:.1f} min on this machine")
    print("| runs failed | outputs | Ray sessions | processes that ran HashShuffleMap "
          "| HashShuffleMap tasks | abort lines |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(failed)} | {'all identical' if len(digests) <= 1 else f'{len(digests)} different'} "
          f"| {len(sessions)} | {processes} | {tasks} | {len(aborts)} |")
    for session, line in aborts[:20]:
        print(f"  {session}: {line}")
    for k, err in failed[:5]:
        print(f"  run {k} failed:\n{err}")
    if not aborts:
        print(f"\nzero aborts: the rate is below {upper_95(processes):.2%} per process and "
              f"{upper_95(tasks):.2%} per task (95% upper limits); at 2026-12-01's rate "
              f"({seen} in {of} processes) zero aborts in {processes} processes has probability "
              f"{(1 - seen / of) ** processes:.3f}")
    if failed or len(digests) > 1:
        raise SystemExit("a run failed or the outputs differ")


if __name__ == "__main__":
    main()
