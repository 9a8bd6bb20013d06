"""Metrics of spec §4: hand-computed cases, then properties over random evaluations."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from recray.evaluate.metrics import (KS, all_metrics, div_ratio, genre_shares, group_unfairness,
                                     group_utility, hit_ratio, metrics_from_tables, ndcg,
                                     or_ratio, popularity_groups)

# --- hand-computed cases ---------------------------------------------------------------

# Four samples; the last answer was unparsable, so it has rank = catalog size (1682).
RANKS = [0, 3, 7, 1682]


def test_hit_ratio_by_hand():
    assert hit_ratio(RANKS, 1) == 1 / 4   # only rank 0 < 1
    assert hit_ratio(RANKS, 5) == 2 / 4   # ranks 0 and 3
    assert hit_ratio(RANKS, 10) == 3 / 4  # ranks 0, 3, 7
    assert hit_ratio(RANKS, 20) == 3 / 4  # the unparsable one never hits


def test_ndcg_by_hand():
    # rank r contributes 1/log2(r+2): r=0 -> 1, r=3 -> 1/log2(5) = 0.430677, r=7 -> 1/log2(9) = 0.315465
    assert ndcg(RANKS, 1) == pytest.approx(1 / 4)
    assert ndcg(RANKS, 5) == pytest.approx((1 + 0.430677) / 4, abs=1e-6)            # 0.357669
    assert ndcg(RANKS, 10) == pytest.approx((1 + 0.430677 + 0.315465) / 4, abs=1e-6)  # 0.436536


def test_ranks_must_be_non_negative_integers():
    with pytest.raises(ValueError):
        hit_ratio([0, -1], 5)  # a "no target" marker must never count as a hit
    with pytest.raises(TypeError):
        ndcg([0.0, 1.0], 5)
    with pytest.raises(ValueError):
        hit_ratio([], 5)


LISTS = [[1, 2], [2, 3], [1, 4]]


def test_div_ratio_by_hand():
    assert div_ratio(LISTS, 2) == pytest.approx(4 / 6)  # {1,2,3,4} over 2 slots x 3 samples
    assert div_ratio(LISTS, 1) == pytest.approx(2 / 3)  # {1,2} over 3 slots


def test_or_ratio_by_hand():
    # K=2 counts: 1->2, 2->2, 3->1, 4->1; the top three sum to 2+2+1 = 5 of 6 slots.
    assert or_ratio(LISTS, 2) == pytest.approx(5 / 6)
    # K=1 counts: 1->2, 2->1; fewer than three distinct items: all 3 slots.
    assert or_ratio(LISTS, 1) == 1.0


def test_lists_shorter_than_k_are_refused():
    with pytest.raises(ValueError):
        div_ratio(LISTS, 3)


GROUPS = ["A", "B", "C"]
# 3's "X" and 4's categories are outside the groups; 5 has none.
ITEM_GROUPS = {1: ["A"], 2: ["A", "B"], 3: ["B", "X"], 4: ["X"], 5: []}


def test_genre_shares_by_hand():
    # occurrences: 1 twice, 2, 3, 4 once. Item 1 -> A += 2; item 2 -> A += 1/2, B += 1/2;
    # item 3 -> G = {B} (X is no group) -> B += 1; item 4 -> nothing.
    # A = 2.5, B = 1.5, C = 0; total 4.
    shares = genre_shares([[1, 2], [3, 4, 1]], ITEM_GROUPS, GROUPS)
    assert shares == pytest.approx({"A": 0.625, "B": 0.375, "C": 0.0})
    assert list(shares) == GROUPS
    assert genre_shares([[4, 5, 99]], ITEM_GROUPS, GROUPS) == {"A": 0.0, "B": 0.0, "C": 0.0}


def test_group_unfairness_by_hand():
    topk, history = [[1, 2], [3, 1]], [[2], [3]]
    # p_rec@2: items 1,1,2,3 -> A = 2.5, B = 1.5 of 4 -> (0.625, 0.375, 0)
    # p_hist: item 2 -> A .5, B .5; item 3 -> B 1 -> A = .5, B = 1.5 of 2 -> (0.25, 0.75, 0)
    # GU = (0.375, -0.375, 0); MGU = 0.75/3 = 0.25; DGU = 0.375 - (-0.375) = 0.75
    gu, mgu, dgu = group_unfairness(topk, history, ITEM_GROUPS, GROUPS, 2)
    assert gu == pytest.approx({"A": 0.375, "B": -0.375, "C": 0.0})
    assert mgu == pytest.approx(0.25) and dgu == pytest.approx(0.75)
    # p_rec@1: items 1, 3 -> (0.5, 0.5, 0); GU = (0.25, -0.25, 0); MGU = 0.5/3; DGU = 0.5
    gu, mgu, dgu = group_unfairness(topk, history, ITEM_GROUPS, GROUPS, 1)
    assert gu == pytest.approx({"A": 0.25, "B": -0.25, "C": 0.0})
    assert mgu == pytest.approx(1 / 6) and dgu == pytest.approx(0.5)


def test_group_utility_by_hand():
    ranks = [0, 5, 2, 30, 1]
    targets = [["A"], ["A", "B"], ["B"], ["C"], []]
    # hits@3 = [1, 0, 1, 0, 1]; U_A = samples 0,1 -> 1/2; U_B = samples 1,2 -> 1/2;
    # U_C = sample 3 -> 0; sample 4 is in no group.
    # mean = 1/3; population std = sqrt((2·(1/6)² + (1/3)²)/3) = sqrt(1/18); CV = 1/√2.
    # MIN: ceil(0.25·3) = 1 lowest value -> 0.
    utility, cv, low = group_utility(ranks, targets, 3)
    assert utility == pytest.approx({"A": 0.5, "B": 0.5, "C": 0.0})
    assert cv == pytest.approx(1 / math.sqrt(2))
    assert low == 0.0
    # At K=1 only sample 0 hits: U = (1/2, 0, 0); mean 1/6, std = sqrt(((1/3)² + 2·(1/6)²)/3)
    # = sqrt(1/18); CV = sqrt(1/18)·6 = √2.
    assert group_utility(ranks, targets, 1)[1] == pytest.approx(math.sqrt(2))


def test_group_utility_min_averages_the_lowest_quarter_rounded_up():
    # Five groups of one sample each; hits@1 for g0, g1, g2 only: U = (1, 1, 1, 0, 0).
    # ceil(0.25·5) = 2 lowest -> (0 + 0)/2 = 0; with g3 hitting too the two lowest are 0 and 1.
    targets = [[f"g{i}"] for i in range(5)]
    assert group_utility([0, 0, 0, 9, 9], targets, 1)[2] == 0.0
    assert group_utility([0, 0, 0, 0, 9], targets, 1)[2] == 0.5


def test_group_utility_degenerate_cases_are_nan_free():
    assert group_utility([7, 9], [["A"], ["B"]], 5) == ({"A": 0.0, "B": 0.0}, 0.0, 0.0)
    assert group_utility([0, 1], [[], []], 5) == ({}, 0.0, 0.0)


def test_popularity_groups_tie_rule():
    # 20 items -> ceil(0.1·20) = 2 popular. Three items share the top count 7:
    # ties go by item id ascending, so i01 and i02 win over i03.
    ids = [f"i{n:02d}" for n in range(20)]
    counts = [1] * 20
    counts[3], counts[1], counts[2] = 7, 7, 7
    groups = popularity_groups(ids, counts)
    assert sorted(i for i, g in groups.items() if g == "popular") == ["i01", "i02"]
    assert sum(g == "unpopular" for g in groups.values()) == 18


def test_popularity_groups_size_is_not_fooled_by_binary_fractions():
    # 0.1·30 is 3.0000000000000004 in binary; the top 10% of 30 items is 3 items, not 4.
    groups = popularity_groups(list(range(30)), list(range(30)))
    assert sorted(i for i, g in groups.items() if g == "popular") == [27, 28, 29]
    # 11 items -> ceil(1.1) = 2
    assert sum(g == "popular" for g in popularity_groups(list(range(11)), [0] * 11).values()) == 2


def _small_evaluation():
    """Three samples over a catalog of 25 string ids; lists of 20."""
    ids = [f"m{n:02d}" for n in range(25)]
    categories = {i: (["Drama"] if n % 2 else ["Comedy", "Drama"]) if n % 5 else ["Horror"]
                  for n, i in enumerate(ids)}
    counts = list(range(25, 0, -1))  # m00 is the most popular
    topk = [ids[0:20], ids[5:25], ids[2:22]]
    history = [ids[3:6], ids[10:20], ids[0:1]]
    targets = ["m00", "m07", "m24"]
    ranks = [0, 2, 25]  # the third answer was unparsable: rank = catalog size
    return ids, categories, counts, topk, history, targets, ranks


def test_all_metrics_keys_and_values():
    ids, categories, counts, topk, history, targets, ranks = _small_evaluation()
    groups = ["Drama", "Comedy", "Horror"]
    out = all_metrics(ranks, topk, history, targets, categories, groups,
                      popularity_groups(ids, counts))
    expected = {"n_samples"}
    for k in KS:
        expected |= {f"{m}@{k}" for m in ("HR", "NDCG", "DivRatio", "ORRatio", "MGU", "DGU")}
        expected |= {f"GU@{k}/{g}" for g in groups}
        expected |= {f"{m}@{k}/{s}" for m in ("CV", "MIN") for s in ("pop", "genre")}
    assert set(out) == expected
    assert out["n_samples"] == 3
    assert out["HR@1"] == pytest.approx(1 / 3) and out["HR@5"] == pytest.approx(2 / 3)
    # Popular = top ceil(2.5) = 3 by count: m00, m01, m02. Targets m00 (rank 0) is popular,
    # m07 (rank 2) and m24 (miss) are not: U_pop@1 = 1, U_unpop@1 = 0 -> CV = 0.5/0.5 = 1, MIN = 0.
    assert out["CV@1/pop"] == pytest.approx(1.0) and out["MIN@1/pop"] == 0.0
    # @5: U_pop = 1, U_unpop = 1/2 -> mean 3/4, std 1/4, CV = 1/3; MIN = 1/2.
    assert out["CV@5/pop"] == pytest.approx(1 / 3) and out["MIN@5/pop"] == pytest.approx(0.5)
    # Genre targets: m00 -> Horror, m07 -> Drama, m24 -> Comedy+Drama.
    # @5: U_Horror = 1, U_Drama = 1/2, U_Comedy = 0 -> MIN (1 lowest) = 0.
    assert out["MIN@5/genre"] == 0.0
    # DivRatio@1 = 3 distinct first items / 3; ORRatio@1 = 3/3.
    assert out["DivRatio@1"] == 1.0 and out["ORRatio@1"] == 1.0


def test_metrics_from_tables_equals_all_metrics():
    ids, categories, counts, topk, history, targets, ranks = _small_evaluation()
    groups = ["Drama", "Comedy", "Horror"]
    predictions = pa.table({
        "target_item_id": targets,
        "history_item_ids": pa.array(history, pa.list_(pa.string())),
        "topk_item_ids": pa.array(topk, pa.list_(pa.string())),
        "target_rank": pa.array(ranks, pa.int64()),
    })
    catalog = pa.table({
        "item_id": ids,
        "title": [f"Movie {i}" for i in ids],
        "categories": pa.array([categories[i] for i in ids], pa.list_(pa.string())),
        "train_count": pa.array(counts, pa.int64()),
    })
    direct = all_metrics(ranks, topk, history, targets, categories, groups,
                         popularity_groups(ids, counts))
    assert metrics_from_tables(predictions, catalog, groups) == direct
    with pytest.raises(ValueError, match="train_count"):
        metrics_from_tables(predictions, catalog.drop_columns(["train_count"]), groups)


# --- properties over random evaluations ------------------------------------------------

PROP_GROUPS = ["g0", "g1", "g2", "g3"]


@st.composite
def evaluations(draw):
    n_items = draw(st.integers(2, 30))
    item = st.integers(0, n_items - 1)
    categories = {i: draw(st.lists(st.sampled_from(PROP_GROUPS + ["other"]), max_size=3))
                  for i in range(n_items)}
    n = draw(st.integers(1, 10))
    per_sample = lambda s: st.lists(s, min_size=n, max_size=n)  # noqa: E731
    return {
        "target_ranks": draw(per_sample(st.integers(0, n_items))),
        "topk_lists": draw(per_sample(st.lists(item, min_size=20, max_size=20))),
        "history_lists": draw(per_sample(st.lists(item, max_size=10))),
        "target_items": draw(per_sample(item)),
        "item_categories": categories,
        "groups": PROP_GROUPS,
        "item_popularity": popularity_groups(list(range(n_items)),
                                             draw(st.lists(st.integers(0, 50), min_size=n_items,
                                                           max_size=n_items))),
    }


@settings(max_examples=60, deadline=None)
@given(evaluations())
def test_metric_bounds(ev):
    out = all_metrics(**ev)
    for k in KS:
        for name in ("HR", "NDCG", "DivRatio", "ORRatio", "MGU"):
            assert 0.0 <= out[f"{name}@{k}"] <= 1.0
        assert out[f"NDCG@{k}"] <= out[f"HR@{k}"]
        assert 0.0 <= out[f"DGU@{k}"] <= 2.0
        assert all(-1.0 <= out[f"GU@{k}/{g}"] <= 1.0 for g in PROP_GROUPS)
        for side in ("pop", "genre"):
            assert out[f"CV@{k}/{side}"] >= 0.0
            assert 0.0 <= out[f"MIN@{k}/{side}"] <= 1.0
        # Popularity groups partition the samples, so HR@K is a weighted mean of the
        # U_g and the worst group cannot beat it.
        assert out[f"MIN@{k}/pop"] <= out[f"HR@{k}"] + 1e-12
        assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())


@settings(max_examples=60, deadline=None)
@given(evaluations(), st.randoms(use_true_random=False))
def test_metrics_do_not_depend_on_sample_order(ev, rnd):
    order = list(range(len(ev["target_ranks"])))
    rnd.shuffle(order)
    shuffled = dict(ev)
    for key in ("target_ranks", "topk_lists", "history_lists", "target_items"):
        shuffled[key] = [ev[key][i] for i in order]
    assert all_metrics(**shuffled) == pytest.approx(all_metrics(**ev))


@settings(max_examples=60, deadline=None)
@given(evaluations())
def test_hit_ratio_is_monotone_in_k(ev):
    hrs = [hit_ratio(ev["target_ranks"], k) for k in range(1, 25)]
    assert hrs == sorted(hrs)


@given(st.integers(1, 8), st.integers(1, 20))
def test_div_ratio_is_one_for_disjoint_lists(n, k):
    lists = np.arange(n * k).reshape(n, k)
    assert div_ratio(lists, k) == 1.0


@given(st.integers(1, 20), st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True))
def test_or_ratio_is_one_when_every_list_is_the_same_few_items(n, items):
    assert or_ratio([items] * n, len(items)) == 1.0


@settings(max_examples=60, deadline=None)
@given(evaluations(), st.integers(1, 3))
def test_mgu_is_zero_when_recommendations_mirror_histories(ev, copies):
    # History = the top-K items themselves (repeated: shares are scale-free), so p_rec = p_hist.
    for k in KS:
        history = [list(items[:k]) * copies for items in ev["topk_lists"]]
        gu, mgu, dgu = group_unfairness(ev["topk_lists"], history, ev["item_categories"],
                                        PROP_GROUPS, k)
        assert mgu == pytest.approx(0.0, abs=1e-12) and dgu == pytest.approx(0.0, abs=1e-12)
