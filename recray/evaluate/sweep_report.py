"""`recray report SWEEP_DIR`: what a sweep (recray/sweep.py) found, in SWEEP_DIR/report/.

    trials.csv    one row per trial: status, parameters, last iteration, objective, metrics
    report.md     the best trial, every trial ranked, the Pareto fronts, each parameter's effect
    pareto.png    NDCG@5 against MGU@1 and against DivRatio@1, non-dominated trials marked
    params.png    the objective's metric against each parameter
    best.yaml     the best trial's whole run config: `recray run -c best.yaml` runs it again

Metrics come from the trials' run directories (metrics.jsonl, the objective's split, the
last evaluated iteration); statuses and parameters from Ray Tune's experiment state.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from recray.config import build_config, given_tree, pick
from recray.evaluate.report import TABLE_COLUMNS, kept_rows, load_rows
from recray.methods import planned_iterations
from recray.sweep import PENALTY, objective_value, read_sweep

# Accuracy against fairness (MGU, lower is better) and against diversity (DivRatio, higher).
PARETO = ((("NDCG@5", "max"), ("MGU@1", "min")), (("NDCG@5", "max"), ("DivRatio@1", "max")))


def pareto_front(points: list[tuple[float, ...]], senses: tuple[str, ...]) -> list[bool]:
    """For each point, whether it is non-dominated: no other point is at least as good on
    every axis and better on one (`senses`: "max" or "min" per axis)."""
    signed = [tuple(v if s == "max" else -v for v, s in zip(p, senses)) for p in points]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and a != b
    return [not any(dominates(other, p) for other in signed) for p in signed]


def _tune_trials(root: Path) -> dict[str, tuple[str, dict]]:
    """{trial_id: (status, params)} from Tune's experiment state; {} if it has none yet."""
    from ray import tune
    root = Path(root).resolve()     # Tune reads a relative path as a URI and fails
    if not tune.Tuner.can_restore(str(root)):
        return {}
    return {t.trial_id: (t.status, dict(t.config))
            for t in tune.ExperimentAnalysis(str(root)).trials}


def load_trials(root: Path) -> list[dict]:
    """One dict per trial: trial_id, status, params, iteration, objective, feasible, metrics."""
    sweep, base = read_sweep(root)
    tune_trials = _tune_trials(root)
    run_dirs = {p.name: p for p in sorted((root / "trials").glob("*")) if p.is_dir()}
    trials = []
    for trial_id in sorted(set(tune_trials) | set(run_dirs)):
        status, params = tune_trials.get(trial_id, ("UNKNOWN", {}))
        run = root / "trials" / trial_id
        if (run / "manifest.json").exists():        # the values as the run used them
            ran = json.loads((run / "manifest.json").read_text())["config"]
            params = {key: pick(ran, key) for key in sweep.space}
        rows = load_rows(run) if (run / "metrics.jsonl").exists() else []
        rows = [r for r in rows if r["split"] == sweep.objective.split]
        trial = {"trial_id": trial_id, "status": status, "params": params, "run_dir": run,
                 "iteration": None, "objective": None, "feasible": None, "metrics": {}}
        if rows:
            model = kept_rows(rows, sweep.objective.split)[0]
            reached = max(r["iteration"] for r in rows)
            trial["iteration"], trial["metrics"] = reached, model
            trial["kept_iteration"] = model["iteration"]
            trial["objective"], trial["feasible"] = objective_value(model, sweep.objective)
            config = build_config(given_tree(base), params.items())
            if status == "TERMINATED" and reached < planned_iterations(config):
                trial["status"] = "STOPPED"          # by ASHA, after a rung
        trials.append(trial)
    return trials


def ranked(trials: list[dict], mode: str) -> list[dict]:
    """Best first: trials that did not fail, by objective, then by more iterations run
    (ties are common on small validation splits); then failed ones; unscored ones last."""
    sign = -1 if mode == "max" else 1
    return sorted(trials, key=lambda t: (t["objective"] is None, t["status"] == "ERROR",
                                         sign * (t["objective"] or 0.0), -(t["iteration"] or 0)))


def write_best_config(trial: dict, path: Path, objective_text: str) -> None:
    """The trial's run config as it ran (its manifest). A trial stopped after iteration k
    measured the model of the same run with loop.iterations = k (an iteration's samples and
    seeds do not depend on T), so that is what best.yaml asks for."""
    manifest = json.loads((trial["run_dir"] / "manifest.json").read_text())
    config = manifest.get("config_given", manifest["config"])
    if trial["iteration"] < planned_iterations(build_config(config)):
        config.setdefault("loop", {})["iterations"] = trial["iteration"]
    header = (f"# The best trial ({trial['trial_id']}) of sweep {trial['run_dir'].parent.parent}:\n"
              f"# {objective_text} = {trial['objective']:.4f} at iteration {trial['iteration']}.\n"
              f"# Run it again with: recray run -c {path}\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def _iteration(trial: dict) -> str:
    """The last iteration a trial ran, and the one whose model it kept where that is earlier."""
    kept = trial.get("kept_iteration", trial["iteration"])
    return _fmt(trial["iteration"]) + (f" (kept {kept})" if kept != trial["iteration"] else "")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(trials: list[dict], keys: list[str], metrics: list[str], fronts: dict, path: Path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "status", *keys, "iteration", "objective", "feasible",
                         *metrics, *(f"pareto {name}" for name in fronts), "run_dir"])
        for t in trials:
            writer.writerow([t["trial_id"], t["status"], *(t["params"].get(k) for k in keys),
                             t["iteration"], t["objective"], t["feasible"],
                             *(t["metrics"].get(m) for m in metrics),
                             *(front.get(t["trial_id"]) for front in fronts.values()),
                             t["run_dir"]])


def plot_pareto(trials: list[dict], path: Path) -> dict[str, dict[str, bool]]:
    """Both fronts in one figure; returns {"NDCG@5 vs MGU@1": {trial_id: on the front}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fronts = {}
    fig, axes = plt.subplots(1, len(PARETO), figsize=(6 * len(PARETO), 4.5))
    for ax, ((y, y_sense), (x, x_sense)) in zip(axes, PARETO):
        scored = [t for t in trials if x in t["metrics"] and y in t["metrics"]]
        points = [(t["metrics"][y], t["metrics"][x]) for t in scored]
        on_front = pareto_front(points, (y_sense, x_sense))
        fronts[f"{y} vs {x}"] = {t["trial_id"]: f for t, f in zip(scored, on_front)}
        for (py, px), t, front in zip(points, scored, on_front):
            ax.scatter(px, py, s=60 if front else 30, c="tab:red" if front else "tab:gray",
                       marker="o" if t["feasible"] else "x", zorder=3)
            ax.annotate(t["trial_id"].rsplit("_", 1)[-1], (px, py), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        line = sorted((px, py) for (py, px), front in zip(points, on_front) if front)
        if len(line) > 1:
            ax.plot(*zip(*line), color="tab:red", alpha=0.5, zorder=2)
        ax.set_xlabel(f"{x} ({'↓' if x_sense == 'min' else '↑'} better)")
        ax.set_ylabel(f"{y} (↑ better)")
        ax.set_title(f"{y} vs {x}: red = non-dominated")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against fairness and diversity, one point per trial "
                 "(x: breaks a constraint)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fronts


def plot_params(trials: list[dict], sweep, path: Path) -> None:
    """The objective's metric (not the penalised score) against each parameter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric, keys = sweep.objective.metric, list(sweep.space)
    scored = [t for t in trials if metric in t["metrics"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 4 * len(keys)), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [t["params"].get(key) for t in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        xs = values if numeric else [categories.index(str(v)) for v in values]
        for x, t in zip(xs, scored):
            ax.scatter(x, t["metrics"][metric], c="tab:blue" if t["feasible"] else "tab:red",
                       marker="o" if t["feasible"] else "x")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        elif sweep.space[key].type == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} ({sweep.objective.split} split) per parameter\n"
                 f"red x: breaks a constraint", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_report(root: Path, output: Path) -> Path:
    root, output = Path(root), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sweep, _ = read_sweep(root)
    obj = sweep.objective
    trials = load_trials(root)
    keys = list(sweep.space)
    metrics = list(dict.fromkeys([obj.metric, *(c.metric for c in obj.constraints), *TABLE_COLUMNS]))
    fronts = plot_pareto(trials, output / "pareto.png")
    plot_params(trials, sweep, output / "params.png")
    write_csv(trials, keys, metrics, fronts, output / "trials.csv")

    bounds = [f"{c.metric} ≥ {c.min:g}" for c in obj.constraints if c.min is not None]
    bounds += [f"{c.metric} ≤ {c.max:g}" for c in obj.constraints if c.max is not None]
    objective_text = f"{obj.mode} {obj.metric} on the {obj.split} split"
    if bounds:
        objective_text += " subject to " + ", ".join(bounds)
    counts = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    lines = ["# recray sweep report", "",
             f"Sweep: {root} · search {sweep.search} · scheduler {sweep.scheduler} · "
             f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})",
             "", f"Objective: {objective_text}."]
    if bounds:
        lines.append(f"A trial that breaks a constraint scores {'−' if obj.mode == 'max' else '+'}"
                     f"({PENALTY:g} + violation): worse than any trial that keeps them.")
    lines += ["", "## Best trial", ""]
    trials = ranked(trials, obj.mode)
    best = trials[0] if trials and trials[0]["objective"] is not None else None
    if best is None:
        lines += ["No trial has evaluated its first iteration yet.", ""]
    else:
        write_best_config(best, output / "best.yaml", objective_text)
        if not best["feasible"]:
            lines += ["**No trial keeps the constraints**: this is the one closest to them.", ""]
        tied = [t["trial_id"] for t in trials if t["objective"] == best["objective"]]
        if len(tied) > 1:
            lines += [f"**{len(tied)} trials tie at the best objective** ({', '.join(tied)}): "
                      "the objective does not choose between them; the one named is the first "
                      "by iterations run, then in trial order.", ""]
        lines += [f"{best['trial_id']}: {obj.metric} {best['metrics'][obj.metric]:.4f} at iteration "
                  f"{_iteration(best)} ({best['status']}), with "
                  + ", ".join(f"{k} = {_fmt(best['params'].get(k))}" for k in keys) + ".", "",
                  f"Its whole run config: `best.yaml`; run it again with "
                  f"`recray run -c {output / 'best.yaml'}`. Its run directory: {best['run_dir']}.", ""]

    shown = [obj.metric, *[m for m in ("HR@5", "NDCG@5", "MGU@1", "DivRatio@1", "ORRatio@1")
                           if m != obj.metric]]
    front_names = list(fronts)
    lines += ["## Trials, best first", "",
              "| trial | status | " + " | ".join(keys) + " | iteration | objective | "
              + " | ".join(shown) + " | Pareto |",
              "|---|---|" + "---|" * (len(keys) + 3 + len(shown))]
    for t in trials:
        marks = "".join("●" if fronts[n].get(t["trial_id"]) else "·" for n in front_names)
        lines.append(f"| {t['trial_id']} | {t['status']} | "
                     + " | ".join(_fmt(t["params"].get(k)) for k in keys)
                     + f" | {_iteration(t)} | {_fmt(t['objective'])}"
                     + ("" if t["feasible"] is not False else " ✗") + " | "
                     + " | ".join(_fmt(t["metrics"].get(m)) for m in shown) + f" | {marks} |")
    lines += ["", f"✗: breaks a constraint. Pareto: ● on the front of "
              f"{' / '.join(front_names)} (in that order). STOPPED: ended early by ASHA; its "
              f"metrics are those of its last iteration. \"kept k\": the run's verdicts "
              f"(UFO-like) reverted the later steps, so its model, and its metrics, are "
              f"iteration k's.", "",
              "## Accuracy against fairness and diversity", "", "![Pareto fronts](pareto.png)", ""]
    for name, front in fronts.items():
        ids = [i for i, f in front.items() if f]
        lines.append(f"- non-dominated on {name}: {', '.join(ids) or 'none'}")
    lines += ["", "## Each parameter's effect", "", "![parameter effects](params.png)", "",
              "All trials with every metric: `trials.csv`. A trial's own report: "
              "`recray report <sweep>/trials/<trial_id> --output DIR`.", ""]
    (output / "report.md").write_text("\n".join(lines))
    return output / "report.md"
