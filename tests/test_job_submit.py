"""A real `ray job submit` of jobs/sprec.py to a Ray head this test starts (and alone stops)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ray_nodes import free_port, node_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_the_pipeline(ray_session, tiny_pi0, tmp_path):
    # ray_session: a new local ray.init() writes ~/.ray/auth_token if missing (fresh machines),
    # the token the head started here and its clients authenticate with.
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path(f"/tmp/recray-head-{os.getpid()}")        # short: Ray's socket paths are limited
    # The job's `python` is whatever the head's PATH finds first: this suite's interpreter.
    env = {**os.environ, "RAY_AUTH_MODE": "token",            # Ray 2.60 heads require the token
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", *node_ports()],
        start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
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
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)              # whatever of OUR head is left
        except ProcessLookupError:
            pass
        head.wait()
