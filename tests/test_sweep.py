"""Sweeps: the sweep YAML is checked before any trial starts, the constrained objective, the
Pareto fronts, the sweep report, and a 2-trial sweep of the tiny model end to end."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from recray.config import Config, load_config
from recray.errors import ConfigError
from recray.evaluate.sweep_report import pareto_front, sweep_report
from recray.sweep import (MARKER, PENALTY, Objective, load_sweep, objective_value,
                          trial_result)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(body)
    return path


def sweep_root(tmp_path: Path, body: str):
    """A sweep directory as `recray sweep` starts it (sweep.json), without Tune state."""
    sweep, base = load_sweep(sweep_file(tmp_path, body))
    root = tmp_path / "s"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"format": MARKER, "sweep": sweep.model_dump(mode="json"),
                                                 "base": base.model_dump(mode="json")}))
    return root, base


@pytest.mark.parametrize("space, message", [
    ("{train.betta: {type: uniform, low: 0.1, high: 1}}", "space.train.betta: unknown run-config key"),
    ("{trainn.beta: {type: uniform, low: 0.1, high: 1}}", "space.trainn.beta: unknown run-config key"),
    ("{train.beta.x: {type: uniform, low: 0.1, high: 1}}", "space.train.beta.x: unknown run-config key"),
    ("{train.beta: {type: loguniform, low: 1, high: 0.01}}", "space.train.beta: empty range: low 1 >= high 0.01"),
    ("{loop.iterations: {type: randint, low: 3, high: 3}}", "space.loop.iterations: empty range"),
    ("{generate.n_negatives: {type: choice, values: []}}", "space.generate.n_negatives: empty values list"),
    ("{train.beta: {type: choice, values: [fast]}}", "space.train.beta: choice value 'fast'"),
    ("{loop.iterations: {type: uniform, low: 1, high: 5}}", "space.loop.iterations: uniform value"),
    ("{train.beta: {type: uniform, low: 0, high: 1}}", "space.train.beta: uniform value 0.0"),
    ("{train.beta: {type: uniform, low: abc, high: 1}}", "space.train.beta.low: Input should be a valid number"),
    ("{train.beta: 0.5}", "space.train.beta: Input should be a valid dictionary"),
    ("{train.beta: {type: gaussian, low: 0, high: 1}}", "space.train.beta.type: Input should be"),
    ("{loop.iterations: {type: randint, low: 1.5, high: 4}}", "space.loop.iterations: randint needs integer"),
    # Greedy decoding gives one candidate: N = 2 would stop each such trial at its first negatives.
    ("{generate.n_negatives: {type: randint, low: 1, high: 2}}",
     "space.generate.n_negatives: randint value 2 does not fit the run config: generate.n_negatives=2"),
])
def test_a_bad_space_is_refused_naming_the_key(tmp_path, space, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_file(tmp_path, f"space: {space}\n"))
    assert message in str(err.value)


@pytest.mark.parametrize("body, message", [
    ("objective: {metric: NDGC@5}", "objective.metric: unknown metric 'NDGC@5'"),
    ("objective: {constraints: [{metric: MGU@1}]}", "objective.constraints.0: a constraint needs max or min"),
    ("overrides: ['evaluate.splits=[test]']", "objective.split: the run config evaluates ['test'] only"),
    ("search: grid", "space.train.beta: search grid takes only type grid"),
    ("scheduler: asha\ngrace_period: 9\noverrides: [loop.iterations=2]", "grace_period: 9 exceeds"),
    ("num_sample: 3", "num_sample: unknown key"),
    ("overrides: [train.betta=1]", "train.betta: unknown key"),
])
def test_the_rest_of_the_sweep_is_checked_too(tmp_path, body, message):
    path = sweep_file(tmp_path, "space: {train.beta: {type: uniform, low: 0.1, high: 1}}\n" + body)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(path)


def test_the_cli_refuses_a_bad_sweep_before_any_trial(tmp_path):
    path = sweep_file(tmp_path, "space: {train.betta: {type: uniform, low: 0.1, high: 1}}\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "recray.cli", "sweep", "-c", str(path),
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "space.train.betta: unknown run-config key" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_the_shipped_sweeps_are_valid():
    sweep, base = load_sweep(ROOT / "tune" / "sweep-movielens.yaml")
    assert set(sweep.space) == {"train.beta", "loop.iterations", "generate.n_negatives",
                                "train.dpo.learning_rate"}
    assert base.data.history_len == 5 and "valid" in base.evaluate.splits   # configs/ml100k.yaml
    for path in sorted((ROOT / "tune").glob("sweep-*.yaml")):     # every key and value checked
        load_sweep(path)
    sweep, base = load_sweep(ROOT / "tune" / "sweep-repro.yaml")     # the earlier reproduction
    assert sweep.search == "grid" and base.data.n_train == 512


def test_a_trial_driver_may_hold_no_cpu():
    """The shipped sweeps give the driver 0 CPUs (its workers take them all on 2 cores):
    Tune must still accept the request, as run_sweep makes it (an empty one it refuses)."""
    from ray import tune
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from recray.sweep import TrialResources
    request = TrialResources(cpu=0).request()
    tune.with_resources(lambda config: None, request)
    assert resource_dict_to_pg_factory(request).bundles == [{"memory": 2**29}]


def test_the_constrained_objective():
    plain = Objective(metric="NDCG@5", mode="max")
    assert objective_value({"NDCG@5": 0.3, "MGU@1": 0.9}, plain) == (0.3, True)
    capped = Objective(metric="NDCG@5", mode="max", constraints=[{"metric": "MGU@1", "max": 0.1}])
    assert objective_value({"NDCG@5": 0.3, "MGU@1": 0.1}, capped) == (0.3, True)   # bound included
    near, feasible = objective_value({"NDCG@5": 0.9, "MGU@1": 0.15}, capped)
    far, _ = objective_value({"NDCG@5": 0.9, "MGU@1": 0.5}, capped)
    assert not feasible and math.isfinite(far) and far < near < 0 < 0.3    # worse than feasible
    assert near == pytest.approx(-(PENALTY + 0.05))                        # graded by the excess
    low = Objective(metric="MGU@1", mode="min", constraints=[{"metric": "HR@5", "min": 0.2}])
    score, feasible = objective_value({"MGU@1": 0.01, "HR@5": 0.1}, low)
    assert not feasible and score == pytest.approx(PENALTY + 0.1)
    result = trial_result(2, {"valid": {"NDCG@5": 0.3, "MGU@1": 0.5}, "test": {"NDCG@5": 0.2}}, capped)
    assert result["iteration"] == 2 and result["NDCG@5"] == 0.3 and result["test/NDCG@5"] == 0.2
    assert result["objective"] < -PENALTY and result["feasible"] is False


def test_pareto_front():
    # (NDCG@5 up, MGU@1 down)
    points = [(0.5, 0.3), (0.4, 0.1), (0.3, 0.2), (0.5, 0.4), (0.2, 0.05), (0.4, 0.1)]
    assert pareto_front(points, ("max", "min")) == [True, True, False, False, True, True]
    assert pareto_front([(1.0, 1.0), (2.0, 0.5)], ("max", "max")) == [True, True]
    assert pareto_front([(1.0, 1.0), (2.0, 2.0)], ("max", "max")) == [False, True]


def test_sweep_report_from_trial_run_directories(tmp_path, monkeypatch):
    """Without Tune state (statuses UNKNOWN): a trial stopped after iteration 1 of 2 is best,
    so best.yaml asks for the run that measured it, loop.iterations = 1."""
    from recray.rundir import RunDir
    root, base = sweep_root(tmp_path, (
        "overrides: [loop.iterations=2]\n"
        "space: {train.beta: {type: loguniform, low: 0.01, high: 1}}\n"
        "objective: {constraints: [{metric: MGU@1, max: 0.2}]}\n"))
    finals = {"a": (0.05, 1, 0.4, 0.1), "b": (0.5, 2, 0.3, 0.1), "c": (0.9, 2, 0.5, 0.6)}
    for name, (beta, last, ndcg, mgu) in finals.items():
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"beta": beta})})
        run = RunDir.create(root / "trials" / name, cfg.model_dump(mode="json"), {})
        rows = [{"method": "sprec", "iteration": t, "split": "valid", "NDCG@5": ndcg * t / last,
                 "MGU@1": mgu, "DivRatio@1": 0.1 + beta, "HR@5": ndcg} for t in range(last + 1)]
        (run.root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    path = sweep_report(root, root / "report")
    rows = list(csv.DictReader((root / "report" / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == ["a", "b", "c"]
    assert [r["feasible"] for r in rows] == ["True", "True", "False"]
    assert rows[2]["pareto NDCG@5 vs MGU@1"] == "True"          # best NDCG, worst MGU
    text = path.read_text()
    assert "a: NDCG@5 0.4000 at iteration 1" in text and "MGU@1 ≤ 0.2" in text
    best = load_config(root / "report" / "best.yaml")
    assert best.train.beta == 0.05 and best.loop.iterations == 1
    for png in ("pareto.png", "params.png"):
        assert (root / "report" / png).read_bytes()[:8] == PNG
    assert "tie at the best objective" not in text
    rows = [{"method": "sprec", "iteration": t, "split": "valid", "NDCG@5": 0.2 * t,
             "MGU@1": 0.1, "DivRatio@1": 0.6, "HR@5": 0.4} for t in range(3)]
    (root / "trials" / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)                      # a relative sweep path reads the same
    text = sweep_report(Path("s"), Path("s/report-tied")).read_text()   # b ties a, more iterations
    assert "b: NDCG@5 0.4000 at iteration 2" in text
    assert "**2 trials tie at the best objective** (b, a)" in text


def test_a_trial_whose_verdicts_reverted_its_steps_is_scored_by_the_model_it_kept(tmp_path):
    """UFO-like: iterations 1 and 2 reverted, so the trial's model and objective are π_0's,
    and best.yaml still asks for the whole run (T = 2), which returns that model."""
    from recray.rundir import RunDir
    root, base = sweep_root(tmp_path, (
        "overrides: [loop.method=ufo, loop.iterations=2]\n"
        "space: {ufo.eta: {type: grid, values: [0.5, 2]}}\n"
        "objective: {metric: DivRatio@1, mode: max, constraints: [{metric: MGU@1, max: 0.2}]}\n"))
    for name, eta, kept in (("a", 0.5, 0), ("b", 2.0, 1)):
        cfg = base.model_copy(update={"ufo": base.ufo.model_copy(update={"eta": eta})})
        run = RunDir.create(root / "trials" / name, cfg.model_dump(mode="json"), {})
        rows = [{"method": "ufo" if t else "bigrec", "iteration": t, "split": "valid",
                 "DivRatio@1": 0.3 + 0.2 * t, "MGU@1": 0.1 + 0.1 * t, "HR@5": 0.1, "NDCG@5": 0.1,
                 **({"reverted": True} if t > kept else {})} for t in range(3)]
        (run.root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = sweep_report(root, root / "report").read_text()
    # a's iterations 1 and 2 (MGU 0.2, 0.3 ✗) are reverted: its model is π_0's (DivRatio 0.3)
    assert "b: DivRatio@1 0.5000 at iteration 2 (kept 1)" in text
    assert "| a | UNKNOWN | 0.5 | 2 (kept 0) | 0.3 | 0.3 |" in text
    assert load_config(root / "report" / "best.yaml").loop.iterations == 2


def test_trials_that_cannot_run_side_by_side_are_refused(ray_session, tmp_path, monkeypatch):
    """2 CPUs, a trial needs 2 (driver 1 + 1 training worker): two at once would wait forever."""
    from recray.sweep import check_concurrency
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep, base = load_sweep(ROOT / "tune" / "sweep-tiny.yaml", ["train.scaling.num_workers=1"])
    check_concurrency(sweep, base)                                   # max_concurrent_trials: 1
    with pytest.raises(ConfigError, match="max_concurrent_trials: 2 trials at once need 4 CPUs"):
        check_concurrency(sweep.model_copy(update={"max_concurrent_trials": None}), base)


def test_two_trial_sweep_end_to_end(tiny_pi0, tmp_path):
    """tune/sweep-tiny.yaml on the tiny model: 2 trials of 1 iteration, one at a time."""
    from recray.cli import main
    from recray.sweep import run_sweep
    sweep, base = load_sweep(ROOT / "tune" / "sweep-tiny.yaml", tiny_pi0)
    root = tmp_path / "sweep"
    report = run_sweep(sweep, base, root)

    rows = list(csv.DictReader((root / "report" / "trials.csv").open()))
    assert len(rows) == 2, rows
    for row in rows:
        assert row["status"] == "TERMINATED" and row["iteration"] == "1", row
        run = root / "trials" / row["trial_id"]
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["config"]["train"]["beta"] == pytest.approx(float(row["train.beta"]))
        assert (run / "metrics.jsonl").exists()                     # `recray report` works on it
    assert (root / "prepared" / "catalog.parquet").exists()         # prepared once for both
    assert report == root / "report" / "report.md" and "## Best trial" in report.read_text()
    for png in ("pareto.png", "params.png"):
        assert (root / "report" / png).read_bytes()[:8] == PNG
    best = load_config(root / "report" / "best.yaml")
    assert isinstance(best, Config) and best.loop.base_model == base.loop.base_model
    assert any(best.train.beta == pytest.approx(float(r["train.beta"])) for r in rows)

    (root / "report" / "trials.csv").unlink()
    assert main(["report", str(root)]) == 0                         # the CLI knows a sweep dir
    assert (root / "report" / "trials.csv").exists()


def test_trial_configs_keep_each_methods_own_defaults():
    """A trial's config is rebuilt from the base's given settings (sweep.json, best.yaml,
    loop.init_from do the same): D3's sweep decodes with 4 beams at each α, a DMPO base keeps
    k = 3. Rebuilt from a whole dump, every key would count as given: greedy, N = 1."""
    from recray.config import build_config, given_tree, load_config
    from recray.methods import method_config
    from recray.sweep import load_sweep
    _, d3 = load_sweep(ROOT / "tune" / "sweep-d3.yaml")
    for alpha in (0.1, 0.5):
        decoding = method_config(build_config(given_tree(d3), [
            ("evaluate.decoding.prior_weight", alpha)])).evaluate.decoding
        assert (decoding.mode, decoding.num_beams, decoding.prior_weight) == ("beam", 4, alpha)
    assert method_config(build_config(d3.model_dump(mode="json"))).evaluate.decoding.mode == "greedy"
    dmpo = load_config(ROOT / "configs" / "ml100k.yaml", ["loop.method=dmpo"])
    trial = build_config(given_tree(dmpo), [("train.beta", 0.2)])
    assert method_config(trial).generate.n_negatives == 3 and trial.train.beta == 0.2
    assert method_config(build_config(dmpo.model_dump(mode="json"))).generate.n_negatives == 1
