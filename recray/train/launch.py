"""The SFT and DPO steps, driver side: check everything, then one Ray Train fit.

    sft(model, data, output, cfg)        -> output/{adapter/, summary.json, train_log.jsonl}
    dpo(model, negatives, output, cfg)   -> the same; the reference is `model` itself

Every problem with the inputs (config, model/adapter folders, data, lengths) is raised
before a worker starts. Training runs as a TorchTrainer of train.scaling.num_workers
workers with FailureConfig(max_failures) and Ray Train checkpoints every save_steps. Full
fine-tuning writes model/; LoRA writes adapter/, and model/ (the adapter merged into
`model`, in a separate Ray task) only with train.merge_adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray

from recray.config import Config
from recray.errors import ConfigError, RecrayError
from recray.runlog import file_only
from recray.runtime import init_ray, unwrap
from recray.train import inputs
from recray.train.deepspeed import deepspeed_config, extensions_dir, precision
from recray.train.models import (check_adapter_dir, check_model_dir, copy_tokenizer,
                                 merge_task)
from recray.train.worker import Job, train_loop

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: Path
    model_dir: Path | None          # full model (None: LoRA without train.merge_adapter)
    adapter_dir: Path | None        # the LoRA adapter on top of the input model (None: full FT)
    metrics: dict                   # summary: loss, tokens/s, reward accuracy (DPO), data counts
    log_history: list[dict] = field(default_factory=list)
    workers: list[dict] = field(default_factory=list)   # per rank: node_id, node_ip, pid

    def line(self) -> str:
        """The fit in a few words, for its stage's done line."""
        m = self.metrics
        loss = "" if m.get("train_loss") is None else f", train loss {m['train_loss']:.4f}"
        speed = "" if not m.get("tokens_per_second") else f", {m['tokens_per_second']:.0f} tokens/s"
        return (f"{m['data']['samples']} samples ({m['data']['truncated']} cut to max_length), "
                f"{m['steps']} steps{loss}{speed}, {m['precision']}")


def sft(model: str | Path, data, output: str | Path, cfg: Config, *,
        phase: Literal["initial", "loop"] = "initial", adapter: str | Path | None = None,
        prepared: str | Path | None = None, max_steps: int = -1) -> TrainResult:
    """Supervised fine-tuning on (prompt, completion): π_0 (phase initial, train.sft lrs)
    or π' of a loop iteration (phase loop, train.sft_loop). `data`: a prepared dataset
    folder, a Parquet file/folder or a ray.data.Dataset; `prepared` names the prepared
    folder (catalog + groups) for train.reweight when `data` is not one."""
    step = cfg.train.sft if phase == "initial" else cfg.train.sft_loop
    if cfg.train.reweight and prepared is None:
        if isinstance(data, ray.data.Dataset) or not (Path(data) / "groups.json").exists():
            raise ConfigError("train.reweight needs the prepared dataset folder (catalog.parquet, "
                              "groups.json): pass it as data or as prepared=")
        prepared = data
    return _run("sft", model, data, output, cfg, step.learning_rate, step.epochs,
                adapter=adapter, prepared=prepared, max_steps=max_steps)


def dpo(model: str | Path, negatives, output: str | Path, cfg: Config, *,
        adapter: str | Path | None = None, max_steps: int = -1) -> TrainResult:
    """DPO (S-DPO for several rejected answers) against the frozen `model` (+ `adapter`):
    pass the model after this iteration's SFT step. `negatives`: Parquet with sample_id,
    prompt, chosen, rejected (list<string>), or a ray.data.Dataset of those columns."""
    return _run("dpo", model, negatives, output, cfg, cfg.train.dpo.learning_rate,
                cfg.train.dpo.epochs, adapter=adapter, max_steps=max_steps)


# ---------------------------------------------------------------- the steps of a run

def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RecrayError(f"output {output} already exists and is not empty: choose another")


def _check_scaling(cfg: Config) -> None:
    s = cfg.train.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    have = ray.cluster_resources()
    if s.use_gpu and have.get("GPU", 0) == 0:
        log.warning("train.scaling.use_gpu is true but the Ray cluster has no GPU now: the fit "
                    "waits until one joins")
    if need_cpu > have.get("CPU", 0):
        log.warning("train.scaling asks %.0f CPUs, the Ray cluster has %.0f now: the fit waits "
                    "until they join", need_cpu, have.get("CPU", 0))


def _prepare_data(kind: str, data, model: str, cfg: Config, prepared) -> tuple[ray.data.Dataset, dict]:
    try:
        if kind == "sft":
            ds, where = inputs.read_sft(data, reweight=cfg.train.reweight)
        else:
            ds, where = inputs.read_negatives(data, cfg.train.max_negatives)
        ds, stats = inputs.fit_to_length(ds, model, cfg.train.max_length, kind, where)
        if kind == "sft" and cfg.train.reweight:
            ds, rw = inputs.add_rw_weights(ds, prepared)
            stats["reweight"] = rw
        ds.context.enable_progress_bars = False     # workers read it once; no bars per worker
        return ds, stats
    except Exception as e:  # noqa: BLE001 - a RecrayError raised inside a Ray Data task
        known = unwrap(e)
        if known is not None and known is not e:
            raise known from None
        raise


def _trainer(job: Job, ds: ray.data.Dataset, cfg: Config, storage: Path):
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchTrainer

    s = cfg.train.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop, train_loop_config=job.as_config(),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": ds},
        # Every worker gets all rows; the HF trainer's distributed sampler shards them, so
        # a global batch is the same for 1 or N workers and resuming skips exactly.
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name=job.run_name, storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))


def _collect(result, job: Job, output: Path, lora: bool, merge: bool,
             trust: bool) -> tuple[Path | None, Path | None, list, list]:
    """Final adapter/model out of the last Ray checkpoint; merge an adapter in a Ray task
    when asked.
    Also returns the log history and where each rank of the final worker group ran."""
    if result.checkpoint is None or not result.metrics.get("final"):
        raise RecrayError(f"training of {output} ended without a final checkpoint")
    model_dir = output / "model"
    with result.checkpoint.as_directory() as final:
        history = json.loads((Path(final) / "log_history.json").read_text())
        placed = Path(final) / "workers.json"
        workers = json.loads(placed.read_text()) if placed.exists() else []
        target = output / ("adapter" if lora else "model")
        shutil.copytree(final, target, ignore=shutil.ignore_patterns(
            "log_history.json", "workers.json", "README.md", "training_args.bin"))
    if not lora:
        return model_dir, None, history, workers
    copy_tokenizer(job.model, target)
    if not merge:
        return None, target, history, workers
    ray.get(merge_task.remote(job.model, str(target), str(model_dir), trust))
    return model_dir, target, history, workers


def _summary(history: list[dict], data_stats: dict, seconds: float, job: Job) -> dict:
    steps = [h for h in history if "loss" in h]      # the logged steps (every logging_steps)
    end = next((h for h in reversed(history) if "train_loss" in h), {})
    summary = {"kind": job.kind, "model": job.model, "adapter": job.adapter,
               "learning_rate": job.learning_rate, "epochs": job.epochs,
               "precision": job.precision,
               "steps": end.get("step", steps[-1]["step"] if steps else 0),
               "seconds": round(seconds, 1), "data": data_stats}
    summary["train_loss"] = end.get("train_loss")
    speeds = [h["tokens_per_second"] for h in steps if "tokens_per_second" in h]
    summary["tokens_per_second"] = sum(speeds) / len(speeds) if speeds else None
    if job.kind == "dpo":
        summary["loss"] = job.train["multi_negative_loss"]
    if job.kind == "dpo" and steps:
        acc = [h["rewards/accuracies"] for h in steps]
        summary["reward_accuracy"] = sum(acc) / len(acc)          # mean over the epoch's logs
        summary["reward_accuracy_last"] = acc[-1]
        summary["reward_margin_last"] = steps[-1]["rewards/margins"]
        summary["first_step_rewards"] = {"chosen": steps[0]["rewards/chosen"],
                                         "rejected": steps[0]["rewards/rejected"]}
    return summary


def _run(kind: str, model, data, output, cfg: Config, learning_rate: float, epochs: float, *,
         adapter=None, prepared=None, max_steps: int = -1) -> TrainResult:
    output, model = Path(output), str(Path(model).resolve())
    t = cfg.train
    _check_output(output)
    ds_dict = deepspeed_config(t)
    model_config = check_model_dir(model, t.trust_remote_code)
    if adapter is not None:
        adapter = str(Path(adapter).resolve())
        check_adapter_dir(adapter, model_config, t.trust_remote_code)
    init_ray(cfg.ray)
    _check_scaling(cfg)
    ds, data_stats = _prepare_data(kind, data, model, cfg, prepared)

    run_name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage = Path(t.storage_path) if t.storage_path else output / "checkpoints"
    job = Job(kind=kind, model=model, adapter=adapter, train=t.model_dump(mode="json"),
              learning_rate=learning_rate, epochs=epochs, deepspeed=ds_dict,
              precision=precision(t), run_name=run_name, extensions_dir=extensions_dir(),
              output=str(output.resolve()), max_steps=max_steps)
    # the console has the stage's lines and, at the end, TrainResult.line(); the set-up goes to the log
    file_only(f"{kind}: {data_stats['samples']} samples ({data_stats['truncated']} cut to "
              f"max_length), {t.scaling.num_workers} x {'GPU' if t.scaling.use_gpu else 'CPU'} "
              f"worker(s), {job.precision}, ZeRO {t.deepspeed.stage}, LoRA {t.lora.enabled}")
    start = time.time()
    output.mkdir(parents=True, exist_ok=True)
    result = _trainer(job, ds, cfg, storage).fit()
    model_dir, adapter_dir, history, workers = _collect(result, job, output, t.lora.enabled,
                                                        t.merge_adapter, t.trust_remote_code)
    summary = _summary(history, data_stats, time.time() - start, job)
    summary["workers"] = workers
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(output / "train_log.jsonl", "w") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")
    if not t.keep_checkpoint_files:
        shutil.rmtree(storage / run_name, ignore_errors=True)
        if storage == output / "checkpoints" and not any(storage.iterdir()):
            storage.rmdir()
    return TrainResult(output, model_dir, adapter_dir, summary, history, workers)
