"""A training worker process killed mid-epoch: Ray Train restarts the worker group from the
last checkpoint (FailureConfig) and the step still ends with a finished model.
Tiny model, 2 CPU workers, DeepSpeed ZeRO-2 (so the DeepSpeed optimizer shards are
checkpointed and restored too)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from recray.config import load_config
from recray.train import sft

from test_train_support import make_prepared, make_tiny_model

SAMPLES, EPOCHS, PER_DEVICE, WORKERS = 64, 2, 2, 2
STEPS = SAMPLES * EPOCHS // (PER_DEVICE * WORKERS)


def _workers(out) -> list[dict]:
    path = out / "workers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    model = make_tiny_model(tmp_path / "model")
    prepared = make_prepared(tmp_path / "prepared", n=SAMPLES)
    cfg = load_config(None, [
        "train.deepspeed.stage=2", f"train.per_device_batch_size={PER_DEVICE}",
        f"train.scaling.num_workers={WORKERS}", "train.save_steps=4", "train.logging_steps=4",
        f"train.sft.epochs={EPOCHS}", "train.sft.learning_rate=1e-3", "train.max_failures=1"])
    out = tmp_path / "out"
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = sft(model, prepared, out, cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Ray Train has registered a checkpoint (its checkpoint manager writes this snapshot on
    # every registration): that is the one a restarted worker group must resume from.
    deadline = time.time() + 400
    while time.time() < deadline and thread.is_alive():
        if list((out / "checkpoints").glob("*/checkpoint_manager_snapshot.json")) and len(_workers(out)) >= 2:
            break
        time.sleep(0.2)
    assert thread.is_alive(), f"training ended before the kill: {outcome}"
    victim = next(w for w in _workers(out) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=600)

    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    starts = _workers(out)
    assert len(starts) == 2 * WORKERS, starts                   # one restart of the whole group
    resumed = [w["resumed_from_step"] for w in starts[WORKERS:]]
    assert all(r is not None and 4 <= r < STEPS for r in resumed), resumed
    assert victim["pid"] not in {w["pid"] for w in starts[WORKERS:]}
    assert result.metrics["steps"] == STEPS                     # the epoch was finished, not cut
    steps_logged = [h["step"] for h in result.log_history if "loss" in h]
    assert steps_logged[-1] == STEPS and steps_logged == sorted(set(steps_logged))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), result.adapter_dir)
    assert trained.config.hidden_size == 32 and result.model_dir is None   # no merged copy asked
    print(f"\nkilled rank 1 (pid {victim['pid']}); resumed from step {resumed[0]}; "
          f"finished {time.time() - killed_at:.0f} s after the kill")
