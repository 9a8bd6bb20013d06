"""Trainer callbacks inside the Ray Train workers: a progress line per log step, and
checkpoints handed to Ray Train (which keeps them in its storage and restores them after a
worker failure)."""

from __future__ import annotations

import logging
import time

import ray.train
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

log = logging.getLogger("recray.train")


def scalar_metrics(log_history: list[dict]) -> dict:
    """The latest value of every numeric key in the trainer's log history."""
    out: dict = {}
    for entry in log_history:
        out.update({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))})
    return out


class Progress(TrainerCallback):
    """One line per log step: step, epoch, loss, lr, tokens/s (+ DPO reward accuracy/margin).
    tokens/s goes into the log history too, so the run's train_log.jsonl has it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.last: tuple[float, float] | None = None
        self.began: tuple[float, int] | None = None     # (time, step): a resumed fit starts late

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.time(), 0.0)
        self.began = (self.last[0], state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now, tokens = time.time(), float(logs.get("num_tokens", 0.0))
        then, before = self.last or (now, tokens)
        speed = (tokens - before) / (now - then) if now > then else 0.0
        self.last = (now, tokens)
        state.log_history[-1]["tokens_per_second"] = speed
        began, first = self.began or (now, 0)
        eta = ((now - began) * (state.max_steps - state.global_step)
               / max(state.global_step - first, 1))
        line = (f"{self.kind} step {state.global_step}/{state.max_steps} ETA {eta:.0f}s "
                f"epoch {logs.get('epoch', 0):.2f} loss {logs['loss']:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e} tokens/s {speed:.0f}")
        if "rewards/accuracies" in logs:
            line += (f" reward_acc {logs['rewards/accuracies']:.3f}"
                     f" margin {logs.get('rewards/margins', 0):.4f}")
        log.info(line)


class ReportCheckpoint(TrainerCallback):
    """After each HF save: wait for every rank's files, then each node's local rank 0 hands
    the checkpoint folder (model/adapter, optimizer or DeepSpeed shards, RNG, trainer
    state) to Ray Train; Ray merges the nodes' uploads into one checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        source = get_last_checkpoint(args.output_dir)
        metrics = {**scalar_metrics(state.log_history), "step": state.global_step}
        if ray.train.get_context().get_local_rank() == 0 and source is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(source))
        else:
            ray.train.report(metrics, checkpoint=None)
