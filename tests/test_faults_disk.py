"""Storage faults: a disk that fills while a stage writes, and a stage directory corrupted
after it finished (docs/reliability.md).

A full disk is a real OSError from the kernel, made without root or mounts: the writing
process runs under RLIMIT_FSIZE, so a write past the limit fails with EFBIG (CPython ignores
SIGXFSZ), the same path in recray as ENOSPC. Only the writer is limited: in the end-to-end
test the limit is set when stage it0/eval/valid starts, after the local Ray has started, so
Ray's own processes are not limited (they would be, as children of a limited driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recray.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------ RunDir.stage under a size limit

# The child: finish stage "prepared", then limit file sizes and write stage it0/policy.
# Limit 0: the manifest's size now, which the next, longer manifest cannot be written in.
CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from recray.rundir import RunDir
    root, limit, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run = RunDir.resume(root, {"a": 1})
    with run.stage("prepared") as tmp:
        (tmp / "catalog.parquet").write_bytes(b"c" * 64)
    limit = limit or (root / "manifest.json").stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        with run.stage("it0/policy") as tmp:
            (tmp / "adapter.safetensors").write_bytes(b"w" * size)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.parametrize("case", ["a file of the stage", "the stage record", "the manifest"])
def test_a_full_disk_never_leaves_an_incomplete_stage_marked_done(tmp_path, case):
    root = tmp_path / "r"
    RunDir.create(root, {"a": 1}, {}).release()
    limit, size = {"a file of the stage": (4096, 10_000),       # the data file fails half-written
                   "the stage record": (100, 50),              # the data fits, its record not
                   "the manifest": (0, 50)}[case]      # the stage fits (record ~200 B of ~500)
    child = subprocess.run([sys.executable, "-c", CHILD, str(root), str(limit), str(size)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stderr
    assert "RecrayError" in child.stderr and "[Errno 27]" in child.stderr, child.stderr
    manifest = json.loads((root / "manifest.json").read_text())       # still valid JSON
    assert "prepared" in manifest["stages"] and "it0/policy" not in manifest["stages"]
    assert not (root / "it0" / "policy.tmp").exists()          # its space was given back

    run = RunDir.resume(root, {"a": 1})
    assert run.done("prepared") and "quarantined" not in run.manifest
    if case == "the manifest":
        # The stage was complete when the manifest failed: its record verifies on resume.
        assert "could not be written" in child.stderr and "manifest.json" in child.stderr
        assert run.done("it0/policy") and "it0/policy" in run.manifest["stages"]
        assert (run.path("it0/policy") / "adapter.safetensors").read_bytes() == b"w" * size
        return
    assert "stage it0/policy could not be written" in child.stderr
    assert not run.done("it0/policy") and not run.path("it0/policy").exists()
    with run.stage("it0/policy") as tmp:                        # space freed: written now
        (tmp / "adapter.safetensors").write_bytes(b"w" * size)
    assert RunDir.resume(root, {"a": 1}).done("it0/policy")


# ------------------------------------------------------------ a whole tiny run (MostPop, no LLM)

RUN = ["-c", "configs/ml100k.yaml", "loop.method=mostpop", "data.n_train=16", "data.n_valid=16",
       "data.n_test=16", "evaluate.splits=[valid]"]

# `recray run` whose files may not grow past LIMIT bytes from the moment stage
# it0/eval/valid starts (its predictions.parquet is ~3 kB): the disk fills mid-stage.
FILLS_UP = textwrap.dedent("""
    import resource, sys
    from recray import rundir
    from recray.cli import main
    LIMIT, stage = int(sys.argv[1]), rundir.RunDir.stage
    def stage_on_a_full_disk(self, name):
        if name == "it0/eval/valid":
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return stage(self, name)
    rundir.RunDir.stage = stage_on_a_full_disk
    sys.exit(main(sys.argv[2:]))
""")


def _recray(args: list[str], timeout: int = 600, wrapper: list[str] | None = None):
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    cmd = [sys.executable, *(wrapper or ["-m", "recray.cli"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _records(run: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(run)): p.read_text() for p in run.rglob(".stage.json")
            if "quarantine" not in p.parts}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A finished tiny MostPop run; its metrics and predictions are read before any test
    alters the directory (the corruption test does)."""
    runs = tmp_path_factory.mktemp("runs")
    done = _recray(["run", "--runs", str(runs), "--name", "clean", *RUN])
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "clean"
    predictions = pq.read_table(run / "it0" / "eval" / "valid" / "result" / "predictions.parquet")
    return run, _rows(run), predictions


def test_disk_full_mid_stage_fails_clearly_and_resume_finishes(clean_run, tmp_path):
    _, clean_rows, _ = clean_run
    run = tmp_path / "runs" / "full"
    start = time.time()
    failed = _recray(["run", "--runs", str(tmp_path / "runs"), "--name", "full", *RUN],
                     wrapper=["-c", FILLS_UP, "1000"])
    assert failed.returncode == 2, failed.stderr[-3000:]
    # Ray's log writer in the driver process also hits the limit and says so on exit.
    [error] = [line for line in failed.stderr.splitlines() if line.startswith("recray run: error")]
    assert error.startswith("recray run: error: stage it0/eval/valid could not be written "
                            "([Errno 27] "), error
    assert f"resume with `recray run --resume {run}`" in error
    before = _records(run)
    assert set(before) == {"prepared"}                   # the stage in flight is not done
    assert not (run / "it0" / "eval" / "valid").exists()
    assert not list(run.rglob("*.tmp"))
    assert set(json.loads((run / "manifest.json").read_text())["stages"]) == {"prepared"}

    resumed = _recray(["run", "--resume", str(run), *RUN])     # space freed: no limit
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _records(run)
    assert after["prepared"] == before["prepared"]      # not recomputed
    assert set(after) == {"prepared", "it0/eval/valid"}
    assert _rows(run) == clean_rows and not (run / "quarantine").exists()
    print(f"\nfull disk at it0/eval/valid: {error}\nfailed run + resume in "
          f"{time.time() - start:.0f} s")


def test_corrupt_stage_is_detected_on_resume_and_redone(clean_run):
    run, clean_rows, clean_predictions = clean_run
    predictions = run / "it0" / "eval" / "valid" / "result" / "predictions.parquet"
    data = bytearray(predictions.read_bytes())
    data[len(data) // 2] ^= 0xFF                         # same size: only the digest tells
    predictions.write_bytes(bytes(data))
    before = _records(run)

    resumed = _recray(["run", "--resume", str(run), *RUN])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("stage it0/eval/valid is corrupt (result/predictions.parquet: content differs "
            "(blake2b)): moved to quarantine/it0__eval__valid-") in resumed.stderr
    assert "; it will be redone" in resumed.stderr       # no stage finished after it
    after = _records(run)
    assert after["prepared"] == before["prepared"]       # the stage before it is kept
    assert after["it0/eval/valid"] != before["it0/eval/valid"]     # redone
    assert pq.read_table(predictions).equals(clean_predictions)
    assert _rows(run) == clean_rows
    [bad] = (run / "quarantine").iterdir()
    assert (bad / "result" / "predictions.parquet").read_bytes() == bytes(data)
    assert json.loads((run / "manifest.json").read_text())["quarantined"][0]["corrupt"] == {
        "it0/eval/valid": ["result/predictions.parquet: content differs (blake2b)"]}
