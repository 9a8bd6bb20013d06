"""The losses recray adds to TRL: DPO over N negatives (S-DPO's softmax, or DMPO's mean
rejected reward), and a per-sample weighted token loss for re-weighted SFT. Pure tensor
functions, tested by hand values."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
              rejected_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-prompt S-DPO loss  -log σ(-log Σ_j exp(β·(h(y_lj) - h(y_w)))).

    chosen_logratios: (B,) h(y_w) = log π(y_w|x) - log π_ref(y_w|x)
    rejected_logratios: (B, N) h(y_lj); rejected_mask: (B, N) bool, False where a prompt
    has fewer than N negatives (those terms are left out of the sum).
    For N = 1 this is exactly the DPO loss -log σ(β·(h_w - h_l)).
    """
    mask = rejected_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every prompt needs at least one rejected answer")
    delta = beta * (rejected_logratios - chosen_logratios.unsqueeze(1))
    delta = delta.masked_fill(~mask, float("-inf"))
    return -F.logsigmoid(-torch.logsumexp(delta, dim=1))


def dmpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
              rejected_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-prompt DMPO loss  -log σ(β·h(y_w) - β·mean_j h(y_lj))  (seed-methods.md §5.3:
    the chosen reward against the mean of the prompt's rejected rewards; N = 1 is DPO).
    Arguments as sdpo_loss's; masked negatives are left out of the mean."""
    mask = rejected_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every prompt needs at least one rejected answer")
    mean_rejected = (rejected_logratios * mask).sum(dim=1) / mask.sum(dim=1)
    return -F.logsigmoid(beta * (chosen_logratios - mean_rejected))


MULTI_NEGATIVE_LOSSES = {"softmax": sdpo_loss, "mean_reward": dmpo_loss}


def weighted_token_loss(token_logps: torch.Tensor, weights: torch.Tensor,
                        num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Σ_b w_b Σ_t -log p(y_bt) / num_tokens: TRL's SFT token-mean loss with each sample's
    tokens scaled by its weight (weights all 1 give TRL's loss exactly).

    token_logps: (B, T) log-probabilities of the label tokens, 0 where not trained on.
    """
    per_sample = -token_logps.sum(dim=1)
    return (per_sample * weights.to(per_sample.dtype)).sum() / torch.as_tensor(num_tokens).clamp(min=1)
