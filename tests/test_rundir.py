import json
import os
import subprocess
import sys
import time

import pytest

from recray.errors import RecrayError
from recray.rundir import RunDir, config_diff


def test_stages_are_atomic_and_recorded(tmp_path):
    run = RunDir.create(tmp_path / "r", {"a": 1}, {"seed": 0})
    assert not run.done("it0/policy")
    with pytest.raises(RuntimeError):
        with run.stage("it0/policy") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("died mid-stage")
    assert not run.done("it0/policy") and not run.path("it0/policy").exists()
    with run.stage("it0/policy") as tmp:
        (tmp / "w.txt").write_text("y")
    assert run.done("it0/policy") and (run.path("it0/policy") / "w.txt").read_text() == "y"
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["format"] == "recray-run/1" and "it0/policy" in manifest["stages"]
    assert manifest["versions"]["ray"] and manifest["seeds"] == {"seed": 0}


def test_a_stage_says_what_it_made_on_its_done_line_and_the_next_one_starts_clean(tmp_path, caplog):
    run = RunDir.create(tmp_path / "r", {"a": 1}, {})
    with caplog.at_level("INFO", logger="recray.rundir"):
        with run.stage("it1/negatives"):
            run.outcome("64 rows of 64 samples")
        with run.stage("it1/sft"):
            pass
    done = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    assert len(done) == 2
    assert done[0].startswith("stage it1/negatives done in ") and done[0].endswith(" s: 64 rows of 64 samples")
    assert done[1].startswith("stage it1/sft done in ") and done[1].endswith(" s")


def test_a_stage_shows_its_start_line_only_when_it_runs_a_while(tmp_path, caplog, monkeypatch):
    import recray.rundir
    monkeypatch.setattr(recray.rundir, "START_LINE_AFTER_S", 0.3)
    run = RunDir.create(tmp_path / "r", {"a": 1}, {})
    with caplog.at_level("INFO", logger="recray.rundir"):
        with run.stage("it1/samples"):
            pass
        began = time.time()
        with run.stage("it1/sft"):
            time.sleep(0.8)
        with pytest.raises(ValueError):
            with run.stage("it1/policy"):
                raise ValueError("quick failure")
        time.sleep(0.6)                 # a cancelled start line would have shown by now
    lines = [(r.getMessage(), r.created) for r in caplog.records]
    assert [m for m, _ in lines] == ["stage it1/samples done in 0.0 s", "stage it1/sft started",
                                     "stage it1/sft done in 0.8 s"]
    assert abs(lines[1][1] - began) < 0.1        # stamped when the stage began, not when shown


def test_resume_sweeps_temp_dirs_and_keeps_finished_stages(tmp_path):
    run = RunDir.create(tmp_path / "r", {"a": 1}, {})
    with run.stage("it0/policy") as tmp:
        (tmp / "w.txt").write_text("y")
    (tmp_path / "r" / "it1").mkdir()
    (tmp_path / "r" / "it1" / "sft.tmp").mkdir()       # a stage a dead process left half-done
    run.release()
    again = RunDir.resume(tmp_path / "r", {"a": 1})
    assert again.done("it0/policy") and not (tmp_path / "r" / "it1" / "sft.tmp").exists()


def test_resume_with_another_config_refuses_and_shows_the_difference(tmp_path):
    RunDir.create(tmp_path / "r", {"train": {"beta": 0.1}, "n": 1}, {}).release()
    with pytest.raises(RecrayError, match=r"train.beta: 0.1 -> 0.5"):
        RunDir.resume(tmp_path / "r", {"train": {"beta": 0.5}, "n": 1})
    forced = RunDir.resume(tmp_path / "r", {"train": {"beta": 0.5}, "n": 1}, force=True)
    assert forced.manifest["forced_changes"][0]["diff"] == ["train.beta: 0.1 -> 0.5"]


def test_not_a_run_and_existing_dirs_are_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(RecrayError, match="not a recray run"):
        RunDir.resume(tmp_path / "other", {})
    with pytest.raises(RecrayError, match="already exists"):
        RunDir.create(tmp_path / "other", {}, {})


def test_two_live_writers_never_share_a_run(tmp_path):
    RunDir.create(tmp_path / "r", {"a": 1}, {}).release()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "r" / ".lock").write_text(str(holder.pid))
        with pytest.raises(RecrayError, match=f"process {holder.pid}"):
            RunDir.resume(tmp_path / "r", {"a": 1})
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its stale lock is taken over.
    assert RunDir.resume(tmp_path / "r", {"a": 1}).root == tmp_path / "r"
    assert (tmp_path / "r" / ".lock").read_text() == str(os.getpid())


def test_config_diff_is_dotted():
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 -> 3", "d: '<absent>' -> 4"]


# ------------------------------------------------------------ corrupted stages

STAGES = {"prepared": {"train/part-0.parquet": b"t" * 300, "catalog.parquet": b"c" * 200},
          "it0/policy": {"adapter/adapter_model.safetensors": bytes(range(256)) * 16,
                         "summary.json": b"{}"},
          "it0/eval/valid": {"result/predictions.parquet": b"p" * 500, "row.json": b"{}"},
          "it0/eval/test": {"result/predictions.parquet": b"q" * 500, "row.json": b"{}"}}


def _finished_run(root):
    """A run whose four stages finished in STAGES' order."""
    run = RunDir.create(root, {"a": 1}, {})
    for stage, files in STAGES.items():
        with run.stage(stage) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
    run.release()
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[:12])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def _add_beside(path):
    (path.parent / "extra.bin").write_bytes(b"x")


CORRUPTIONS = {   # how the adapter file is damaged -> the problem resume must name
    "truncated": (_truncate, "adapter/adapter_model.safetensors: size 12 != 4096"),
    "byte flipped": (_flip_byte, "adapter/adapter_model.safetensors: content differs (blake2b)"),
    "deleted": (lambda p: p.unlink(), "adapter/adapter_model.safetensors: missing"),
    "extra file": (_add_beside, "adapter/extra.bin: not in the stage record"),
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_stage_is_quarantined_with_the_stages_after_it(tmp_path, caplog, how):
    damage, problem = CORRUPTIONS[how]
    _finished_run(tmp_path / "r")
    adapter = tmp_path / "r" / "it0" / "policy" / "adapter" / "adapter_model.safetensors"
    damage(adapter)
    damaged = {p.relative_to(tmp_path / "r" / "it0" / "policy"): p.read_bytes()
               for p in (tmp_path / "r" / "it0" / "policy").rglob("*") if p.is_file()}

    with caplog.at_level("WARNING", logger="recray.rundir"):
        run = RunDir.resume(tmp_path / "r", {"a": 1})
    assert run.done("prepared")
    assert not any(run.done(s) for s in ("it0/policy", "it0/eval/valid", "it0/eval/test"))
    assert not run.path("it0/policy").exists() and not run.path("it0/eval/test").exists()
    warning = caplog.text
    assert f"stage it0/policy is corrupt ({problem}): moved to quarantine/it0__policy-" in warning
    assert ("the 2 stage(s) finished after it (it0/eval/valid, it0/eval/test) will be redone"
            in warning)
    # Nothing is lost: the corrupt copy and the later stages are in quarantine, as they were.
    moved = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "r" / "quarantine").iterdir()}
    assert set(moved) == {"it0__policy", "it0__eval__valid", "it0__eval__test"}
    assert {p.relative_to(moved["it0__policy"]): p.read_bytes()
            for p in moved["it0__policy"].rglob("*") if p.is_file()} == damaged
    assert (moved["it0__eval__test"] / "result" / "predictions.parquet").read_bytes() == b"q" * 500
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"prepared"}
    assert manifest["quarantined"][0]["corrupt"] == {"it0/policy": [problem]}
    with run.stage("it0/policy") as tmp:                 # redone as any stage not done
        (tmp / "w.txt").write_text("again")
    assert run.done("it0/policy")
    assert RunDir.resume(tmp_path / "r", {"a": 1}).done("it0/policy")   # and not moved again


def test_a_later_corrupt_stage_leaves_earlier_ones_and_siblings_alone(tmp_path, caplog):
    _finished_run(tmp_path / "r")
    _truncate(tmp_path / "r" / "it0" / "eval" / "valid" / "result" / "predictions.parquet")
    with caplog.at_level("WARNING", logger="recray.rundir"):
        run = RunDir.resume(tmp_path / "r", {"a": 1})
    assert run.done("prepared") and run.done("it0/policy")
    assert not run.done("it0/eval/valid") and not run.done("it0/eval/test")
    assert ("stage it0/eval/valid is corrupt (result/predictions.parquet: size 12 != 500)"
            in caplog.text)
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "r" / "quarantine").iterdir()) == [
        "it0__eval__test", "it0__eval__valid"]
    assert set(run.manifest["stages"]) == {"prepared", "it0/policy"}


def test_an_untouched_run_resumes_with_nothing_moved(tmp_path, caplog):
    _finished_run(tmp_path / "r")
    records = {s: (tmp_path / "r" / s / ".stage.json").read_text() for s in STAGES}
    with caplog.at_level("WARNING", logger="recray.rundir"):
        run = RunDir.resume(tmp_path / "r", {"a": 1})
    assert all(run.done(s) for s in STAGES) and not (tmp_path / "r" / "quarantine").exists()
    assert {s: (tmp_path / "r" / s / ".stage.json").read_text() for s in STAGES} == records
    assert not caplog.records and "quarantined" not in run.manifest
    record = json.loads(records["it0/policy"])
    assert record["seq"] == 2 and record["files"]["summary.json"]["size"] == 2
    assert "files" not in run.manifest["stages"]["it0/policy"]   # the manifest keeps a summary


def test_old_records_without_a_file_list_are_accepted_and_unreadable_ones_are_not(tmp_path, caplog):
    _finished_run(tmp_path / "r")
    (tmp_path / "r" / "prepared" / ".stage.json").write_text(
        json.dumps({"seconds": 1.0, "finished": "2025-01-01T00:00:00"}))   # before file lists
    _truncate(tmp_path / "r" / "prepared" / "catalog.parquet")
    (tmp_path / "r" / "it0" / "eval" / "test" / ".stage.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="recray.rundir"):
        run = RunDir.resume(tmp_path / "r", {"a": 1})
    assert run.done("prepared")                          # its files are not checked
    # An unreadable record says nothing of when its stage finished: it counts as the first,
    # so every stage recorded with an order is redone after it; the old record stays.
    assert not any(run.done(s) for s in ("it0/policy", "it0/eval/valid", "it0/eval/test"))
    assert run.manifest["quarantined"][0]["corrupt"] == {
        "it0/eval/test": [".stage.json: unreadable"]}
    assert "(its record gives no order: taken as the earliest)" in caplog.text


def test_nested_stages_are_refused(tmp_path):
    run = RunDir.create(tmp_path / "r", {}, {})
    with run.stage("it0/policy") as tmp:
        (tmp / "w.txt").write_text("y")
    for nested in ("it0", "it0/policy/adapter"):
        with pytest.raises(RecrayError, match=f"stage {nested} would nest with stage it0/policy"):
            with run.stage(nested):
                pass
    with run.stage("it0/policy2") as tmp:               # a name prefix is not nesting
        (tmp / "w.txt").write_text("z")
