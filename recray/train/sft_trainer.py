"""SFT step: TRL's SFTTrainer, loss on the answer tokens only (completion_only_loss).

With RW (IFairLRS) the dataset carries a `weight` column and each sample's tokens count
`weight` times in TRL's token-mean loss; without it this is TRL's SFTTrainer unchanged.
"""

from __future__ import annotations

import torch
from trl import SFTConfig, SFTTrainer

from recray.train.losses import weighted_token_loss


class _KeepWeights:
    """Wraps TRL's collator: pads as before and adds a float `weight` per sample."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner([{k: v for k, v in e.items() if k != "weight"} for e in examples])
        batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss scales each sample by its `weight` column, if there is one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "weight" in self.train_dataset.column_names:
            self.data_collator = _KeepWeights(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("weight", None)
        if weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = weighted_token_loss(outputs.log_probs, weights, num_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._log_tokens(inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_tokens(self, inputs) -> None:
        if self.model.training:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]


def build_sft_trainer(model, tokenizer, dataset, args: SFTConfig, peft_config=None) -> WeightedSFTTrainer:
    return WeightedSFTTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config)
