"""RW (IFairLRS, seed 004): per-sample SFT weights from group proportions.

A group g that is a larger share of the training TARGETS than of the training HISTORIES
is what the fine-tuned model learns to over-recommend (GU_g = p_rec(g) - p_hist(g) > 0).
RW scales each sample by how under-represented its target's groups are among targets:

    p_hist(g), p_target(g): group shares, each item spreading weight 1/|G(i)| over its
                            groups among the top groups (as the fairness metrics do)
    w_g      = p_hist(g) / p_target(g)
    w_sample = mean of w_g over the target's groups (1 when the target is in none),
               clipped to [1/clip, clip], then scaled so that the mean weight is 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np


def group_shares(item_lists: Iterable[Sequence[str]], item_groups: Mapping[str, Sequence[str]],
                 groups: Sequence[str]) -> dict[str, float]:
    """Share of each group over all items listed (an item in k groups counts 1/k to each)."""
    wanted = set(groups)
    mass: dict[str, float] = defaultdict(float)
    for items in item_lists:
        for item in items:
            mine = [g for g in item_groups.get(item, ()) if g in wanted]
            for g in mine:
                mass[g] += 1.0 / len(mine)
    total = sum(mass.values())
    return {g: (mass[g] / total if total else 0.0) for g in groups}


def group_weights(histories: Sequence[Sequence[str]], targets: Sequence[str],
                  item_groups: Mapping[str, Sequence[str]], groups: Sequence[str]) -> dict[str, float]:
    """w_g = p_hist(g) / p_target(g) for every group that occurs among the targets."""
    p_hist = group_shares(histories, item_groups, groups)
    p_target = group_shares([[t] for t in targets], item_groups, groups)
    return {g: p_hist[g] / p_target[g] for g in groups if p_target[g] > 0}


def sample_weights(histories: Sequence[Sequence[str]], targets: Sequence[str],
                   item_groups: Mapping[str, Sequence[str]], groups: Sequence[str],
                   clip: float = 10.0) -> np.ndarray:
    """One weight per sample, mean 1 (see the module docstring)."""
    w_g = group_weights(histories, targets, item_groups, groups)
    weights = np.ones(len(targets), dtype=np.float64)
    for i, target in enumerate(targets):
        mine = [w_g[g] for g in item_groups.get(target, ()) if g in w_g]
        if mine:
            weights[i] = float(np.mean(mine))
    weights = np.clip(weights, 1.0 / clip, clip)
    return weights / weights.mean() if len(weights) else weights
