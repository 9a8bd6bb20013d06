"""IFairLRS re-ranking after grounding (seed 004; seed-methods.md §1.3, its [CHOICE]s).

    π(i)     = mean over i's genre groups g of GU_g@K_r / max_h |GU_h@K_r|     (GU on valid,
                                                                              no re-ranking)
    d'(u, i) = d(u, i) · exp(λ · π(i))                                      (whole catalog)
    λ        = argmin over the grid of MGU@K_r on valid, keeping NDCG@5 ≥ guard × NDCG@5(λ=0)
               (when NDCG@5(λ=0) = 0 the guard is vacuous: DivRatio@5 must not fall instead)
    rounds   (optional, §1.3 step 5) at that λ: π ← π + π(GU of the re-ranked valid), kept
               only while valid MGU@K_r falls and the same guard holds

Over-recommended genres (GU > 0) move away, under-recommended ones closer; λ = 0 is the
plain ranking exactly. Valid is evaluated first: it yields π and λ (rerank.json), and the
test evaluation of the same model applies them.
"""

from __future__ import annotations

import numpy as np

from recray.errors import ConfigError


def item_penalty(gu_by_group: dict[str, float], item_categories: list[list[str]]) -> np.ndarray:
    """π(i) in [-1, 1]; 0 for an item in none of the groups (or when every GU is 0)."""
    top = max((abs(v) for v in gu_by_group.values()), default=0.0)
    if top == 0:
        return np.zeros(len(item_categories))
    out = np.zeros(len(item_categories))
    for i, categories in enumerate(item_categories):
        mine = [gu_by_group[c] / top for c in categories if c in gu_by_group]
        if mine:
            out[i] = float(np.mean(mine))
    return out


def group_unfairness(metrics: dict, k: int) -> dict[str, float]:
    """GU_g@k of every group, from an evaluation's metrics.json."""
    prefix = f"GU@{k}/"
    found = {key[len(prefix):]: v for key, v in metrics.items() if key.startswith(prefix)}
    if not found:
        raise ConfigError(f"evaluate.rerank.k={k}: the metrics hold no GU@{k} (the metrics' "
                          f"K values are the only choices)")
    return found


def keeps_quality(metrics: dict, plain: dict, guard: float) -> bool:
    """NDCG@5 ≥ guard × the plain ranking's; where that is 0, DivRatio@5 does not fall."""
    if plain["NDCG@5"] > 0:
        return metrics["NDCG@5"] >= guard * plain["NDCG@5"]
    return metrics["DivRatio@5"] >= plain["DivRatio@5"]


def choose_lambda(by_lambda: dict[float, dict], k: int, guard: float) -> float:
    """The grid's λ with the lowest MGU@k that keeps ranking quality (module docstring);
    ties go to the smaller λ. by_lambda: λ -> valid metrics, with λ = 0 among them."""
    allowed = [lam for lam, m in by_lambda.items() if keeps_quality(m, by_lambda[0.0], guard)]
    return min(allowed, key=lambda lam: (by_lambda[lam][f"MGU@{k}"], lam))


def round_helps(new: dict, current: dict, plain: dict, k: int, guard: float) -> bool:
    """A fixed-point round is kept only if it lowers valid MGU@k within the λ guard: the
    seed warns that the penalty can overcorrect when unfairness estimates are noisy."""
    return new[f"MGU@{k}"] < current[f"MGU@{k}"] and keeps_quality(new, plain, guard)


def scale(penalty: np.ndarray, lam: float) -> np.ndarray | None:
    """The distance scale exp(λ·π); None for λ = 0 (the plain ranking, exactly)."""
    return None if lam == 0 else np.exp(lam * penalty)
