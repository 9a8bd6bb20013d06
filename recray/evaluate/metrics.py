"""The recommendation metrics of spec §4 (paper §5.1.3), as pure numpy functions.

Conventions shared by every function here:

- There are n evaluated samples. `ranks[u]` is the 0-based rank of sample u's target
  among ALL catalog items (0 = nearest to the generated title). A sample whose answer
  could not be parsed must be given rank = catalog size: a miss at every K. Negative
  ranks are refused, so a "no target" marker (-1) can never count as a hit.
- `topk_lists[u]` holds sample u's recommended item ids, nearest first; a metric at K
  uses the first K of each list.
- `groups` are the genre groups of the fairness metrics (the 10 most frequent train
  categories, spec §1.6). `item_groups` maps an item id to its categories; categories
  that are not in `groups` are ignored, and so are items absent from the mapping.
- Popularity groups: the top 10% of catalog items by train interactions are "popular",
  the rest "unpopular" (see `popularity_groups`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

KS = (1, 5, 10, 20)
POPULAR, UNPOPULAR = "popular", "unpopular"

ItemId = Hashable


def _check_ranks(ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise TypeError(f"ranks must be integers, got dtype {r.dtype}")
    if (r < 0).any():
        raise ValueError("negative rank: give an unparsable answer rank = catalog size (a miss)")
    return r


def _first_k(topk_lists: Sequence[Sequence[ItemId]] | np.ndarray, k: int) -> np.ndarray:
    """The first k ids of every list as an (n, k) array; refuses lists shorter than k."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    rows = [list(items)[:k] for items in topk_lists]
    if not rows:
        raise ValueError("no top-k lists")
    short = [u for u, row in enumerate(rows) if len(row) < k]
    if short:
        raise ValueError(f"{len(short)} top-k lists (first: sample {short[0]}) "
                         f"hold fewer than K={k} items")
    return np.array(rows)


def _check_groups(groups: Sequence[str]) -> list[str]:
    groups = list(groups)
    if not groups:
        raise ValueError("no groups")
    if len(set(groups)) != len(groups):
        raise ValueError(f"groups repeat a name: {groups}")
    return groups


def hit_ratio(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """HR@K = (1/n) Σ_u 1[r_u < K]."""
    return float(np.mean(_check_ranks(ranks) < k))


def ndcg(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """NDCG@K = (1/n) Σ_u 1[r_u < K] / log2(r_u + 2).

    Each sample has exactly one relevant item, so the ideal DCG is 1 and NDCG = DCG.
    """
    r = _check_ranks(ranks)
    hit = r < k
    gains = np.zeros(r.shape)
    gains[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return float(gains.mean())


def div_ratio(topk_lists: Sequence[Sequence[ItemId]] | np.ndarray, k: int) -> float:
    """DivRatio@K = |∪_u L_u| / (K·n): distinct recommended items per recommendation slot."""
    lists = _first_k(topk_lists, k)
    return len(np.unique(lists)) / lists.size


def or_ratio(topk_lists: Sequence[Sequence[ItemId]] | np.ndarray, k: int) -> float:
    """ORRatio@K = (summed counts of the 3 most often recommended items over all L_u) / (K·n).

    With fewer than 3 distinct items, all of them are summed (so the ratio is 1).
    """
    lists = _first_k(topk_lists, k)
    _, counts = np.unique(lists, return_counts=True)
    return float(np.sort(counts)[::-1][:3].sum()) / lists.size


def genre_shares(item_lists: Iterable[Iterable[ItemId]], item_groups: Mapping[ItemId, Iterable[str]],
                 groups: Sequence[str]) -> dict[str, float]:
    """Share of each group among the items of `item_lists` (p_rec or p_hist of spec §4).

    With G(i) = item_groups[i] ∩ groups, every occurrence of an item i adds 1/|G(i)| to
    each group in G(i) (an item listed twice counts twice); items with an empty G(i) add
    nothing. The masses are normalised to sum 1: p(g) = m(g) / Σ_h m(h). When no item
    has a group, every share is 0.
    """
    groups = _check_groups(groups)
    column = {g: j for j, g in enumerate(groups)}
    mass = np.zeros(len(groups))
    # Work per distinct item: catalogs repeat heavily across history and top-k lists.
    for item, count in Counter(i for items in item_lists for i in items).items():
        mine = sorted({column[g] for g in item_groups.get(item) or () if g in column})
        if mine:
            mass[mine] += count / len(mine)
    total = mass.sum()
    if total > 0:
        mass /= total
    return dict(zip(groups, mass.tolist()))


def group_unfairness(topk_lists: Sequence[Sequence[ItemId]] | np.ndarray,
                     history_lists: Iterable[Iterable[ItemId]],
                     item_groups: Mapping[ItemId, Iterable[str]], groups: Sequence[str],
                     k: int) -> tuple[dict[str, float], float, float]:
    """Genre unfairness of the top-K lists against the users' histories.

    GU_g@K = p_rec(g) - p_hist(g), with p_rec the genre shares of the first K items of
    every top-k list and p_hist those of all history items of the same samples
    (`genre_shares`). MGU@K = (1/|groups|) Σ_g |GU_g|; DGU@K = max_g GU_g - min_g GU_g,
    both over all `groups` (a group absent from both sides has GU_g = 0 and counts).
    Returns (GU by group, MGU, DGU).
    """
    groups = _check_groups(groups)
    p_rec = genre_shares(_first_k(topk_lists, k), item_groups, groups)
    p_hist = genre_shares(history_lists, item_groups, groups)
    gu = {g: p_rec[g] - p_hist[g] for g in groups}
    values = np.array(list(gu.values()))
    return gu, float(np.abs(values).mean()), float(values.max() - values.min())


def group_utility(ranks: Sequence[int] | np.ndarray, target_groups: Sequence[Iterable[str]],
                  k: int) -> tuple[dict[str, float], float, float]:
    """BiFair group utility (seed 003): per-group HR@K, its spread and its worst quarter.

    U_g@K = HR@K over the samples whose target is in g (`target_groups[u]` lists the
    groups of sample u's target; a sample in several groups counts in each; groups
    with no sample are omitted, keys are sorted).
    CV@K = std_g(U_g) / mean_g(U_g), std being the POPULATION std (ddof=0) over the
    groups present; CV = 0.0 when the mean is 0 (every U_g is 0, no spread), so the
    result is never NaN.
    MIN@K = mean of the ceil(0.25·G) smallest U_g (G = number of groups present, so at
    least one value is averaged).
    With no group present at all both CV and MIN are 0.0 (vacuous). Returns (U, CV, MIN).
    """
    r = _check_ranks(ranks)
    if len(target_groups) != len(r):
        raise ValueError(f"{len(target_groups)} target group sets for {len(r)} ranks")
    members: dict[str, list[int]] = {}
    for u, gs in enumerate(target_groups):
        for g in set(gs):
            members.setdefault(g, []).append(u)
    utility = {g: hit_ratio(r[members[g]], k) for g in sorted(members)}
    return (utility, *_spread(utility))


def _spread(utility: Mapping[str, float]) -> tuple[float, float]:
    """(CV, MIN) of per-group utilities, as `group_utility` defines them."""
    values = np.sort(np.array(list(utility.values()), dtype=float))
    if values.size == 0:
        return 0.0, 0.0
    mean = values.mean()
    cv = float(values.std(ddof=0) / mean) if mean > 0 else 0.0
    return cv, float(values[: -(-values.size // 4)].mean())


def popularity_groups(item_ids: Sequence[ItemId], train_counts: Sequence[int] | np.ndarray,
                      top_fraction: float = 0.1) -> dict[ItemId, str]:
    """Map each catalog item to "popular" or "unpopular".

    Items are ordered by train interaction count descending, ties by item id ascending
    (the id's own order: string order for the canonical string ids); the first
    ceil(top_fraction · n_items) are "popular", the rest "unpopular".
    """
    ids = list(item_ids)
    counts = np.asarray(train_counts)
    if len(ids) != len(counts):
        raise ValueError(f"{len(ids)} item ids but {len(counts)} train counts")
    if len(set(ids)) != len(ids):
        raise ValueError("item ids repeat")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    # round() first: 0.1 * 30 is 3.0000000000000004 in binary, whose ceil would be 4.
    n_top = math.ceil(round(top_fraction * len(ids), 9))
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), ids[i]))
    return {ids[i]: POPULAR if pos < n_top else UNPOPULAR for pos, i in enumerate(order)}


def _list_metrics(topk_lists, history_lists, item_categories: Mapping[ItemId, Iterable[str]],
                  groups: Sequence[str], k: int) -> dict[str, float]:
    """What the top-K lists alone show, whatever the targets: DivRatio, ORRatio, MGU, DGU, GU."""
    gu, mgu, dgu = group_unfairness(topk_lists, history_lists, item_categories, groups, k)
    return {f"DivRatio@{k}": div_ratio(topk_lists, k), f"ORRatio@{k}": or_ratio(topk_lists, k),
            f"MGU@{k}": mgu, f"DGU@{k}": dgu, **{f"GU@{k}/{g}": v for g, v in gu.items()}}


def all_metrics(target_ranks: Sequence[int] | np.ndarray,
                topk_lists: Sequence[Sequence[ItemId]] | np.ndarray,
                history_lists: Sequence[Sequence[ItemId]], target_items: Sequence[ItemId],
                item_categories: Mapping[ItemId, Iterable[str]], groups: Sequence[str],
                item_popularity: Mapping[ItemId, str], ks: Sequence[int] = KS) -> dict[str, float]:
    """Every metric of spec §4 at every K, as one flat dict.

    Per sample u: `target_ranks[u]`, `topk_lists[u]` (at least max(ks) ids),
    `history_lists[u]` and `target_items[u]`. `item_categories` maps item ids to their
    categories (only those in `groups` count); `item_popularity` maps every target item
    to "popular"/"unpopular" (`popularity_groups`).

    Keys, for each K: HR@K, NDCG@K, DivRatio@K, ORRatio@K, MGU@K, DGU@K, GU@K/<group>
    for every genre group, CV@K/pop, MIN@K/pop, CV@K/genre, MIN@K/genre; plus n_samples.
    """
    groups = _check_groups(groups)
    ranks = _check_ranks(target_ranks)
    n = len(ranks)
    lengths = {"topk_lists": len(topk_lists), "history_lists": len(history_lists),
               "target_items": len(target_items)}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"per-sample inputs differ in length: ranks {n}, {lengths}")
    group_set = set(groups)
    genre_targets = [group_set.intersection(item_categories.get(t) or ()) for t in target_items]
    missing = [t for t in target_items if t not in item_popularity]
    if missing:
        raise ValueError(f"{len(missing)} target items have no popularity group (first: {missing[0]!r})")
    pop_targets = [(item_popularity[t],) for t in target_items]

    out: dict[str, float] = {"n_samples": n}
    for k in ks:
        out[f"HR@{k}"] = hit_ratio(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
        out.update(_list_metrics(topk_lists, history_lists, item_categories, groups, k))
        for name, targets in (("pop", pop_targets), ("genre", genre_targets)):
            _, out[f"CV@{k}/{name}"], out[f"MIN@{k}/{name}"] = group_utility(ranks, targets, k)
    return out


# ---------------------------------------------------------------- several targets per user
# BiFair's general-recommendation protocol (seed 003; seed-methods.md §4.5 B): user u has a
# set T_u of held-out items (`target_lists[u]`, non-empty) and is ranked against the
# whole catalog less the items it is known to have (its `history_lists[u]`).

def _hits(topk_lists, target_lists, k: int) -> tuple[np.ndarray, list[set]]:
    top = _first_k(topk_lists, k)
    targets = [set(t) for t in target_lists]
    if len(targets) != len(top):
        raise ValueError(f"{len(targets)} target sets for {len(top)} top-k lists")
    if any(not t for t in targets):
        raise ValueError("a user has no target item: leave such users out")
    return np.array([[item in t for item in row] for row, t in zip(top, targets)]), targets


def recall(topk_lists, target_lists, k: int) -> float:
    """Recall@K = (1/n) Σ_u |Top_K(u) ∩ T_u| / |T_u|."""
    hits, targets = _hits(topk_lists, target_lists, k)
    return float(np.mean(hits.sum(1) / np.array([len(t) for t in targets])))


def ndcg_multi(topk_lists, target_lists, k: int) -> float:
    """NDCG@K with binary gains: DCG over the hits in Top_K(u) / the DCG of min(|T_u|, K) hits."""
    hits, targets = _hits(topk_lists, target_lists, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum([len(t) for t in targets], k) - 1]
    return float(np.mean((hits * discounts).sum(1) / ideal))


def hit_any(topk_lists, target_lists, k: int) -> float:
    """HR@K = share of users with at least one target in Top_K(u)."""
    return float(np.mean(_hits(topk_lists, target_lists, k)[0].any(1)))


def group_recall_utility(topk_lists, target_lists, item_groups: Mapping[ItemId, Iterable[str]],
                         k: int) -> tuple[dict[str, float], float, float]:
    """BiFair's Eq. 1 with Recall@K (seed-methods.md §4.3 item 6): U_g = the mean over users
    with a target in g of |Top_K(u) ∩ T_u ∩ g| / |T_u ∩ g|; CV and MIN as `group_utility`."""
    top = _first_k(topk_lists, k)
    per_group: dict[str, list[float]] = {}
    for row, targets in zip(top, target_lists):
        shown = set(row.tolist())
        by_group: dict[str, list] = {}
        for item in set(targets):
            for g in set(item_groups.get(item) or ()):
                by_group.setdefault(g, []).append(item in shown)
        for g, hits in by_group.items():
            per_group.setdefault(g, []).append(float(np.mean(hits)))
    utility = {g: float(np.mean(v)) for g, v in sorted(per_group.items())}
    return (utility, *_spread(utility))


def general_metrics(topk_lists, target_lists, history_lists, item_categories: Mapping[ItemId, Iterable[str]],
                    groups: Sequence[str], item_popularity: Mapping[ItemId, str],
                    ks: Sequence[int] = KS) -> dict[str, float]:
    """`all_metrics` for users with several targets: Recall@K, NDCG@K and HR@K of the
    multi-target kind, the same list metrics (DivRatio, ORRatio, MGU, DGU, GU against the
    user's known items), and Recall-based CV/MIN over popularity and genre groups."""
    groups = _check_groups(groups)
    group_set = set(groups)
    genre_of = {i: group_set.intersection(c or ()) for i, c in item_categories.items()}
    pop_of = {i: (g,) for i, g in item_popularity.items()}
    out: dict[str, float] = {"n_samples": len(topk_lists)}
    for k in ks:
        out[f"Recall@{k}"] = recall(topk_lists, target_lists, k)
        out[f"NDCG@{k}"] = ndcg_multi(topk_lists, target_lists, k)
        out[f"HR@{k}"] = hit_any(topk_lists, target_lists, k)
        out.update(_list_metrics(topk_lists, history_lists, item_categories, groups, k))
        for name, of in (("pop", pop_of), ("genre", genre_of)):
            _, out[f"CV@{k}/{name}"], out[f"MIN@{k}/{name}"] = group_recall_utility(
                topk_lists, target_lists, of, k)
    return out


GENERAL_PREDICTION_COLUMNS = ("user_id", "history_item_ids", "target_item_ids", "topk_item_ids")


def general_metrics_from_tables(predictions: pa.Table, catalog: pa.Table, groups: Sequence[str],
                                ks: Sequence[int] = KS) -> dict[str, float]:
    """`general_metrics` from stored tables: predictions with user_id, history_item_ids (the
    items masked from the ranking), target_item_ids and topk_item_ids; the catalog as in
    `metrics_from_tables` (its train_count gives the popularity groups)."""
    _require_columns(predictions, GENERAL_PREDICTION_COLUMNS, "predictions")
    _require_columns(catalog, CATALOG_COLUMNS, "catalog")
    item_ids = catalog.column("item_id").to_pylist()
    return general_metrics(
        topk_lists=predictions.column("topk_item_ids").to_pylist(),
        target_lists=predictions.column("target_item_ids").to_pylist(),
        history_lists=predictions.column("history_item_ids").to_pylist(),
        item_categories=dict(zip(item_ids, catalog.column("categories").to_pylist())),
        groups=groups,
        item_popularity=popularity_groups(item_ids, catalog.column("train_count").to_numpy()),
        ks=ks)


PREDICTION_COLUMNS = ("target_item_id", "history_item_ids", "topk_item_ids", "target_rank")
CATALOG_COLUMNS = ("item_id", "categories", "train_count")


def _require_columns(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing} (has {table.column_names})")


def metrics_from_tables(predictions: pa.Table, catalog: pa.Table, groups: Sequence[str],
                        ks: Sequence[int] = KS) -> dict[str, float]:
    """`all_metrics` recomputed from stored tables alone.

    predictions: one row per evaluated sample with target_item_id, history_item_ids
    (list), topk_item_ids (list, at least max(ks) nearest items) and target_rank
    (catalog size for an unparsable answer; never null).
    catalog: item_id, categories (list), train_count. Genre groups of an item are its
    categories ∩ groups; popularity groups come from `popularity_groups` over the whole
    catalog.
    """
    _require_columns(predictions, PREDICTION_COLUMNS, "predictions")
    _require_columns(catalog, CATALOG_COLUMNS, "catalog")
    if predictions.column("target_rank").null_count:
        raise ValueError("target_rank has nulls: an unparsable answer must carry rank = catalog size")
    item_ids = catalog.column("item_id").to_pylist()
    return all_metrics(
        target_ranks=predictions.column("target_rank").to_numpy(),
        topk_lists=predictions.column("topk_item_ids").to_pylist(),
        history_lists=predictions.column("history_item_ids").to_pylist(),
        target_items=predictions.column("target_item_id").to_pylist(),
        item_categories=dict(zip(item_ids, catalog.column("categories").to_pylist())),
        groups=groups,
        item_popularity=popularity_groups(item_ids, catalog.column("train_count").to_numpy()),
        ks=ks,
    )


def recommendation_profile(predictions: pa.Table, catalog: pa.Table, top: int = 5) -> dict:
    """What a model recommends, beside how well: the target-rank median (chance is about
    half the catalog), the mean train count of the top-1 and top-5 items (MostPop's is the
    ceiling), and the `top` most recommended top-1 titles with their counts."""
    _require_columns(predictions, ("topk_item_ids", "target_rank"), "predictions")
    _require_columns(catalog, ("item_id", "title", "train_count"), "catalog")
    counts = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("train_count").to_pylist()))
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    lists = predictions.column("topk_item_ids").to_pylist()
    out: dict = {"target_rank_median": float(np.median(predictions.column("target_rank").to_numpy()))}
    for k in (1, 5):
        out[f"mean_train_count@{k}"] = float(np.mean([counts[i] for row in lists for i in row[:k]]))
    out["top_recommended"] = [[titles[i], n] for i, n in Counter(row[0] for row in lists).most_common(top)]
    return out


def per_sample(ranks: Sequence[int] | np.ndarray, metric: str) -> np.ndarray:
    """Each sample's contribution to HR@K or NDCG@K (metric "HR@5", "NDCG@20", ...)."""
    name, k = metric.split("@")
    r = _check_ranks(ranks)
    hit = r < int(k)
    if name == "HR":
        return hit.astype(float)
    if name == "NDCG":
        return np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    raise ValueError(f"no per-sample form for {metric!r} (HR@K and NDCG@K have one)")


def paired_bootstrap(ranks_a: Sequence[int] | np.ndarray, ranks_b: Sequence[int] | np.ndarray,
                     metric: str, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(difference b − a, lower, upper): the metric's difference between two models ranked on
    the SAME samples in the same order, with its percentile interval over `n_resamples`
    resamplings of the samples (both models resampled together: paired)."""
    a, b = per_sample(ranks_a, metric), per_sample(ranks_b, metric)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same samples: {a.size} against {b.size}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)
