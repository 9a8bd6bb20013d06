"""UFO-like's judger and verdict (recray.judge) on constructed cases, then the method
through the loop on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.config import UfoConfig
from recray.judge import judge, verdict


def _catalog() -> pa.Table:
    ids = [f"i{j}" for j in range(8)]
    return pa.table({"item_id": ids, "title": [f"Movie {j} (1990)" for j in range(8)],
                     "categories": [["A"] if j < 4 else ["B"] for j in range(8)],
                     "train_count": [1] * 8})


def test_judger_weights_favour_the_under_exposed_group(tmp_path):
    catalog = _catalog()
    samples = pa.table({"sample_id": ["s0", "s1", "s2", "s3"], "user_id": ["u0", "u1", "u2", "u3"],
                        "history_item_ids": [["i0", "i4"], ["i1", "i5"], ["i2", "i6"], ["i3", "i7"]],
                        "target_item_id": ["i1", "i2", "i5", "i6"]})
    # the policy answers group A three times out of four: A is over-exposed, B under-exposed
    negatives = pa.table({"sample_id": ["s0", "s1", "s2", "s3"],
                          "rejected": [['"Movie 0 (1990)"\n'], ['"Movie 3 (1990)"\n'],
                                       ['"Movie 1 (1990)"\n'], ['"Movie 7 (1990)"\n']]})
    record = judge(samples, negatives, catalog, ["A", "B"], UfoConfig(), tmp_path)
    assert record["GU"] == pytest.approx({"A": 0.25, "B": -0.25})
    assert record["data_part"] == pytest.approx({"A": 0.0, "B": 0.0})
    w = pq.read_table(tmp_path / "samples.parquet").column("weight").to_numpy()
    c = pq.read_table(tmp_path / "negatives.parquet").column("weight").to_numpy()
    assert w.mean() == pytest.approx(1) and c.mean() == pytest.approx(1)
    # targets i5, i6 (group B) weigh exp(1)/exp(-1) = e² times the A targets
    assert w[2] == pytest.approx(w[3]) and w[2] / w[0] == pytest.approx(np.e ** 2)
    # pairs whose negative is in A (over-exposed) count twice those in B: 1 + κ vs 1
    assert c[0] == pytest.approx(2 * c[3]) and record["answers_grounded"] == 4


def test_verdict_reverts_a_step_that_loses_hr_and_stops_when_fair_enough():
    cfg = UfoConfig()
    first = {"HR@10": 0.10, "MGU@5": 0.08}
    assert verdict(first, first, {"HR@10": 0.085, "MGU@5": 0.01}, cfg) | {} == {
        "kept": False, "stop": False, "HR@10": [0.10, 0.085], "MGU@5": 0.08, "stop_at_MGU@5": 0.04}
    kept = verdict(first, first, {"HR@10": 0.095, "MGU@5": 0.035}, cfg)
    assert kept["kept"] and kept["stop"]
    assert not verdict(first, first, {"HR@10": 0.2, "MGU@5": 0.05}, cfg)["stop"]


def test_ufo_runs_through_the_loop_with_weighted_steps(tiny_pi0, tiny_pi0_run, tmp_path):
    from recray.config import load_config
    from recray.job import run_job
    cfg = load_config(None, [*tiny_pi0, "loop.method=ufo", "tracking.mlflow=false",
                             "ufo.rho=1", "evaluate.splits=[valid,test]"])
    reported = {}
    run = run_job(cfg, tmp_path / "ufo", prepared=tiny_pi0_run / "prepared",
                  on_iteration=lambda t, by_split: reported.update({t: by_split}))
    record = json.loads((run.root / "it1" / "judge" / "judge.json").read_text())
    assert set(record["u"]) == set(json.loads((tiny_pi0_run / "prepared" / "groups.json").read_text())["groups"])
    assert record["prior"] is not None and (run.root / "it0" / "prior" / "negatives.parquet").exists()
    weighted = pq.read_table(run.root / "it1" / "judge" / "samples.parquet")
    assert weighted.column("weight").to_numpy().mean() == pytest.approx(1)
    decision = json.loads((run.root / "it1" / "verdict" / "verdict.json").read_text())
    rows = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("reverted", False) for r in rows if r["iteration"] == 1] == [not decision["kept"]] * 2
    # a sweep scores the run's model: after a reverted step, still π_0's metrics
    kept = 1 if decision["kept"] else 0
    assert reported[1]["valid"]["HR@5"] == next(r["HR@5"] for r in rows if r["iteration"] == kept
                                                and r["split"] == "valid")
    assert reported[1]["valid"] == reported[kept]["valid"]
    summary = json.loads((run.root / "it1" / "policy" / "summary.json").read_text())
    assert summary["data"]["samples"] == pq.read_table(run.root / "it1" / "judge" / "negatives.parquet").num_rows
