"""recray report over run directories written the way the loop writes them."""

from __future__ import annotations

import json

import pytest

from recray.evaluate.report import TABLE_COLUMNS, comparison_table, for_terminal, report
from recray.errors import RecrayError


def write_run(path, method, values_by_iteration):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for it, base in enumerate(values_by_iteration):
            for split in ("valid", "test"):
                row = {"method": method, "iteration": it, "split": split, "n_samples": 10}
                row.update({c: base for c in TABLE_COLUMNS})
                row.update({"GU@1/Drama": base - 0.5, "GU@1/Comedy": 0.5 - base,
                            "DGU@1": 0.1, "CV@1/pop": 0.2})
                f.write(json.dumps(row) + "\n")


def test_report_files_and_table(tmp_path):
    write_run(tmp_path / "bigrec-s0", "bigrec", [0.2])
    write_run(tmp_path / "bigrec-s1", "bigrec", [0.4])
    write_run(tmp_path / "sprec-s0", "sprec", [0.2, 0.25, 0.5])
    md = report([tmp_path / "bigrec-s0", tmp_path / "bigrec-s1", tmp_path / "sprec-s0"],
                tmp_path / "report")
    text = md.read_text()
    assert "| BIGRec (n=2) | 0.3000 ± 0.1414" in text      # sample std (ddof=1) of 0.2, 0.4
    # SPRec's final 0.5 wins the higher-is-better columns, BIGRec's 0.3 the lower-is-better.
    sprec_row = next(line for line in text.splitlines() if line.startswith("| SPRec "))
    assert sprec_row.count("**") == 2 * 5     # DivRatio@1/@5, HR@5, NDCG@5, HR@20
    for png in ("metrics_per_iteration.png", "gu_by_genre.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_terminal_shows_every_table_once_and_names_the_plots(tmp_path):
    write_run(tmp_path / "bigrec-s0", "bigrec", [0.2])
    write_run(tmp_path / "bigrec-s1", "bigrec", [0.4])
    write_run(tmp_path / "sprec-s0", "sprec", [0.2, 0.25, 0.5])
    text = report([tmp_path / "bigrec-s0", tmp_path / "bigrec-s1", tmp_path / "sprec-s0"],
                  tmp_path / "report").read_text()
    shown = for_terminal(text)
    legend = "↑ higher is better"
    assert text.count(legend) == 2 and shown.count(legend) == 1        # under test and valid
    assert "± is the sample standard deviation" in shown               # BIGRec has n=2
    for part in ("## Comparison (test split", "## Comparison (valid split", "| BIGRec (n=2) |"):
        assert shown.count(part) == text.count(part) >= 1, part
    assert "![" not in shown and "## Metrics per self-play iteration" not in shown
    assert shown.endswith("Plots beside report.md: metrics_per_iteration.png, gu_by_genre.png")
    assert "\n\n\n" not in shown


def test_the_legend_speaks_of_standard_deviations_only_when_a_cell_has_one(tmp_path):
    write_run(tmp_path / "bigrec", "bigrec", [0.2])
    write_run(tmp_path / "sprec", "sprec", [0.2, 0.5])
    text = report([tmp_path / "bigrec", tmp_path / "sprec"], tmp_path / "report").read_text()
    assert "±" not in text


def test_runs_of_one_method_are_averaged_only_when_they_differ_in_seeds_alone(tmp_path):
    """Two BIGRec runs with other learning rates are two rows named by run, with the key
    named; two that differ only in train.seed are one row of n = 2."""
    from recray.config import load_config
    from recray.rundir import RunDir

    def run(name, overrides, value):
        cfg = load_config(None, ["loop.method=bigrec", *overrides])
        RunDir.create(tmp_path / name, cfg.model_dump(mode="json"), {}).release()
        (tmp_path / name).rename(tmp_path / f"{name}.tmp")
        write_run(tmp_path / name, "bigrec", [value])
        (tmp_path / f"{name}.tmp" / "manifest.json").rename(tmp_path / name / "manifest.json")
        return tmp_path / name

    probes = [run("lr3e-4", [], 0.2), run("lr1e-3", ["train.sft.learning_rate=1e-3"], 0.4)]
    text = report(probes, tmp_path / "probes").read_text()
    assert "| BIGRec (lr3e-4) | 0.2000" in text and "| BIGRec (lr1e-3) | **0.4000**" in text
    assert "BIGRec: the runs differ in train.sft.learning_rate, so each setting" in text
    assert "n=2" not in text
    seeds = [run("s0", [], 0.2), run("s1", ["train.seed=1"], 0.4)]
    text = report(seeds, tmp_path / "seeds").read_text()
    assert "| BIGRec (n=2) | 0.3000 ± 0.1414" in text and "differ in" not in text


def test_single_method_has_no_bold():
    rows = {"sprec": [{c: 0.1 for c in TABLE_COLUMNS}]}
    assert "**" not in comparison_table(rows)


def test_not_a_run_is_refused(tmp_path):
    with pytest.raises(RecrayError, match="metrics.jsonl"):
        report([tmp_path], tmp_path / "out")


def test_one_run_can_hold_bigrec_and_sprec(tmp_path):
    run = tmp_path / "sprec"
    run.mkdir()
    rows = [{"method": "bigrec" if it == 0 else "sprec", "iteration": it, "split": "test",
             **{c: 0.1 * (it + 1) for c in TABLE_COLUMNS}} for it in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report([run], tmp_path / "out").read_text()
    assert "| BIGRec | 0.1000" in text and "| SPRec | **0.3000**" in text


def test_a_tie_for_best_bolds_nothing():
    rows = {"a": [{c: 0.1 for c in TABLE_COLUMNS}], "b": [{c: 0.1 for c in TABLE_COLUMNS}]}
    assert "**" not in comparison_table(rows)


def write_evaluated_run(path, method, ranks, split="test"):
    """A run as the loop writes it: metrics.jsonl plus the predictions of iteration 0."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recray.evaluate.metrics import hit_ratio
    result = path / "it0" / "eval" / split / "result"
    result.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(len(ranks))],
                             "target_rank": pa.array(ranks, pa.int64())}),
                   result / "predictions.parquet")
    row = {"method": method, "iteration": 0, "split": split,
           **{c: 0.1 for c in TABLE_COLUMNS}, "HR@5": hit_ratio(np.array(ranks), 5),
           "HR@20": hit_ratio(np.array(ranks), 20)}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")


def test_differences_to_bigrec_carry_paired_intervals_and_mostpop_verdicts(tmp_path):
    n = 200
    bigrec = [1000] * n                     # never a hit
    better = [0] * 40 + [1000] * (n - 40)   # 40 hits more than BIGRec: HR@5 +0.2
    same = list(bigrec)
    write_evaluated_run(tmp_path / "b", "bigrec", bigrec)
    write_evaluated_run(tmp_path / "m", "mostpop", better)
    write_evaluated_run(tmp_path / "s", "sprec", same)
    text = report([tmp_path / "b", tmp_path / "m", tmp_path / "s"], tmp_path / "out").read_text()
    mostpop = next(line for line in text.splitlines() if line.startswith("| MostPop (train-split targets) (m)"))
    diff, interval = mostpop.split(" | ")[2].split(" [")
    low, high = (float(x) for x in interval.rstrip("]").split(", "))
    assert float(diff) == pytest.approx(0.2) and 0.1 < low < 0.2 < high < 0.3
    sprec = next(line for line in text.splitlines() if line.startswith("| SPRec (s)"))
    assert "+0.0000 [+0.0000, +0.0000]" in sprec
    assert "SPRec does not beat MostPop" in text and "BIGRec does not beat MostPop" in text
    to_mostpop = report([tmp_path / "b", tmp_path / "m"], tmp_path / "out2", baseline="mostpop").read_text()
    bigrec = next(line for line in to_mostpop.splitlines() if line.startswith("| BIGRec (b)"))
    assert "Differences to MostPop" in to_mostpop and bigrec.split(" | ")[2].startswith("-0.2000")


def test_differences_reach_bigrec_inside_a_sprec_run(tmp_path):
    """The main job's shape: BIGRec is iteration 0 of the SPRec run, not a run of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    run = tmp_path / "sprec"
    rows = []
    for it, (method, ranks) in enumerate((("bigrec", [1000] * 100), ("sprec", [0] * 10 + [1000] * 90))):
        result = run / f"it{it}" / "eval" / "test" / "result"
        result.mkdir(parents=True)
        pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(100)],
                                 "target_rank": pa.array(ranks, pa.int64())}), result / "predictions.parquet")
        rows.append({"method": method, "iteration": it, "split": "test", **{c: 0.1 for c in TABLE_COLUMNS}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report([run], tmp_path / "out").read_text()
    assert "| BIGRec | " in text and "| SPRec | " in text
    assert next(line for line in text.splitlines() if line.startswith("| SPRec (sprec)")).split(" | ")[2].startswith("+0.1000")


def test_each_seed_is_paired_with_its_own_pi0(tmp_path):
    """The reproduction's shape: π_0 runs per seed, SPRec runs started from them
    (loop.init_from, their iteration 0 copied); SPRec seed s is measured against BIGRec seed
    s, not against whichever BIGRec comes first, and an ablation against the π_0 it started from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(run, rows_ranks, reused_from=None):
        rows = []
        for it, (method, ranks) in enumerate(rows_ranks):
            if ranks is None:       # iteration 0 copied from another run: no predictions here
                rows.append({"method": method, "iteration": it, "split": "test",
                             "reused_from": str(reused_from), **{c: 0.1 for c in TABLE_COLUMNS}})
                continue
            result = run / f"it{it}" / "eval" / "test" / "result"
            result.mkdir(parents=True)
            pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(100)],
                                     "target_rank": pa.array(ranks, pa.int64())}),
                           result / "predictions.parquet")
            rows.append({"method": method, "iteration": it, "split": "test",
                         **{c: 0.1 for c in TABLE_COLUMNS}})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    hits = lambda n: [0] * n + [1000] * (100 - n)   # noqa: E731 (n hits in the top 5 of 100)
    write(tmp_path / "bigrec-s0", [("bigrec", hits(0))])
    write(tmp_path / "bigrec-s1", [("bigrec", hits(20))])
    write(tmp_path / "sprec-s0", [("bigrec", None), ("sprec", hits(10))], tmp_path / "bigrec-s0")
    write(tmp_path / "sprec-s1", [("bigrec", None), ("sprec", hits(30))], tmp_path / "bigrec-s1")
    text = report([tmp_path / d for d in ("bigrec-s0", "bigrec-s1", "sprec-s0", "sprec-s1")],
                  tmp_path / "out").read_text()
    cells = {line.split(" | ")[0]: line.split(" | ")[1:3] for line in text.splitlines()
             if line.startswith("| BIGRec (") or line.startswith("| SPRec (")}
    assert cells["| SPRec (sprec-s0)"][0] == "bigrec-s0" and cells["| SPRec (sprec-s0)"][1].startswith("+0.1000")
    assert cells["| SPRec (sprec-s1)"][0] == "bigrec-s1" and cells["| SPRec (sprec-s1)"][1].startswith("+0.1000")
    assert cells["| BIGRec (bigrec-s1)"] == ["bigrec-s0", cells["| BIGRec (bigrec-s1)"][1]]
    assert cells["| BIGRec (bigrec-s1)"][1].startswith("+0.2000")
    assert "| BIGRec (n=2) |" in text and "| SPRec (n=2) |" in text


def test_a_reranked_model_is_its_own_row(tmp_path):
    """evaluate.rerank on top of BIGRec is another model than BIGRec: its own labelled row,
    and never the baseline of the differences, whichever run comes first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    plain, reranked = tmp_path / "bigrec", tmp_path / "bigrec-rerank"
    for path, extra, ranks in ((plain, {}, [1, 50]), (reranked, {"rerank": {"lambda": 0.1, "k": 5}}, [3, 2])):
        result = path / "it0" / "eval" / "test" / "result"
        result.mkdir(parents=True)
        pq.write_table(pa.table({"sample_id": ["a", "b"], "target_rank": ranks}),
                       result / "predictions.parquet")
        row = {"method": "bigrec", "iteration": 0, "split": "test",
               **{c: 0.1 for c in TABLE_COLUMNS}, **extra}
        (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    text = report([reranked, plain], tmp_path / "out").read_text()
    assert "| BIGRec | 0.1000" in text and "| BIGRec + IFairLRS re-ranking | 0.1000" in text
    # against BIGRec: target ranks 1, 50 -> 3, 2, so HR@5 0.5 -> 1.0
    assert "| BIGRec + IFairLRS re-ranking (bigrec-rerank) | bigrec | +0.5000" in text


def test_a_run_whose_every_step_was_reverted_reports_the_policy_it_kept(tmp_path):
    """UFO-like from another run's π_0 with both steps reverted: its model is that π_0,
    shown as the run's own row (not left out, not a crash); one kept step is that step."""
    def rows(reverted):
        out = [{"method": "bigrec", "iteration": 0, "split": "test", "reused_from": "/x",
                **{c: 0.1 for c in TABLE_COLUMNS}}]
        for t, flag in enumerate(reverted, start=1):
            out.append({"method": "ufo", "iteration": t, "split": "test", "reverted": flag,
                        **{c: 0.1 * (t + 1) for c in TABLE_COLUMNS}})
        return out
    for name, reverted, expected in (("all", [True, True], "0.1000"),
                                     ("first", [False, True], "0.2000")):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(reverted)))
        text = report([run], tmp_path / f"out-{name}").read_text()
        assert f"| UFO-like | {expected}" in text and "| BIGRec |" not in text
