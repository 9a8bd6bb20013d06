"""Training steps of SPRec on Ray Train + DeepSpeed, with TRL and PEFT.

    from recray.train import sft, dpo
    pi0 = sft(base, "prepared/", "runs/x/it0/policy", cfg)                          # π_0
    s   = sft(base, subset, "runs/x/it1/sft", cfg, phase="loop", adapter=pi0.adapter_dir)   # π'
    pt  = dpo(base, "runs/x/it1/negatives.parquet", "runs/x/it1/policy", cfg,
              adapter=s.adapter_dir)                                                # π_t, ref = π'
    (full fine-tuning: pass the previous step's model_dir as the model, no adapter)

Modules: launch (driver: checks, TorchTrainer, merge), worker (per-worker trainer and
checkpoints), sft_trainer / dpo_trainer (TRL trainers), losses (S-DPO, weighted SFT), reweight (RW),
inputs (Ray Data in, max_length), models (folders, merge), deepspeed, callbacks.
"""

from recray.train.launch import TrainResult, dpo, sft

__all__ = ["TrainResult", "dpo", "sft"]
