import json
import os
import subprocess
import sys

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
