"""IFairLRS re-ranking after grounding (seed 004; seed-methods.md §1.3, its [CHOICE]s).

    π(i)     = mean over i's genre groups g of GU_g@K_r / max_h |GU_h@K_r|     (GU on valid,
                                                                              no re-ranking)
    d'(u, i) = d(u, i) · exp(λ · π(i))                                      (whole catalog)
    λ        = argmin over the grid of MGU@K_r on valid, keeping NDCG@5 ≥ guard × NDCG@5(λ=0)
               (when NDCG@5(λ=0) = 0 the guard is vacuous: DivRatio@5 must not fall instead)

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


def choose_lambda(by_lambda: dict[float, dict], k: int, guard: float) -> float:
    """The grid's λ with the lowest MGU@k that keeps ranking quality (module docstring);
    ties go to the smaller λ. by_lambda: λ -> valid metrics, with λ = 0 among them."""
    plain = by_lambda[0.0]
    if plain["NDCG@5"] > 0:
        allowed = [lam for lam, m in by_lambda.items() if m["NDCG@5"] >= guard * plain["NDCG@5"]]
    else:
        allowed = [lam for lam, m in by_lambda.items() if m["DivRatio@5"] >= plain["DivRatio@5"]]
    return min(allowed, key=lambda lam: (by_lambda[lam][f"MGU@{k}"], lam))


def scale(penalty: np.ndarray, lam: float) -> np.ndarray | None:
    """The distance scale exp(λ·π); None for λ = 0 (the plain ranking, exactly)."""
    return None if lam == 0 else np.exp(lam * penalty)
