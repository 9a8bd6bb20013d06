"""DPO step: TRL's DPOTrainer extended to N rejected answers per prompt (S-DPO).

One forward over the prompt and its chosen and rejected answers, the same under the
reference (TRL's: the adapter switched off, or its frozen "ref" copy), then

    h(y) = log π(y|x) - log π_ref(y|x)
    loss = -log σ(-log Σ_j exp(β·(h(y_lj) - h(y_w))))        (= DPO's sigmoid loss for N = 1)

Two layouts of the same computation (train.dpo_shared_prompt):
- shared prompt (default): one row per prompt, [prompt; chosen; rejected_1; ...], each
  answer seeing the prompt and itself only (a block attention mask, positions restarting
  after the prompt), so the prompt, most of every row's tokens, is computed once instead
  of 1 + N times. Needs an attention that takes a 4D mask (sdpa or eager, recray's).
- one row per answer, [chosen (B); rejected_1 (B); ...], TRL's own layout; prompts with
  fewer than N negatives are padded with a repeat that the mask leaves out.
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

from recray.train.losses import MULTI_NEGATIVE_LOSSES, personal_smoothing, rosepo_loss


def _weights(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A prompt's `weight` (UFO-like's pair weight), when the data has one."""
    return {"weight": torch.tensor([float(e["weight"]) for e in examples])} if "weight" in examples[0] else {}


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
            "tokens": torch.tensor([len(x) for x in ids]),
            **_weights(examples),
        }


def _pack(prompt: list[int], answers: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(tokens, positions, labels, segment) of one shared-prompt row. Answer j is the
    segment [last prompt token, answer[:-1]] at the positions that follow the prompt, with
    the answer as its next-token labels: the last prompt token is repeated per segment
    because it is the position that predicts an answer's first token."""
    shared = prompt[:-1]
    tokens, labels = list(shared), [-100] * len(shared)
    positions, segment = list(range(len(shared))), [-1] * len(shared)
    for j, answer in enumerate(answers):
        tokens += [prompt[-1], *answer[:-1]]
        positions += range(len(shared), len(shared) + len(answer))
        labels += answer
        segment += [j] * len(answer)
    return tokens, positions, labels, segment


@dataclass
class SharedPromptCollator(DataCollatorMixin):
    """One row per prompt (see `_pack`), right-padded: `shift_labels` (position t's next
    token), `segment` (-1: prompt or padding; j: answer j, 0 the chosen one), a (B, 1, T, T)
    boolean `attention_mask` (causal, an answer sees the prompt and itself), and the (B, N)
    `rejected_mask`."""

    pad_token_id: int
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(len(e["rejected_ids"]) for e in examples)
        rows = [_pack(e["prompt_ids"], [e["chosen_ids"], *e["rejected_ids"]]) for e in examples]
        width = max(len(r[0]) for r in rows)
        shape = (len(rows), width)
        ids = torch.full(shape, self.pad_token_id)
        positions, labels = torch.zeros(shape, dtype=torch.long), torch.full(shape, -100)
        segment, real = torch.full(shape, -1), torch.zeros(shape, dtype=torch.bool)
        for b, (tok, pos, lab, seg) in enumerate(rows):
            k = len(tok)
            ids[b, :k], positions[b, :k], labels[b, :k] = map(torch.tensor, (tok, pos, lab))
            segment[b, :k], real[b, :k] = torch.tensor(seg), True
        key_is_prompt = (segment == -1) & real
        sees = (key_is_prompt[:, None, :] | (segment[:, :, None] == segment[:, None, :])) \
            & torch.ones(width, width, dtype=torch.bool).tril()
        sees |= torch.eye(width, dtype=torch.bool)       # padding rows see themselves: no empty row
        return {
            "input_ids": ids, "position_ids": positions, "shift_labels": labels,
            "segment": segment, "attention_mask": sees[:, None],
            "rejected_mask": torch.tensor([[j < len(e["rejected_ids"]) for j in range(n)]
                                           for e in examples]),
            "tokens": real.sum(1),
            **_weights(examples),
        }


class SDPOTrainer(DPOTrainer):
    """DPOTrainer with `rejected` a list of answers and a loss over them: S-DPO's softmax
    (the default), DMPO's mean rejected reward or RosePO's smoothed pairs (recray.train.losses)."""

    def __init__(self, *args, multi_negative_loss: str = "softmax",
                 rosepo: dict | None = None, **kwargs):
        self.loss_name = multi_negative_loss
        self.rosepo = rosepo            # RosePO's eps_max and temperature (its loss only)
        args_ = kwargs.get("args")
        if args_ is not None and (args_.precompute_ref_log_probs or args_.loss_type != ["sigmoid"]
                                  or args_.ld_alpha is not None or args_.use_weighting
                                  or args_.f_divergence_type != "reverse_kl"):
            raise ValueError("SDPOTrainer implements the sigmoid/S-DPO loss with live reference "
                             "forwards only")
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "weight"]

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
    def _answer_logps(self, model, inputs) -> torch.Tensor:
        """(B, 1 + N) summed log-probabilities of [chosen, rejected_1, ...] under `model`."""
        batch, n = inputs["rejected_mask"].shape
        if "segment" not in inputs:                      # one row per answer
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=labels, fused_lm_head=True, use_cache=False)
            return out.log_probs.sum(dim=1).view(1 + n, batch).T
        dtype = next(model.parameters()).dtype
        sees = inputs["attention_mask"]
        additive = torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(
            ~sees, torch.finfo(dtype).min)
        out = model(input_ids=inputs["input_ids"], attention_mask=additive,
                    position_ids=inputs["position_ids"], shift_labels=inputs["shift_labels"],
                    fused_lm_head=True, use_cache=False)
        segment = inputs["segment"].clamp(min=0)          # log_probs are 0 off the answers
        return out.log_probs.new_zeros(batch, 1 + n).scatter_add(1, segment, out.log_probs)

    def _reference_logps(self, inputs) -> torch.Tensor:
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self._answer_logps(self.ref_model, inputs)
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = "ref" if "ref" in unwrapped.peft_config else None   # None: adapter off
            with use_adapter(unwrapped, adapter_name=adapter):
                return self._answer_logps(self.model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mask = inputs["rejected_mask"].bool()
        reference = self._reference_logps(inputs)
        h = self._answer_logps(model, inputs) - reference
        chosen, rejected = h[:, 0], h[:, 1:]
        if self.loss_name == "rosepo":      # its smoothing reads the reference log-probs
            eps = personal_smoothing(reference[:, 0], reference[:, 1:], mask, **self.rosepo)
            per_prompt = rosepo_loss(chosen, rejected, mask, self.beta, eps)
        else:
            per_prompt = MULTI_NEGATIVE_LOSSES[self.loss_name](chosen, rejected, mask, self.beta)
        # Weights of mean 1 over the data (recray.judge), so the plain mean keeps the loss's scale.
        weight = inputs.get("weight")
        loss = (per_prompt * (1 if weight is None else weight.to(per_prompt.dtype))).mean()
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
            self._total_train_tokens += gather(inputs["tokens"].sum()).sum().item()
        m["num_tokens"] = [self._total_train_tokens]


def build_dpo_trainer(model, tokenizer, dataset, args: DPOConfig, peft_config=None,
                      multi_negative_loss: str = "softmax", rosepo: dict | None = None,
                      shared_prompt: bool = True) -> SDPOTrainer:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    collator = SharedPromptCollator if shared_prompt else MultiNegativeCollator
    return SDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=peft_config, multi_negative_loss=multi_negative_loss,
                       rosepo=rosepo,
                       data_collator=collator(pad_token_id=tokenizer.pad_token_id))
