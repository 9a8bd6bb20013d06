"""BiFair (seed 003) and its baselines: the gradient machinery against finite differences and
brute force, the multi-target metrics by hand, the general split's counts, the fairness
effect on built data with an under-served group, and the method end to end on MovieLens."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recray.config import BifairConfig
from recray.conventional import bifair
from recray.conventional.fairness import (entropy_coefficients, fair_weights, group_losses,
                                          min_norm_weights)
from recray.evaluate import metrics


def entropy(losses: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(losses, 0)
    return -(p * torch.log(p)).sum()


def test_entropy_coefficients_are_the_gradient_of_minus_entropy_and_raise_it():
    losses = torch.tensor([0.3, 1.7, 0.9, 2.4], dtype=torch.float64, requires_grad=True)
    c = entropy_coefficients(losses.detach())
    (grad,) = torch.autograd.grad(-entropy(losses), losses)
    assert torch.allclose(c, grad)
    # a small step that descends −H_s (along +∇H_s = −c) raises the entropy of the losses
    assert entropy(losses.detach() - 1e-2 * c) > entropy(losses.detach())
    # and through a model: θ − η Σ_n c_n ∇ℓ_n raises H_s of ℓ(θ)
    torch.manual_seed(0)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    group = lambda t: (x @ t) ** 2                           # noqa: E731
    ell = group(theta)
    grads = torch.stack([torch.autograd.grad(ell[n], theta, retain_graph=True)[0] for n in range(4)])
    step = entropy_coefficients(ell.detach()) @ grads
    assert entropy(group(theta.detach() - 1e-3 * step)) > entropy(ell.detach())


@pytest.mark.parametrize("n", [2, 3])
def test_frank_wolfe_finds_the_min_norm_point_of_the_hull(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        vectors = torch.tensor(rng.normal(size=(n, 4)))
        # Frank-Wolfe converges as O(1/t): slowly where the optimum is inside the hull
        norms = [float(torch.linalg.norm(min_norm_weights(vectors, t) @ vectors)) for t in (25, 200)]
        w = min_norm_weights(vectors, iterations=5000)
        assert w.min() >= 0 and float(w.sum()) == pytest.approx(1.0)
        assert norms[0] >= norms[1] >= float(torch.linalg.norm(w @ vectors)) - 1e-12
        grid = np.linspace(0, 1, 201)
        best = min(float(torch.linalg.norm(torch.tensor(p) @ vectors))
                   for p in itertools.product(grid, repeat=n - 1) if sum(p) <= 1
                   for p in [(*p, 1 - sum(p))])
        assert float(torch.linalg.norm(w @ vectors)) <= best + 1e-3


def test_frank_wolfe_on_two_vectors_matches_the_closed_form():
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.2, 1.0], dtype=torch.float64)
    gamma = float(((b - a) @ b) / ((a - b) @ (a - b)))      # argmin ‖γ a + (1−γ) b‖
    w = min_norm_weights(torch.stack([a, b]), iterations=100)
    assert float(w[0]) == pytest.approx(gamma, abs=1e-6)


def test_fair_weight_variants():
    torch.manual_seed(1)
    grads, losses = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    c = entropy_coefficients(losses)
    w = min_norm_weights(torch.cat([grads, (c @ grads)[None]]))
    w = 0.9 * w + 0.1 / 4
    assert torch.allclose(fair_weights(grads, losses, "entropy", 0.1), w[:3] + w[3] * c)
    assert torch.allclose(fair_weights(grads, losses, "eq11", 0.1), w[:3])
    plain = fair_weights(grads, losses, "noentropy", 0.0)
    assert torch.allclose(plain, min_norm_weights(grads)) and float(plain.sum()) == pytest.approx(1)


def test_group_losses_are_means_over_each_groups_positives():
    per_positive = torch.tensor([1.0, 2.0, 4.0])
    membership = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert group_losses(per_positive, membership).tolist() == [1.5, 3.0, 0.0]


def test_finite_difference_hvp_matches_double_backward():
    torch.manual_seed(2)
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    params = {k: p.detach().clone() for k, p in module.named_parameters()}
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)

    def loss_of(p, zz):
        return (torch.func.functional_call(module, p, (zz,)) ** 2).sum() + zz.sin().sum()

    v = {k: torch.randn_like(p) for k, p in params.items()}
    exact_params = {k: p.clone().requires_grad_() for k, p in params.items()}
    grads = torch.autograd.grad(loss_of(exact_params, z), list(exact_params.values()), create_graph=True)
    dot = sum((g * v[k]).sum() for g, k in zip(grads, exact_params))
    (exact,) = torch.autograd.grad(dot, z)
    estimate = bifair.finite_difference_hvp(loss_of, params, z, v)
    # central differences with ε = 0.01/‖v‖: an O(ε²) error
    assert torch.allclose(estimate, exact, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(estimate, torch.zeros_like(exact), atol=1e-1)


def test_multi_target_metrics_by_hand():
    top = [["a", "b", "c"], ["c", "d", "e"]]
    targets = [["a", "x"], ["e"]]
    assert metrics.recall(top, targets, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert metrics.recall(top, targets, 3) == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.hit_any(top, targets, 1) == 0.5
    # user 0: hit at rank 0 of 2 targets (ideal 1 + 1/log2 3); user 1: hit at rank 2 of 1
    expected = (1 / (1 + 1 / np.log2(3)) + (1 / 2) / 1) / 2
    assert metrics.ndcg_multi(top, targets, 3) == pytest.approx(expected)
    groups = {"a": ["P"], "x": ["U"], "e": ["U"]}
    utility, cv, worst = metrics.group_recall_utility(top, targets, groups, 3)
    assert utility == {"P": 1.0, "U": 0.5}                  # U: user 0 misses x, user 1 hits e
    assert cv == pytest.approx(np.std([1.0, 0.5]) / 0.75) and worst == 0.5
    with pytest.raises(ValueError, match="no target"):
        metrics.recall(top, [["a"], []], 2)


def built_interactions(rows: list[tuple]) -> pa.Table:
    users, items, ratings = zip(*rows)
    n = len(rows)
    return pa.table({"user_id": list(users), "item_id": list(items), "timestamp": list(range(n)),
                     "rating": pa.array(ratings, pa.float64()), "source_file": ["f"] * n,
                     "source_line": list(range(1, n + 1)), "drop_reason": pa.nulls(n, pa.string())})


def test_general_split_counts_every_row_it_drops(ray_session, tmp_path):
    import ray.data

    from recray.conventional.general import general_split, read_general
    from recray.data.loaders import Source
    catalog = pa.table({"item_id": [f"i{j}" for j in range(30)], "title": [f"T{j}" for j in range(30)],
                        "categories": [["A"]] * 30, "train_count": [0] * 30})
    rows = [("u1", f"i{j}", 4.0) for j in range(25)]           # kept: 25 ratings >= 3
    rows += [("u1", "i0", 5.0)]                                # a re-rating
    rows += [("u1", "zz", 5.0), ("u1", "i26", 2.0), ("u1", "i27", None)]
    rows += [("u2", f"i{j}", 4.0) for j in range(10)]          # too few
    source = Source(ray.data.from_arrow(built_interactions(rows)), catalog, [])
    stats = general_split(source, catalog, BifairConfig(), tmp_path, seed=0)
    assert stats["read"] == len(rows)
    assert stats["dropped_item_not_in_catalog"] == 1 and stats["dropped_rating_below_min"] == 2
    assert stats["dropped_duplicate"] == 1
    assert stats["dropped_short_user"] == 10 and stats["users_dropped_short"] == 1
    sizes = {s: len(read_general(tmp_path, s).get("u1", [])) for s in ("train", "valid", "test")}
    assert sizes["train"] == 10 and sizes["valid"] + stats["dropped_valid_item_not_in_train"] == 8
    assert sizes["test"] + stats["dropped_test_item_not_in_train"] == 7
    assert sizes["valid"] == sizes["test"] == 0     # no one else has their items in train
    train_counts = pq.read_table(tmp_path / "catalog.parquet").column("train_count").to_pylist()
    assert sum(train_counts) == 10


def under_served_problem(seed: int = 0):
    """Users like items near their taste; 90% of the train positives are popular items (the
    first 10%), so an unfair model learns to serve the popular group."""
    rng = np.random.default_rng(seed)
    n_items, d, n_users = 60, 8, 300
    z0 = rng.normal(size=(n_items, d)).astype(np.float32)
    popular = np.arange(6)
    member = torch.zeros(n_items, 2)
    member[popular, 0] = 1
    member[6:, 1] = 1
    tastes = z0[rng.integers(n_items, size=n_users)] + 0.3 * rng.normal(size=(n_users, d))
    near = np.argsort(-(tastes @ z0.T), axis=1)
    histories, rows, items, valid_targets = [], [], [], []
    for u in range(n_users):
        liked = near[u, :12]
        liked_pop = [i for i in near[u] if i < 6][:2]
        histories.append(liked[:4].tolist())
        for i in liked[4:8].tolist() + liked_pop * 8:          # popular items dominate positives
            rows.append(u)
            items.append(int(i))
        valid_targets.append(liked[8:12].tolist() + liked_pop)
    bags = bifair.Bags.of(histories)
    positives = bifair.Positives.of(rows, items, member)
    valid = bifair.EvalRows(torch.arange(n_users), valid_targets, [[] for _ in range(n_users)])
    return z0, (bags, None), positives, valid, member


def _pop_cv(method, tmp_path, cfg):
    z0, parts, positives, valid, member = under_served_problem()
    record = bifair.train(method, z0, parts, positives, valid, cfg, tmp_path / method)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / method / bifair.WEIGHTS))
    module = bifair.projector(cfg, z0.shape[1])
    module.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items() if k != "items"})
    scores = bifair.item_scores(bifair.Encoder(module, parts[0], None, 0),
                                dict(module.named_parameters()), weights["items"], valid.rows)
    top = scores.topk(5, dim=1).indices.tolist()
    groups = {i: ["popular" if member[i, 0] else "unpopular"] for i in range(len(z0))}
    _, cv, worst = metrics.group_recall_utility(top, valid.targets, groups, 5)
    return cv, worst, record


def test_bifair_lowers_popularity_cv_against_the_unfair_baseline(tmp_path):
    cfg = BifairConfig(hidden=16, dim=8, batch_size=128, negatives=32, max_epochs=15,
                       patience=15, lr_theta=1e-2, lr_z=1e-2, temperature=0.2)
    cv_base, worst_base, _ = _pop_cv("alpharec", tmp_path, cfg)
    cv_fair, worst_fair, record = _pop_cv("bifair", tmp_path, cfg)
    assert record["epochs_run"] == 15 and len(record["curve"]) == 15
    assert record["positives_never_sampled"] == 0        # every item is popular or not
    assert cv_fair < cv_base and worst_fair > worst_base, (cv_base, cv_fair, worst_base, worst_fair)


@pytest.mark.parametrize("method", ["bifair", "alpharec"])
def test_bifair_runs_through_the_loop(method, ml100k_prepared, tmp_path):
    """bifair on the paper's protocol, alpharec on the sequential samples of every LLM
    method: both through `recray run`'s job, written in the shared contract."""
    from recray.config import load_config
    from recray.evaluate.report import report
    from recray.job import run_job
    prepared, _ = ml100k_prepared
    protocol = "general" if method == "bifair" else "sequential"
    cfg = load_config(None, [f"loop.method={method}", f"bifair.protocol={protocol}",
                             "bifair.max_epochs=2", "tracking.mlflow=false",
                             "evaluate.splits=[valid,test]"])
    run = run_job(cfg, tmp_path / method, prepared=prepared)
    rows = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["split"], r["protocol"]) for r in rows] == [
        (method, "test", protocol), (method, "valid", protocol)]
    record = json.loads((run.root / "it0" / "model" / bifair.META).read_text())
    assert record["epochs_run"] == 2 and record["valid_recall@20"] > 0.02
    result = run.root / "it0" / "eval" / "test" / "result"
    predictions = pq.read_table(result / "predictions.parquet")
    stored = json.loads((result / "metrics.json").read_text())
    catalog = pq.read_table((run.root / "it0" / "data") / "catalog.parquet")
    groups = json.loads((prepared / "groups.json").read_text())["groups"]
    if protocol == "general":
        recomputed = metrics.general_metrics_from_tables(predictions, catalog, groups)
        assert stored["Recall@20"] == pytest.approx(recomputed["Recall@20"])
        assert stored["Recall@20"] > 0.02
        masked = [set(h) & set(t) for h, t in zip(predictions.column("history_item_ids").to_pylist(),
                                                  predictions.column("topk_item_ids").to_pylist())]
        assert not any(masked)                       # known items are never recommended
    else:
        data_stats = json.loads((run.root / "it0" / "data" / "stats.json").read_text())
        assert record["positives"] == data_stats["samples"]["train_split"] > 10_000
        assert predictions.num_rows == pq.read_table(prepared / "test").num_rows
        assert stored["HR@20"] == pytest.approx(metrics.metrics_from_tables(
            predictions, pq.read_table(prepared / "catalog.parquet"), groups)["HR@20"])
    assert list((run.root / "tensorboard").glob("events*"))    # the training curve, per epoch
    text = report([run.root], tmp_path / "report").read_text()
    assert "BiFair" in text or "AlphaRec" in text


def test_lightgcn_graph_is_the_symmetric_normalised_adjacency_and_trains(tmp_path):
    graph = bifair.normalized_graph([[0, 1], [1]], n_items=3).to_dense()
    # nodes: users 0, 1, then items 0, 1, 2; degrees u0 2, u1 1, i0 1, i1 2, i2 0
    assert torch.allclose(graph, graph.T)
    assert graph[0, 2] == pytest.approx(1 / np.sqrt(2 * 1)) and graph[1, 3] == pytest.approx(1 / np.sqrt(1 * 2))
    assert graph[:, 4].abs().sum() == 0 and graph[0, 1] == 0
    z0, (bags, _), positives, valid, _ = under_served_problem()
    histories = [[int(i) for i, w in zip(row, ws) if w > 0] for row, ws in
                 zip(bags.items.tolist(), bags.weights.tolist())]
    cfg = BifairConfig(hidden=16, dim=8, batch_size=256, negatives=32, max_epochs=3, patience=3,
                       graph_layers=2, lr_theta=1e-2)
    record = bifair.train("bifair", z0, (bags, histories), positives, valid, cfg, tmp_path / "m")
    assert record["epochs_run"] == 3 and 0 < record["valid_recall@20"] <= 1


def test_general_split_reads_the_amazon_2014_loader(ray_session, tmp_path):
    """The general protocol on Amazon files (reviews + metadata), through the same loader as
    `recray prepare`: low ratings and unknown items counted, users split 4:3:3."""
    import gzip

    from recray.config import DataConfig
    from recray.conventional.general import general_split, read_general
    from recray.data.loaders import load
    items = [f"B{j:09d}" for j in range(12)]
    reviews = [{"reviewerID": f"U{u}", "asin": item, "overall": 2.0 if j == 0 else 5.0,
                "unixReviewTime": 1400000000 + j} for u in range(3) for j, item in enumerate(items)]
    reviews.append({"reviewerID": "U0", "asin": "NOT-IN-META", "overall": 5.0, "unixReviewTime": 1})
    (tmp_path / "reviews_Movies_and_TV_5.json").write_text("\n".join(json.dumps(r) for r in reviews) + "\n")
    with gzip.open(tmp_path / "meta_Movies_and_TV.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(repr({"asin": i, "title": f"Film {j}", "categories": [["Movies", "Drama"]]})
                          for j, i in enumerate(items)) + "\n")
    source = load(DataConfig(format="amazon2014", input=str(tmp_path)))
    catalog = source.catalog.append_column("train_count", pa.array([0] * source.catalog.num_rows))
    stats = general_split(source, catalog, BifairConfig(min_user_interactions=5), tmp_path / "out", seed=0)
    assert stats["read"] == 37 and stats["dropped_rating_below_min"] == 3
    assert stats["dropped_item_not_in_catalog"] == 1 and stats["train_users"] == 3
    assert all(len(v) == 4 for v in read_general(tmp_path / "out", "train").values())   # 11 × 0.4
