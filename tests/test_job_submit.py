"""A real `ray job submit` of jobs/sprec.py to a Ray head this test starts (and alone stops)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ray_nodes import free_port, node_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start_head(env: dict, temp_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A Ray head on fresh ports, once its job API answers: (process, dashboard address).

    free_port() only finds a port free at that moment, and the suite's own Ray instance
    keeps opening ports, so a head can lose one of its ports before it binds it; it then
    exits at once. That race is the test's, not the subject's: such a head is started again
    on new ports (at most twice more), and each exit is reported as a warning with the
    head's own output. A head that runs but never answers fails the test."""
    for attempt in range(3):
        gcs_port, dashboard_port = free_port(), free_port()
        with open(log, "w") as out:
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                 *node_ports()],
                start_new_session=True, env=env, stdout=out, stderr=subprocess.STDOUT)
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            if head.poll() is not None:
                break
            if time.time() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
                raise AssertionError("the Ray head did not come up in 120 s:\n"
                                     + log.read_text()[-3000:])
            time.sleep(2)
        else:
            return head, address
        try:
            os.killpg(head.pid, signal.SIGKILL)       # whatever it started before it exited
        except ProcessLookupError:
            pass
        tail = log.read_text()[-2000:]
        warnings.warn(f"the Ray head exited before it came up (start {attempt + 1} of 3, "
                      f"rc {head.returncode}):\n{tail}")
    raise AssertionError(f"the Ray head exited before it came up, three times:\n{tail}")


def test_ray_job_submit_runs_the_pipeline(ray_session, tiny_pi0, tmp_path):
    # ray_session: a new local ray.init() writes ~/.ray/auth_token if missing (fresh machines),
    # the token the head started here and its clients authenticate with.
    temp_dir = Path(f"/tmp/recray-head-{os.getpid()}")        # short: Ray's socket paths are limited
    # The job's `python` is whatever the head's PATH finds first: this suite's interpreter.
    env = {**os.environ, "RAY_AUTH_MODE": "token",            # Ray 2.60 heads require the token
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head, address = _start_head(env, temp_dir, tmp_path / "head.log")
    try:
        runs = tmp_path / "runs"
        submit = [str(BIN / "ray"), "job", "submit", "--address", address,
                  "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "jobs/sprec.py",
                  "--runs", str(runs), "--name", "job", *tiny_pi0]
        done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout + done.stderr
        run = runs / "job"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["format"] == "recray-run/1"
        assert {"prepared", "it0/policy", "it1/policy", "it1/eval/test"} <= set(manifest["stages"])
        assert (run / "report" / "report.md").exists()
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)              # whatever of OUR head is left
        except ProcessLookupError:
            pass
        head.wait()
