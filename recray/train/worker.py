"""What each Ray Train worker runs: build the TRL trainer, train (resuming from Ray
Train's last checkpoint after a failure), save the result on every rank, report it.

    rows of the Ray dataset shard ─▶ HF Dataset ─▶ SFT/DPO trainer (TRL + PEFT + DeepSpeed)
      ─train()─▶ HF checkpoint every save_steps ─▶ Ray Train checkpoint
      ─save_model() on all ranks─▶ final adapter (or full model) ─▶ last Ray checkpoint

`make_trainer` needs no Ray, so tests build the exact trainer of a run in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("recray.train")


@dataclass
class Job:
    """Everything a worker needs, as plain values (the datasets travel separately)."""
    kind: str                     # "sft" | "dpo"
    model: str                    # model folder the step starts from (the DPO reference)
    adapter: str | None           # optional adapter on `model` to keep training
    train: dict                   # TrainConfig.model_dump()
    learning_rate: float
    epochs: float
    deepspeed: dict | None
    precision: str                # "fp32" | "bf16"
    run_name: str
    extensions_dir: str
    output: str                   # the step's output folder (workers.jsonl)
    max_steps: int = -1

    def as_config(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the trainer

def training_args(job: Job, output_dir: str):
    """SFTConfig / DPOConfig from the run config; CPU-safe (no bf16, no checkpointing) on CPU."""
    from trl import DPOConfig, SFTConfig

    t = job.train
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=t["per_device_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        learning_rate=job.learning_rate, num_train_epochs=job.epochs, max_steps=job.max_steps,
        warmup_steps=t["warmup_ratio"], weight_decay=t["weight_decay"],
        logging_steps=t["logging_steps"], save_strategy="steps", save_steps=t["save_steps"],
        save_total_limit=1, report_to="none", disable_tqdm=True, log_level="warning",
        use_cpu=not t["scaling"]["use_gpu"], bf16=job.precision == "bf16", fp16=False,
        gradient_checkpointing=t["gradient_checkpointing"], deepspeed=job.deepspeed,
        seed=t["seed"], data_seed=t["seed"], max_length=t["max_length"],
        dataloader_num_workers=0, ddp_find_unused_parameters=False)
    if job.kind == "sft":
        return SFTConfig(**common, completion_only_loss=True, packing=False)
    return DPOConfig(**common, beta=t["beta"], loss_type=["sigmoid"])


def load_policy(job: Job):
    """(model, tokenizer, peft_config): the model to train and, for a fresh LoRA, its config.

    LoRA, no adapter: a fresh adapter on `model`; TRL's reference (adapter off) is `model`.
    LoRA + adapter: keep training it; TRL's DPO reference is its frozen "ref" copy.
    Full fine-tuning: all weights train; TRL's DPO reference is `model` reloaded.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from recray.train.models import load_model, lora_config

    lora, trust = job.train["lora"], job.train["trust_remote_code"]
    # LoRA can keep a bf16 base (only the adapter trains); full fine-tuning keeps fp32 master weights.
    dtype = "bfloat16" if job.precision == "bf16" and lora["enabled"] else "float32"
    tokenizer = AutoTokenizer.from_pretrained(job.model, trust_remote_code=trust)
    model = load_model(job.model, dtype, trust)
    if not lora["enabled"]:
        if job.adapter:
            model = PeftModel.from_pretrained(model, job.adapter).merge_and_unload()
        return model, tokenizer, None
    if job.adapter:
        return PeftModel.from_pretrained(model, job.adapter, is_trainable=True), tokenizer, None
    from recray.config import LoraConfig
    return model, tokenizer, lora_config(LoraConfig(**lora))


def make_trainer(job: Job, dataset, output_dir: str):
    """The TRL trainer of this step, on an HF Dataset."""
    from recray.train.dpo_trainer import build_dpo_trainer
    from recray.train.models import compact_lm_head
    from recray.train.sft_trainer import build_sft_trainer

    compact_lm_head(job.train["compact_lm_head"])
    model, tokenizer, peft_config = load_policy(job)
    args = training_args(job, output_dir)
    if job.kind == "sft":
        return build_sft_trainer(model, tokenizer, dataset, args, peft_config,
                                 gdrt=job.train["gdrt"])
    return build_dpo_trainer(model, tokenizer, dataset, args, peft_config,
                             multi_negative_loss=job.train["multi_negative_loss"],
                             rosepo=job.train["rosepo"],
                             shared_prompt=job.train["dpo_shared_prompt"])


def to_hf_dataset(rows: list[dict], kind: str):
    """Rows from the Ray shard -> an HF Dataset in a fixed order, with the columns TRL wants."""
    import datasets

    # A fixed order, also when a sample_id repeats (pairwise DPO rows): resuming skips exactly.
    rows = sorted(rows, key=lambda r: (str(r["sample_id"]), str(r.get("completion", r.get("rejected")))))
    if kind == "dpo":
        keep = [{"prompt": r["prompt"], "chosen": r["chosen"],
                 "rejected": [str(x) for x in r["rejected"]],
                 **({"weight": float(r["weight"])} if "weight" in r else {})} for r in rows]
    else:
        keep = [{"prompt": r["prompt"], "completion": r["completion"],
                 **({"weight": float(r["weight"])} if "weight" in r else {}),
                 **({"token_groups": [int(g) for g in r["token_groups"]]}
                    if "token_groups" in r else {})} for r in rows]
    return datasets.Dataset.from_list(keep)


# ---------------------------------------------------------------- the Ray Train loop

def _quiet(job: Job) -> None:
    import datasets
    import ray.data
    import transformers

    os.environ["TORCH_EXTENSIONS_DIR"] = job.extensions_dir
    Path(job.extensions_dir).mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _whoami() -> dict:
    """This worker: rank, process and the Ray node it runs on."""
    import ray
    import ray.train
    return {"rank": ray.train.get_context().get_world_rank(), "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


def _record_worker(job: Job, resumed_from: int | None) -> None:
    """One line per worker start in <output>/workers.jsonl: which process, where, resumed how."""
    line = {"time": time.time(), "run": job.run_name, **_whoami(),
            "resumed_from_step": resumed_from}
    try:
        Path(job.output).mkdir(parents=True, exist_ok=True)
        with open(Path(job.output) / "workers.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        log.warning("cannot write %s/workers.jsonl on this node", job.output)


def _resume_step(path: str) -> int:
    state = Path(path) / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.exists() else 0


def _finish(trainer, job: Job, output_dir: str) -> None:
    """save_model on EVERY rank (ZeRO-3 gathers shards), then rank 0 reports the result,
    with the rank -> node placement of the worker group that finished (workers.json)."""
    import ray.train
    from accelerate.utils import gather_object

    from recray.train.callbacks import scalar_metrics

    final = Path(output_dir) / "final"
    trainer.save_model(str(final))
    workers = sorted(gather_object([_whoami()]), key=lambda w: w["rank"])
    trainer.accelerator.wait_for_everyone()
    metrics = {**scalar_metrics(trainer.state.log_history), "step": trainer.state.global_step,
               "final": 1.0}
    if trainer.is_world_process_zero():
        (final / "log_history.json").write_text(json.dumps(trainer.state.log_history))
        (final / "workers.json").write_text(json.dumps(workers))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
    else:
        ray.train.report(metrics, checkpoint=None)
    trainer.accelerator.wait_for_everyone()
    if ray.train.get_context().get_local_rank() == 0:
        shutil.rmtree(output_dir, ignore_errors=True)


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer

    from recray.train.callbacks import Progress, ReportCheckpoint

    job = Job(**config)
    _quiet(job)
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    output_dir = str(Path(tempfile.gettempdir()) / "recray-train" / job.run_name)
    trainer = prepare_trainer(make_trainer(job, to_hf_dataset(rows, job.kind), output_dir))
    trainer.add_callback(Progress(job.kind))
    trainer.add_callback(ReportCheckpoint())
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else nullcontext()) as restored:
        _record_worker(job, _resume_step(restored) if restored else None)
        if restored:
            log.info("%s: resuming from Ray Train checkpoint at step %d", job.kind, _resume_step(restored))
        trainer.train(resume_from_checkpoint=restored)
    _finish(trainer, job, output_dir)
