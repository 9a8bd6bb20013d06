"""The losses recray adds to TRL: DPO over N negatives (S-DPO's softmax, or DMPO's mean
rejected reward), RosePO's DPO with a personalised label smoothing, a per-sample
weighted token loss for re-weighted SFT, and GDRT's group-DRO token loss. Pure tensor
functions, tested by hand values."""

from __future__ import annotations

from collections.abc import Callable

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


def personal_smoothing(ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                       rejected_mask: torch.Tensor, eps_max: float, temperature: float) -> torch.Tensor:
    """RosePO's per-prompt smoothing ε_x = ε_max·σ(−(log π_ref(y_w|x) − log π_ref(y_l|x)) / T)
    (seed-methods.md §5.5): large where the reference already prefers the negative, i.e.
    where the preference is uncertain. ref_chosen (B,), ref_rejected (B, N) summed
    reference log-probs; with N > 1, y_l's log-prob is the mean over the prompt's negatives."""
    mask = rejected_mask.bool()
    mean_rejected = (ref_rejected * mask).sum(dim=1) / mask.sum(dim=1)
    return eps_max * torch.sigmoid(-(ref_chosen - mean_rejected) / temperature)


def rosepo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                rejected_mask: torch.Tensor, beta: float, smoothing: torch.Tensor) -> torch.Tensor:
    """Per-prompt  −[(1−ε_x)·log σ(β·Δ) + ε_x·log σ(−β·Δ)],  Δ = h(y_w) − h(y_l), averaged
    over the prompt's negatives; ε_x = `smoothing` (B,) (personal_smoothing). ε = 0 is DPO."""
    mask = rejected_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every prompt needs at least one rejected answer")
    margin = beta * (chosen_logratios.unsqueeze(1) - rejected_logratios)
    eps = smoothing.unsqueeze(1)
    pair = -((1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin))
    return (pair * mask).sum(dim=1) / mask.sum(dim=1)


MULTI_NEGATIVE_LOSSES = {"softmax": sdpo_loss, "mean_reward": dmpo_loss}


def weighted_token_loss(token_logps: torch.Tensor, weights: torch.Tensor,
                        num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Σ_b w_b Σ_t -log p(y_bt) / num_tokens: TRL's SFT token-mean loss with each sample's
    tokens scaled by its weight (weights all 1 give TRL's loss exactly).

    token_logps: (B, T) log-probabilities of the label tokens, 0 where not trained on.
    """
    per_sample = -token_logps.sum(dim=1)
    return (per_sample * weights.to(per_sample.dtype)).sum() / torch.as_tensor(num_tokens).clamp(min=1)


def group_dro_token_loss(token_logps: torch.Tensor, token_groups: torch.Tensor, n_groups: int,
                         tau: float, ema: torch.Tensor | None, decay: float = 0.9,
                         all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         world_size: int = 1):
    """GDRT's loss (seed-methods.md §2.3 (c)-(e)): Σ_g q_g·L_g, where L_g is the mean NLL
    of this batch's tokens in group g, q = softmax_g(L̄_g / τ) over the groups present and
    L̄ an EMA of the detached L_g (L̄_g ← decay·L̄_g + (1 − decay)·L_g; L_g itself the first
    time g is seen). Groups without a token in the batch are left out of q.

    token_logps (B, T): label-token log-probs, 0 off the answers; token_groups (B, T) int,
    0..n_groups-1 on answer tokens, -1 elsewhere. With `all_reduce` (a sum over the
    workers of a data-parallel group of `world_size`), L_g and q are those of the global
    batch on every worker, and the loss is scaled so that DDP's gradient average is the
    gradient of the global loss. Returns (loss, L (G,) detached, NaN where absent,
    q (G,), the new EMA (G,))."""
    in_group = (token_groups.unsqueeze(-1) == torch.arange(n_groups, device=token_groups.device))
    in_group = in_group.to(token_logps.dtype)                       # (B, T, G)
    sums = -(token_logps.unsqueeze(-1) * in_group).sum(dim=(0, 1))  # (G,), with gradient
    counts = in_group.sum(dim=(0, 1))
    total = sums.detach()
    if all_reduce is not None:
        total, counts = all_reduce(total.clone()), all_reduce(counts.clone())
    present = counts > 0
    group_loss = torch.where(present, total / counts.clamp(min=1), torch.nan)
    if ema is None:
        ema = torch.full_like(group_loss, torch.nan)
    updated = torch.where(torch.isnan(ema), group_loss, decay * ema + (1 - decay) * group_loss)
    ema = torch.where(present, updated, ema)
    q = torch.softmax((ema / tau).masked_fill(~present, float("-inf")), dim=0)
    loss = world_size * (q * sums / counts.clamp(min=1)).sum()
    return loss, group_loss, q, ema
