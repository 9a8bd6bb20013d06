"""DPO step: TRL's DPOTrainer extended to N rejected answers per prompt (S-DPO).

One forward over [chosen; rejected_1; ...; rejected_N] rows, the same under the reference
(TRL's: the adapter switched off, or its frozen "ref" copy), then

    h(y) = log π(y|x) - log π_ref(y|x)
    loss = -log σ(-log Σ_j exp(β·(h(y_lj) - h(y_w))))        (= DPO's sigmoid loss for N = 1)

Prompts with fewer than N negatives are padded with a repeat that the mask leaves out.
What the reference IS is decided by the caller (see recray.train.worker): the model this
trainer starts from, i.e. the model after this iteration's SFT step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import global_then_local_main_first, pad, use_adapter

from recray.train.losses import MULTI_NEGATIVE_LOSSES


@dataclass
class MultiNegativeCollator(DataCollatorMixin):
    """Rows [chosen (B); rejected_1 (B); ...; rejected_N (B)], right-padded, plus a (B, N)
    `rejected_mask` that is False where a prompt has fewer than N negatives."""

    pad_token_id: int
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(e["rejected_ids"]) for e in examples)
        answers = [[e["chosen_ids"] for e in examples]]
        answers += [[e["rejected_ids"][min(j, len(e["rejected_ids"]) - 1)] for e in examples]
                    for j in range(n)]
        ids, completion = [], []
        for group in answers:
            for e, answer in zip(examples, group):
                ids.append(torch.tensor(e["prompt_ids"] + answer))
                completion.append(torch.tensor([0] * len(e["prompt_ids"]) + [1] * len(answer)))
        return {
            "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(x) for x in ids], padding_value=0, padding_side="right"),
            "completion_mask": pad(completion, padding_value=0, padding_side="right"),
            "rejected_mask": torch.tensor([[j < len(e["rejected_ids"]) for j in range(n)]
                                           for e in examples]),
        }


class SDPOTrainer(DPOTrainer):
    """DPOTrainer with `rejected` a list of answers and a loss over them: S-DPO's softmax
    (the default) or DMPO's mean rejected reward (recray.train.losses)."""

    def __init__(self, *args, multi_negative_loss: str = "softmax", **kwargs):
        self.multi_negative_loss = MULTI_NEGATIVE_LOSSES[multi_negative_loss]
        args_ = kwargs.get("args")
        if args_ is not None and (args_.precompute_ref_log_probs or args_.loss_type != ["sigmoid"]
                                  or args_.ld_alpha is not None or args_.use_weighting
                                  or args_.f_divergence_type != "reverse_kl"):
            raise ValueError("SDPOTrainer implements the sigmoid/S-DPO loss with live reference "
                             "forwards only")
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        eos = self._tokenizer.eos_token

        def tokenize(example):
            prompt_ids = _tokenize(processing_class, example["prompt"])["input_ids"]
            answers = [example["chosen"], *example["rejected"]]
            full = [_tokenize(processing_class, example["prompt"] + (a if a.endswith(eos) else a + eos))
                    ["input_ids"] for a in answers]
            start = min(common_prefix_length(prompt_ids, f) for f in full)
            return {"prompt_ids": prompt_ids[:start], "chosen_ids": full[0][start:],
                    "rejected_ids": [f[start:] for f in full[1:]]}

        with global_then_local_main_first():
            return dataset.map(tokenize, num_proc=args.dataset_num_proc,
                               desc=f"Tokenizing {dataset_name} dataset")

    # ---------------------------------------------------------------- loss
    def _sequence_logps(self, model, inputs, labels) -> torch.Tensor:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    labels=labels, fused_lm_head=True, use_cache=False)
        return out.log_probs[:, -(labels.size(1) - 1):].sum(dim=1)

    def _reference_logps(self, inputs, labels) -> torch.Tensor:
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self._sequence_logps(self.ref_model, inputs, labels)
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = "ref" if "ref" in unwrapped.peft_config else None   # None: adapter off
            with use_adapter(unwrapped, adapter_name=adapter):
                return self._sequence_logps(self.model, inputs, labels)

    def _compute_loss(self, model, inputs, return_outputs):
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        mask = inputs["rejected_mask"].bool()
        batch, n = mask.shape
        h = self._sequence_logps(model, inputs, labels) - self._reference_logps(inputs, labels)
        chosen, rejected = h[:batch], h[batch:].view(n, batch).T
        loss = self.multi_negative_loss(chosen, rejected, mask, self.beta).mean()
        self._record(inputs, chosen.detach(), rejected.detach(), mask)
        return (loss, None) if return_outputs else loss

    def _record(self, inputs, chosen, rejected, mask) -> None:
        """TRL's reward metrics, with a prompt counted correct when its chosen answer beats
        every one of its negatives (for N = 1 exactly TRL's rewards/accuracies)."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather
        chosen_r = self.beta * chosen
        rejected_mean = self.beta * (rejected * mask).sum(1) / mask.sum(1)
        rejected_max = (self.beta * rejected).masked_fill(~mask, float("-inf")).max(1).values
        m = self._metrics[mode]
        m["rewards/chosen"].append(gather(chosen_r).mean().item())
        m["rewards/rejected"].append(gather(rejected_mean).mean().item())
        m["rewards/accuracies"].append(gather((chosen_r > rejected_max).float()).mean().item())
        m["rewards/margins"].append(gather(chosen_r - rejected_mean).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        m["num_tokens"] = [self._total_train_tokens]


def build_dpo_trainer(model, tokenizer, dataset, args: DPOConfig, peft_config=None,
                      multi_negative_loss: str = "softmax") -> SDPOTrainer:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return SDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=peft_config, multi_negative_loss=multi_negative_loss,
                       data_collator=MultiNegativeCollator(pad_token_id=tokenizer.pad_token_id))
