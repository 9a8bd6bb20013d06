"""The DPO reference is the model after THIS iteration's SFT step, not the base model.

Both ways recray starts DPO are checked on the exact trainer a Ray worker builds
(worker.make_trainer), after a real SFT step on a tiny model:
  merged:  DPO on the SFT-merged model with a fresh adapter (reference = adapter off)
  adapter: DPO on base + the SFT adapter, trained further (reference = TRL's frozen copy)
  full:    full fine-tuning of the SFT model (the loop's path without LoRA: the SFT stage's
           model/ is DPO's model; reference = that model reloaded, frozen)
At DPO step 0 policy and reference log-probs are equal, so the implicit rewards are exactly 0,
while the base model's log-probs differ (a base reference would give non-zero rewards).
"""

from __future__ import annotations

import datasets
import pandas as pd
import pytest
import torch

from recray.train.models import merge_adapter
from recray.train.worker import make_trainer

from test_train_support import make_job, make_negatives, make_prepared, make_tiny_model


@pytest.fixture(scope="module")
def after_sft(tmp_path_factory):
    """base model, SFT adapter, SFT merged model and DPO rows."""
    root = tmp_path_factory.mktemp("ref")
    base = make_tiny_model(root / "base")
    prepared = make_prepared(root / "prepared", n=16)
    df = pd.read_parquet(prepared / "train")
    sft_rows = [{"prompt": p, "completion": c} for p, c in zip(df["prompt"], df["completion"])]
    sft = make_trainer(make_job("sft", base, root, lr=5e-2), datasets.Dataset.from_list(sft_rows),
                       str(root / "sft_run"))
    sft.train()
    sft.save_model(str(root / "sft_adapter"))
    merged = merge_adapter(str(base), str(root / "sft_adapter"), str(root / "sft_model"))
    neg = pd.read_parquet(make_negatives(df, root / "neg.parquet", n_negatives=2))
    rows = [{"prompt": p, "chosen": c, "rejected": list(r)}
            for p, c, r in zip(neg["prompt"], neg["chosen"], neg["rejected"])]
    return base, root / "sft_adapter", merged, rows, root


def _logps(trainer, batch, reference: bool) -> torch.Tensor:
    """(B, 1 + N) answer log-probs under the trainer's policy or its reference."""
    with torch.no_grad():
        if reference:
            return trainer._reference_logps(batch)
        return trainer._answer_logps(trainer.model, batch)


def _base_logps(trainer, base, batch) -> torch.Tensor:
    """The same answers' log-probs under the base model, in the trainer's batch layout."""
    from trl.trainer.utils import add_fused_lm_head

    from recray.train.models import load_model
    model = load_model(str(base), "float32", False).eval()
    add_fused_lm_head(model)
    with torch.no_grad():
        return trainer._answer_logps(model, batch)


@pytest.mark.parametrize("start", ["merged", "adapter", "full"])
def test_dpo_reference_is_the_sft_model(after_sft, start):
    base, adapter, merged, rows, root = after_sft
    job = {"merged": lambda: make_job("dpo", merged, root / start),
           "adapter": lambda: make_job("dpo", base, root / start, adapter=adapter),
           "full": lambda: make_job("dpo", merged, root / start, lora={"enabled": False})}[start]()
    trainer = make_trainer(job, datasets.Dataset.from_list(rows), str(root / f"dpo_{start}"))
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    policy, reference = _logps(trainer, batch, False), _logps(trainer, batch, True)
    assert torch.equal(policy, reference)                     # step 0: π == π_ref exactly
    base_logps = _base_logps(trainer, base, batch)
    assert (policy - base_logps).abs().max() > 1e-2           # ... and π_ref is not the base

    trainer.model.train()
    trainer.args.max_steps = 2
    trainer.train()
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["rewards/margins"] == 0.0
    assert second["rewards/chosen"] != 0.0                    # the adapter moved after step 1
