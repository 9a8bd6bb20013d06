"""What a run shows (recray.runlog): the console gets recray's lines and actionable
warnings, the run log file gets everything; Ray worker lines are filtered the same way."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from recray import runlog


@pytest.fixture
def console():
    """The root logger and stdout restored after a test sets up the console (in its body:
    the handler keeps the stderr it finds, and capfd's exists only there)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    if runlog._state["file"] is not None:
        runlog._state["file"].close()
        runlog._state["file"] = None
    if isinstance(sys.stdout, runlog._Tee):
        sys.stdout = sys.stdout.console
    root.handlers, root.level = saved


def test_console_keeps_recray_lines_and_warnings_the_file_keeps_all(capfd, console, tmp_path):
    runlog.setup_console(verbose=False)
    runlog.to_file(tmp_path / "run.log")
    runlog.route_ray_output()
    logging.getLogger("recray.loop").info("iteration 1 valid: HR@5 0.1")
    logging.getLogger("ray.data").info("Total Progress: 3/?")
    logging.getLogger("vllm").warning("disk nearly full")
    logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
    print("| a table |")
    shown = capfd.readouterr()
    text = (tmp_path / "run.log").read_text()
    assert "full log: " + str(tmp_path / "run.log") in shown.err.splitlines()[0]
    assert "iteration 1 valid" in shown.err and "disk nearly full" in shown.err
    assert "Total Progress" not in shown.err and "Token authentication" not in shown.err
    assert "| a table |" in shown.out
    for line in ("iteration 1 valid", "Total Progress: 3/?", "disk nearly full",
                 "Token authentication", "| a table |"):
        assert line in text


def test_worker_lines_reach_the_file_and_only_recray_and_errors_the_console(
        ray_session, capfd, console, tmp_path):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    runlog.setup_console(verbose=False)
    runlog.to_file(tmp_path / "run.log")
    runlog.route_ray_output()
    try:
        dispatcher.emit({"pid": 41, "actor_name": "GenerationActor", "task_name": None,
                         "is_err": True, "ip": "127.0.0.1", "lines": [
                             "INFO [core.py:133] Initializing a V1 LLM engine with config: "
                             "model='/root/.cache/recray/smollm2'",
                             "12:00:01 recray.train sft step 5/10 ETA 30s loss 2.1",
                             "ValueError: the adapter folder is empty"]})
        dispatcher.emit({"pid": 42, "actor_name": "PlacementGroupCleaner", "task_name": None,
                         "is_err": True, "ip": "127.0.0.1",
                         "lines": ["Failed to query Ray Train Controller actor state."]})
        dispatcher.emit({"pid": "gcs_server", "actor_name": None, "task_name": None,
                         "is_err": True, "ip": "127.0.0.1", "lines": [
                             "[2026-12-06 22:15:11,446 E 20430 20430] (gcs_server) "
                             "gcs_actor_scheduler.cc:538: Failed to kill actor NIL_ID, return "
                             "status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: "
                             "RPC error: Socket closed rpc_code: 14"]})
        dispatcher.emit({"pid": "gcs_server", "actor_name": None, "task_name": None,
                         "is_err": True, "ip": "127.0.0.1", "lines": [
                             "[2026-12-07 21:26:09,328 E 12444 12444] (gcs_server) "
                             "gcs_actor_scheduler.cc:538: Failed to kill actor 43f8d90e4b140126fe1a"
                             "3d0c01000000, return status: Invalid: KillActor RPC failed for actor "
                             "43f8d90e4b140126fe1a3d0c01000000: RpcError: RPC error: Socket closed "
                             "rpc_code: 14",
                             "[2026-12-07 21:26:10,000 E 12444 12444] (gcs_server) "
                             "gcs_actor_scheduler.cc:538: Failed to kill actor 43f8d90e4b140126fe1a"
                             "3d0c01000000, return status: Invalid: KillActor RPC failed for actor "
                             "43f8d90e4b140126fe1a3d0c01000000: RpcError: RPC error: Deadline "
                             "Exceeded rpc_code: 4"]})
    finally:
        dispatcher.remove_handler("recray_print_logs")
    shown = capfd.readouterr().err
    text = (tmp_path / "run.log").read_text()
    assert "sft step 5/10" in shown and "ValueError: the adapter folder is empty" in shown
    assert "Initializing a V1 LLM engine" not in shown and "Failed to query" not in shown
    assert "(GenerationActor pid=41) INFO [core.py:133] Initializing" in text
    assert "(PlacementGroupCleaner pid=42) Failed to query" in text
    assert "Failed to kill actor NIL_ID" not in shown and "Failed to kill actor NIL_ID" in text
    assert "Socket closed" not in shown and text.count("Socket closed") == 2     # exited actors
    assert "Deadline Exceeded rpc_code: 4" in shown           # a kill that failed otherwise


def test_progress_logs_counts_rate_and_eta_off_a_terminal(capfd, console, monkeypatch):
    runlog.setup_console(verbose=False)
    clock = iter(range(0, 1000, 40))              # 40 s between items: one line per item
    monkeypatch.setattr(runlog, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    blocks = list(runlog.progress([4, 4, 2], total=10, what="generate", unit="prompts",
                                  size=lambda n: n))
    assert blocks == [4, 4, 2]
    lines = [line.split(" INFO ", 1)[1] for line in capfd.readouterr().err.splitlines()]
    assert lines == ["generate: 4/10 prompts (40%), 0.10 prompts/s, ETA 1m00s",
                     "generate: 8/10 prompts (80%), 0.10 prompts/s, ETA 20s",
                     "generate: 10 prompts in 2m40s (0.06 prompts/s)"]


def test_work_shorter_than_one_interval_leaves_its_rate_to_the_log_file(capfd, console, monkeypatch, tmp_path):
    """Its stage's done line tells the console; the rate line would only repeat it."""
    runlog.setup_console(verbose=False)
    runlog.to_file(tmp_path / "run.log")
    clock = iter(range(0, 1000, 5))                # 5 s between items: no interim line
    monkeypatch.setattr(runlog, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert list(runlog.progress([4, 4, 2], total=10, what="generate", unit="prompts",
                                size=lambda n: n)) == [4, 4, 2]
    assert "generate:" not in capfd.readouterr().err
    runlog._state["file"].flush()
    assert "generate: 10 prompts in 20s (0.50 prompts/s)" in (tmp_path / "run.log").read_text()
