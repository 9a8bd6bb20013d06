"""End to end on the real model: SFT then DPO of SmolLM2-135M-Instruct (LoRA r=16) on 32
real MovieLens-100k samples, 2 CPU workers on Ray Train with DeepSpeed ZeRO-2.

Sizes are cut for a 2-core CI machine: 1 SFT epoch (the paper's initial SFT runs 4),
prompts capped at 112 tokens (the oldest history titles are dropped), one negative per
prompt drawn from the catalog. Learning rates and beta are the paper's defaults."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from recray.assets import model_dir
from recray.config import load_config
from recray.data.prompts import build_completion
from recray.train import dpo, sft

N, WORKERS, PER_DEVICE = 32, 2, 4
STEPS = N // (WORKERS * PER_DEVICE)


@pytest.mark.real
def test_sft_then_dpo_on_smollm2(ml100k_prepared, tmp_path):
    prepared, _ = ml100k_prepared
    train = pd.read_parquet(prepared / "train").head(N)
    train.to_parquet(tmp_path / "train.parquet")
    cfg = load_config(None, [
        f"train.scaling.num_workers={WORKERS}", "train.deepspeed.stage=2",
        f"train.per_device_batch_size={PER_DEVICE}", "train.max_length=112",
        "train.sft.epochs=1", "train.logging_steps=1", "train.save_steps=2"])

    s = sft(model_dir(), tmp_path / "train.parquet", tmp_path / "sft", cfg)
    assert s.metrics["steps"] == STEPS and s.metrics["data"]["samples"] == N
    assert s.metrics["data"]["truncated"] > 0                 # 10-title histories cut to 112 tokens
    adapter = json.loads((s.adapter_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    catalog = pd.read_parquet(prepared / "catalog.parquet")["title"].tolist()
    rng = random.Random(0)
    rejected = []
    for target in train["target_title"]:
        title = rng.choice(catalog)
        while title == target:
            title = rng.choice(catalog)
        rejected.append([build_completion(title)])
    pd.DataFrame({"sample_id": train["sample_id"], "prompt": train["prompt"],
                  "chosen": train["completion"], "rejected": rejected,
                  "rejected_scores": [[0.0]] * N, "source": "random"}).to_parquet(tmp_path / "neg.parquet")

    # The loop's path: DPO keeps training π′'s adapter on the base; the reference is π′.
    assert s.model_dir is None and not (tmp_path / "sft" / "model").exists()   # no merged copy
    d = dpo(model_dir(), tmp_path / "neg.parquet", tmp_path / "dpo", cfg, adapter=s.adapter_dir)
    m = d.metrics
    assert m["steps"] == STEPS
    assert m["first_step_rewards"] == {"chosen": 0.0, "rejected": 0.0}   # reference = the SFT model
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["tokens_per_second"] > 0
    print(f"\nSFT: loss {s.metrics['train_loss']:.4f}, {s.metrics['tokens_per_second']:.0f} tokens/s, "
          f"{s.metrics['seconds']:.0f} s | DPO: reward accuracy {m['reward_accuracy']:.3f} "
          f"(last step {m['reward_accuracy_last']:.3f}, margin {m['reward_margin_last']:.4f}), "
          f"{m['tokens_per_second']:.0f} tokens/s, {m['seconds']:.0f} s")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir()), d.adapter_dir)
    ids = tok(train["prompt"].iloc[0], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
