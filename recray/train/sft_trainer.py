"""SFT step: TRL's SFTTrainer, loss on the answer tokens only (completion_only_loss).

Two optional dataset columns change the loss; without them this is TRL's SFTTrainer:
- `weight` (RW, IFairLRS): each sample's tokens count `weight` times in TRL's token-mean loss;
- `token_groups` (GDRT): a group per answer token (recray.train.token_groups), and the
  loss is group DRO over them (recray.train.losses.group_dro_token_loss); the per-group
  losses and weights q go into every log entry (`gdrt/loss_g`, `gdrt/q_g`).
"""

from __future__ import annotations

import torch
from trl import SFTConfig, SFTTrainer

from recray.train.losses import group_dro_token_loss, weighted_token_loss

EXTRA = ("weight", "token_groups")


class _KeepExtras:
    """Wraps TRL's collator: pads as before and adds a float `weight` per sample and/or
    `token_groups` laid over the batch's label positions (-1 elsewhere)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner([{k: v for k, v in e.items() if k not in EXTRA} for e in examples])
        if "weight" in examples[0]:
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
        if "token_groups" in examples[0]:
            groups = torch.full_like(batch["labels"], -1)
            for b, e in enumerate(examples):
                where = (batch["labels"][b] != -100).nonzero().squeeze(1)
                if len(where) != len(e["token_groups"]):
                    raise ValueError(f"token_groups has {len(e['token_groups'])} entries for "
                                     f"{len(where)} answer tokens: the groups were made with "
                                     f"another tokenisation")
                groups[b, where] = torch.tensor(e["token_groups"], dtype=groups.dtype)
            batch["token_groups"] = groups
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss scales each sample by its `weight` column, or is GDRT's group
    DRO over its `token_groups` column (`gdrt`: train.gdrt), if there is one."""

    def __init__(self, *args, gdrt: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gdrt, self.group_ema = gdrt, None
        if set(EXTRA) & set(self.train_dataset.column_names):
            self.data_collator = _KeepExtras(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns,
                                   *(c for c in EXTRA if c not in self._signature_columns)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("weight", None)
        groups = inputs.pop("token_groups", None)
        if weights is None and groups is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        if groups is not None:
            loss = self._group_dro(outputs.log_probs, groups[:, 1:])   # aligned with the shifted labels
        else:
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = weighted_token_loss(outputs.log_probs, weights, num_tokens)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
        self._log_tokens(inputs)
        return (loss, outputs) if return_outputs else loss

    def _group_dro(self, token_logps, token_groups):
        """GDRT's loss over the global batch (group sums all-reduced across workers)."""
        import torch.distributed as dist
        distributed = dist.is_available() and dist.is_initialized()

        def all_reduce(x):
            dist.all_reduce(x)
            return x
        g = self.gdrt
        loss, group_loss, q, self.group_ema = group_dro_token_loss(
            token_logps, token_groups, g["groups"], g["tau"], self.group_ema, g["ema"],
            all_reduce if distributed else None, dist.get_world_size() if distributed else 1)
        if self.model.training:
            m = self._metrics["train"]
            for k in range(g["groups"]):
                if not torch.isnan(group_loss[k]):
                    m[f"gdrt/loss_g{k}"].append(group_loss[k].item())
                m[f"gdrt/q_g{k}"].append(q[k].item())
        return loss

    def _log_tokens(self, inputs) -> None:
        if self.model.training:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]


def build_sft_trainer(model, tokenizer, dataset, args: SFTConfig, peft_config=None,
                      gdrt: dict | None = None) -> WeightedSFTTrainer:
    return WeightedSFTTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config, gdrt=gdrt)
