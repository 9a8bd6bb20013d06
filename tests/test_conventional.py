"""Reference rows that need no LLM (Random, MostPop, SASRec) and what every evaluation
records beside its metrics: built data where the answer is known, then the real loop."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.conventional.baselines import Random
from recray.evaluate.evaluate import score_items
from recray.evaluate.metrics import hit_ratio, paired_bootstrap, recommendation_profile


def test_prepared_catalog_keeps_both_title_forms(ml100k_prepared):
    out, stats = ml100k_prepared
    catalog = pq.read_table(out / "catalog.parquet").to_pylist()
    item = next(r for r in catalog if r["source_title"] == "Usual Suspects, The (1995)")
    assert item["title"] == "The Usual Suspects (1995)"
    moved = sum(r["title"] != r["source_title"] for r in catalog)
    assert moved == stats["catalog"]["titles_article_first"] > 300
    titles = {r["item_id"]: r["title"] for r in catalog}
    sample = pq.read_table(out / "train").slice(0, 1).to_pylist()[0]
    assert all(f'"{titles[i]}"' in sample["prompt"] for i in sample["history_item_ids"])
    assert sample["completion"] == f'"{titles[sample["target_item_id"]]}"\n'


def built_catalog(n_items: int) -> pa.Table:
    return pa.table({"item_id": [f"i{j}" for j in range(n_items)],
                     "title": [f"Item {j}" for j in range(n_items)],
                     "categories": [["A"] if j % 2 else ["B"] for j in range(n_items)],
                     "train_count": [n_items - j for j in range(n_items)]})


def built_samples(histories, targets) -> pa.Table:
    return pa.table({"sample_id": [f"s{u}" for u in range(len(targets))],
                     "user_id": [f"u{u}" for u in range(len(targets))],
                     "history_item_ids": pa.array(histories, pa.list_(pa.string())),
                     "target_item_id": targets})


def test_score_items_ranks_the_whole_catalog_ties_by_catalog_order():
    catalog = built_catalog(30)
    samples = built_samples([["i0"], ["i1"]], ["i2", "i0"])
    scores = np.zeros((2, 30))
    scores[0, 2] = 1.0                  # sample 0: its target first
    predictions, metrics = score_items(samples, scores, catalog, ["A", "B"])
    # sample 1: all tie, so catalog order, and its target i0 is first too
    assert predictions.column("target_rank").to_pylist() == [0, 0]
    assert predictions.column("topk_item_ids").to_pylist()[0][:3] == ["i2", "i0", "i1"]
    assert metrics["HR@1"] == 1.0 and metrics["top_recommended"][0] == ["Item 2", 1]


def test_recommendation_profile_counts_what_is_recommended():
    catalog = built_catalog(4)             # train counts 4, 3, 2, 1
    predictions = pa.table({"topk_item_ids": [["i0", "i3"], ["i0", "i1"], ["i2", "i0"]],
                            "target_rank": [0, 3, 10]})
    profile = recommendation_profile(predictions, catalog)
    assert profile["target_rank_median"] == 3
    assert profile["mean_train_count@1"] == pytest.approx((4 + 4 + 2) / 3)
    assert profile["top_recommended"] == [["Item 0", 2], ["Item 2", 1]]


def test_paired_bootstrap_of_a_known_difference():
    a = np.full(400, 1000)
    b = np.where(np.arange(400) < 40, 0, 1000)        # 40 more hits: +0.1
    diff, low, high = paired_bootstrap(a, b, "HR@5", seed=1)
    assert diff == pytest.approx(0.1) and 0.06 < low < 0.1 < high < 0.14
    assert paired_bootstrap(a, a, "NDCG@5") == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(a, b[:10], "HR@5")


def write_built_prepared(path, n_items=40, n_train=600, n_valid=100, seed=0):
    """Sequences that walk the catalog: each item is followed by the next one, so the target
    is the successor of the last history item (a rule an item-ID model can learn)."""
    rng = np.random.default_rng(seed)
    catalog = built_catalog(n_items)
    path.mkdir(parents=True)
    pq.write_table(catalog, path / "catalog.parquet")
    (path / "groups.json").write_text(json.dumps({"groups": ["A", "B"]}))
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        starts = rng.integers(0, n_items, n)
        histories = [[f"i{(s + j) % n_items}" for j in range(3)] for s in starts]
        targets = [f"i{(s + 3) % n_items}" for s in starts]
        (path / split).mkdir()
        pq.write_table(built_samples(histories, targets), path / split / "part-0.parquet")
    return path


def test_sasrec_learns_a_sequential_rule_that_random_cannot(tmp_path):
    from recray.config import SasrecConfig
    from recray.conventional import baselines, sasrec
    prepared = write_built_prepared(tmp_path / "built")
    record = sasrec.train(prepared, SasrecConfig(max_epochs=60, patience=20), tmp_path / "model")
    assert record["best_epoch"] >= 1 and (tmp_path / "model" / "model.safetensors").exists()
    test = pq.read_table(prepared / "test")
    catalog = pq.read_table(prepared / "catalog.parquet")
    model = sasrec.Trained(tmp_path / "model")
    hr = {}
    for name, recommender in (("sasrec", model), ("random", baselines.Random(catalog, 0))):
        predictions, _ = score_items(test, recommender.scores(test), catalog, ["A", "B"])
        hr[name] = hit_ratio(predictions.column("target_rank").to_numpy(), 5)
    assert hr["random"] < 0.3 and hr["sasrec"] > 0.6, hr


def test_random_scores_are_seeded_per_sample():
    catalog = built_catalog(50)
    random = Random(catalog, seed=3)
    both = built_samples([["i0"], ["i1"]], ["i0", "i1"])
    alone = both.slice(1, 1)
    assert np.array_equal(random.scores(both)[1], random.scores(alone)[0])
    assert not np.array_equal(random.scores(both)[0], random.scores(both)[1])


@pytest.mark.parametrize("method", ["mostpop", "random", "sasrec"])
def test_reference_rows_run_through_the_loop(method, ml100k_prepared, tmp_path):
    from recray.config import load_config
    from recray.job import run_job
    from recray.methods import METHODS
    prepared, _ = ml100k_prepared
    cfg = load_config(None, [f"loop.method={method}", "sasrec.max_epochs=3",
                             "tracking.mlflow=false", "evaluate.splits=[valid,test]"])
    run = run_job(cfg, tmp_path / method, prepared=prepared)
    rows = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["iteration"], r["split"]) for r in rows] == [
        (method, 0, "test"), (method, 0, "valid")]
    assert METHODS[method].recommender == method
    assert not list(run.root.glob("it0/policy"))             # no LLM was trained
    result = run.root / "it0" / "eval" / "test" / "result"
    metrics = json.loads((result / "metrics.json").read_text())
    predictions = pq.read_table(result / "predictions.parquet")
    assert predictions.num_rows == metrics["n_samples"] == pq.read_table(prepared / "test").num_rows
    assert {"target_rank_median", "mean_train_count@1", "top_recommended"} <= set(metrics)
    if method == "mostpop":
        catalog = pq.read_table(prepared / "catalog.parquet").to_pandas()
        top5 = catalog.sort_values("train_count", ascending=False, kind="stable").item_id[:5].tolist()
        assert all(row[:5] == top5 for row in predictions.column("topk_item_ids").to_pylist())
        targets = predictions.column("target_item_id").to_pylist()
        assert metrics["HR@5"] == pytest.approx(np.mean([t in top5 for t in targets]))
    if method == "sasrec":
        assert (run.root / "it0" / "model" / "model.safetensors").exists()



def test_d3_decodes_pi0_over_the_catalog_with_sasrec_as_prior(tiny_pi0, tiny_pi0_run, tmp_path):
    """loop.method=d3: π_0, SASRec (stage it0/model), then every evaluation answer an exact
    catalog title; the row is D3's, with the α it decoded with."""
    from recray.config import load_config
    from recray.job import run_job
    from recray.methods import method_config
    cfg = load_config(None, [*tiny_pi0, "loop.method=d3", "sasrec.max_epochs=2",
                             "evaluate.decoding.max_new_tokens=40",
                             "tracking.mlflow=false", "evaluate.splits=[valid,test]"])
    effective = method_config(cfg)
    assert effective.generate.constrain_to_catalog and effective.evaluate.decoding.prior_weight == 0.25
    assert effective.evaluate.decoding.mode == "greedy"          # as the overrides chose
    run = run_job(cfg, tmp_path / "d3", prepared=tiny_pi0_run / "prepared")
    rows = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["split"]) for r in rows] == [("d3", "test"), ("d3", "valid")]
    assert all(r["exact_title_share"] == 1.0 for r in rows)
    assert (run.root / "it0" / "model" / "model.safetensors").exists()
