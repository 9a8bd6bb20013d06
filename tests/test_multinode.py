"""A real 2-node Ray cluster on this machine: `ray start --head` (1 CPU, resource node_head)
plus `ray start --address` (1 CPU, resource node_b), both started, and alone stopped, by this
test. An SFT step with train.scaling.num_workers=2, cpus_per_worker=1 must place one worker on
each node; the node ids each rank reports (TrainResult.workers) are checked against the ids
of the two nodes, and the step must end with a merged model. Then node b is lost mid-fit: the
fit waits for it and resumes from its last checkpoint once a node b is back.

The driver runs in a subprocess joined through ray.address: the pytest process may already
hold the session's local Ray instance (conftest.ray_session), and a driver is bound to the
cluster it first joined."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ray_nodes import free_port, node_ports
from test_train_support import make_prepared, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start_node(args: list[str], temp_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    """`ray start --block` in its own session: its process group is ours to kill."""
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--num-gpus=0",
         "--disable-usage-stats", *node_ports(), *args],
        start_new_session=True, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"the Ray head did not listen on {port}:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def _send(groups: list[subprocess.Popen], processes: list, sig: signal.Signals) -> None:
    import psutil
    for p in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
    for q in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            q.send_signal(sig)


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM each started node's process group and every process below it (Ray workers
    run in process groups of their own), SIGKILL what is left after 30 s. Nothing else."""
    import psutil
    mine: list[psutil.Process] = []
    for p in procs:
        try:
            mine += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    _send(procs, mine, signal.SIGTERM)
    _, alive = psutil.wait_procs(mine, timeout=30)
    _send(procs, alive, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
    _, alive = psutil.wait_procs(alive, timeout=30)
    return [q.pid for q in alive]


def _cluster_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token",          # Ray 2.60: the token is ~/.ray/auth_token
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _start_head(gcs_port: int, temp_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    head = _start_node(
        ["--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
         "--num-cpus=1", '--resources={"node_head": 1}'], temp_dir, log, env)
    _wait_port(gcs_port, head, log)
    return head


def _start_b(address: str, temp_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    return _start_node([f"--address={address}", "--num-cpus=1", '--resources={"node_b": 1}'],
                       temp_dir, log, env)


def test_two_workers_on_two_nodes(ray_session, tmp_path):
    # ray_session: a new local ray.init() writes ~/.ray/auth_token if missing (fresh machines),
    # the token both nodes and the driver authenticate with.
    model = make_tiny_model(tmp_path / "model")
    prepared = make_prepared(tmp_path / "prepared", n=16)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    tag = f"/tmp/recray-mn-{os.getpid()}"                  # short: Ray's socket paths are limited
    head_dir, b_dir = Path(f"{tag}-h"), Path(f"{tag}-b")
    env = _cluster_env()
    started: list[subprocess.Popen] = []
    try:
        started.append(_start_head(gcs_port, head_dir, tmp_path / "head.log", env))
        started.append(_start_b(address, b_dir, tmp_path / "node_b.log", env))

        out = tmp_path / "result.json"
        driver = subprocess.run(
            [sys.executable, __file__, address, str(model), str(prepared), str(tmp_path / "sft"),
             str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
            start_new_session=True)
        assert driver.returncode == 0, (driver.stdout[-4000:] + driver.stderr[-6000:]
                                        + (tmp_path / "node_b.log").read_text()[-2000:])
        got = json.loads(out.read_text())
        nodes = got["nodes"]                    # resource label -> node id, from ray.nodes()
        assert set(nodes) == {"node_head", "node_b"} and nodes["node_head"] != nodes["node_b"]
        workers = got["workers"]                # per rank, reported by the workers themselves
        assert [w["rank"] for w in workers] == [0, 1], workers
        assert {w["node_id"] for w in workers} == set(nodes.values()), (workers, nodes)
        assert got["summary"]["workers"] == workers          # summary.json records it too
        starts = [json.loads(line) for line in
                  (tmp_path / "sft" / "workers.jsonl").read_text().splitlines()]
        assert {w["node_id"] for w in starts} == set(nodes.values())
        assert got["summary"]["steps"] == 4                  # 16 samples / (2 workers x 2)
        from transformers import AutoModelForCausalLM
        merged = AutoModelForCausalLM.from_pretrained(got["model_dir"])
        assert merged.config.hidden_size == 32
        print(f"\nrank->node: {[(w['rank'], w['node_id'][:8]) for w in workers]}; "
              f"nodes {({k: v[:8] for k, v in nodes.items()})}; fit {got['summary']['seconds']} s")
    finally:
        left = _stop(started)
        for d in (head_dir, b_dir):
            shutil.rmtree(d, ignore_errors=True)
    assert not left, f"processes of our nodes still alive after SIGKILL: {left}"


def _workers(out: Path) -> list[dict]:
    path = out / "workers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


LOSS_SAMPLES = 64                          # 16 steps of 2 workers x 2, a checkpoint every 2
LOSS_STEPS = LOSS_SAMPLES // 4


def test_node_lost_mid_fit_the_fit_waits_and_resumes_when_it_is_back(ray_session, tmp_path):
    """Node b is killed (its `ray start` process group and every process below it) after the
    fit's first checkpoint. With a fixed num_workers=2 the fit cannot go on with one node:
    it must still be running, with no worker group restarted, 30 s later; node b is started
    again (a new node), and the fit must resume from a checkpoint and finish every step."""
    import psutil
    model = make_tiny_model(tmp_path / "model")
    prepared = make_prepared(tmp_path / "prepared", n=LOSS_SAMPLES)
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    tag = f"/tmp/recray-nl-{os.getpid()}"
    head_dir, b_dir, b2_dir = Path(f"{tag}-h"), Path(f"{tag}-b"), Path(f"{tag}-b2")
    env = _cluster_env()
    out, sft_dir = tmp_path / "result.json", tmp_path / "sft"
    started: list[subprocess.Popen] = []
    driver = None
    try:
        started.append(_start_head(gcs_port, head_dir, tmp_path / "head.log", env))
        started.append(_start_b(address, b_dir, tmp_path / "node_b.log", env))
        driver = subprocess.Popen(
            [sys.executable, __file__, address, str(model), str(prepared), str(sft_dir), str(out),
             "train.save_steps=2", "train.merge_adapter=false",
             "train.max_failures=1"],
            cwd=ROOT, env=env, start_new_session=True,
            stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while not (list((sft_dir / "checkpoints").glob("*/checkpoint_manager_snapshot.json"))
                   and len(_workers(sft_dir)) >= 2):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint within 400 s"
            time.sleep(0.5)
        first = _workers(sft_dir)
        assert not out.exists(), "the fit ended before node b could be lost"
        node_b = started.pop()
        below = psutil.Process(node_b.pid).children(recursive=True)
        _send([node_b], below, signal.SIGKILL)               # the whole node, at once
        node_b.wait(timeout=30)
        psutil.wait_procs(below, timeout=30)
        lost_at = time.time()

        time.sleep(30)                  # node b is marked dead; a restart on one node waits
        assert driver.poll() is None, ("the fit ended while node b was gone:\n"
                                       + (tmp_path / "driver.log").read_text()[-4000:])
        assert len(_workers(sft_dir)) == 2, _workers(sft_dir)   # no group on one node
        started.append(_start_b(address, b2_dir, tmp_path / "node_b2.log", env))
        back_at = time.time()
        driver.wait(timeout=600)
        assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-6000:]
        done_at = time.time()

        starts = _workers(sft_dir)
        assert len(starts) == 4, starts                       # one restart, after the node was back
        restarted = starts[2:]
        assert all(w["time"] > back_at for w in restarted), (back_at, restarted)
        resumed = [w["resumed_from_step"] for w in restarted]
        assert all(r is not None and 2 <= r < LOSS_STEPS for r in resumed), resumed
        old_b = {w["node_id"] for w in first} - {w["node_id"] for w in restarted}
        assert len(old_b) == 1                                # the lost node is not used again
        got = json.loads(out.read_text())
        assert got["summary"]["steps"] == LOSS_STEPS         # every step, none cut
        print(f"\nnode b lost after a checkpoint; fit waited {back_at - lost_at:.0f} s, resumed "
              f"from step {resumed[0]} on the new node b, finished {done_at - back_at:.0f} s later")
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        left = _stop(started)
        for d in (head_dir, b_dir, b2_dir):
            shutil.rmtree(d, ignore_errors=True)
    assert not left, f"processes of our nodes still alive after SIGKILL: {left}"


def _driver(address: str, model: str, prepared: str, output: str, result: str,
            *overrides: str) -> None:
    """The training driver: join the 2-node cluster through ray.address, wait for both
    nodes, run sft with 2 workers of 1 CPU (`overrides` after the defaults)."""
    import logging

    import ray

    from recray.config import load_config
    from recray.runtime import init_ray
    from recray.train import sft

    logging.basicConfig(level=logging.INFO)
    cfg = load_config(None, [
        f"ray.address={address}", "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=1",
        "train.per_device_batch_size=2", "train.sft.epochs=1", "train.logging_steps=2",
        "train.save_steps=1000", "train.sft.learning_rate=1e-3", "train.merge_adapter=true",
        *overrides])
    init_ray(cfg.ray)                               # what sft() does; joins, starts nothing
    deadline = time.time() + 300
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = {label: n["NodeID"] for n in alive for label in ("node_head", "node_b")
                 if label in n["Resources"]}
        if len(nodes) == 2:
            break
        assert time.time() < deadline, f"the second node did not join: {alive}"
        time.sleep(2)
    assert len(alive) == 2, alive
    r = sft(model, prepared, output, cfg)
    Path(result).write_text(json.dumps({"nodes": nodes, "workers": r.workers,
                                        "summary": r.metrics, "model_dir": str(r.model_dir)}))


if __name__ == "__main__":
    _driver(*sys.argv[1:])
