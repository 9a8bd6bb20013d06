"""`recray report RUN_DIR ...`: a Markdown report with PNG plots comparing runs.

A run directory holds `metrics.jsonl`, one JSON object per (iteration, split) with the
keys `method`, `iteration`, `split` and the metrics of `metrics.json`. One run may hold
several methods: a SPRec run's iteration 0 is π_0, i.e. BIGRec (unless copied from another
run by `loop.init_from`: then it shows in the curves but counts once). A bare evaluation
directory (just `metrics.json`) also works: it counts as iteration 0 of a method named
after the directory. Runs of the same method that differ only in their seeds are averaged,
mean ± sample std (n shown); runs of one method with other settings (a probe of π_0's
learning rate, say) are rows of their own, named by run, with the keys they differ in.

Beside the means, each run's last evaluation is compared with BIGRec's on the same
samples: the paired bootstrap 95% interval of the difference in HR@K and NDCG@K, read
from the stored predictions (on 200 samples one hit moves HR by 0.005, so a difference
without its interval says little). Every LLM row is also read against MostPop.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from recray.config import EVALUATION_KEYS, INITIAL_POLICY_KEYS, LOOP_STEP_KEYS, flatten, pick
from recray.errors import RecrayError
from recray.evaluate.metrics import paired_bootstrap

TABLE_COLUMNS = ("DivRatio@1", "DivRatio@5", "ORRatio@1", "ORRatio@5", "MGU@1", "MGU@5",
                 "HR@5", "NDCG@5", "HR@20")
# BiFair's table (seed 003), for rows of its general-recommendation protocol: several
# targets per user, so no sample-paired differences and no per-iteration curves.
GENERAL_COLUMNS = ("Recall@20", "NDCG@20", "HR@20", "CV@20/pop", "MIN@20/pop", "CV@20/genre",
                   "MIN@20/genre")
LOWER_IS_BETTER = ("ORRatio", "MGU", "DGU", "CV")
REFERENCE_ROWS = ("mostpop", "random", "sasrec", "mostpop-general", "alpharec", "alpharec-reweight", "bifair",
                  "bifair-separate", "bifair-noentropy", "bifair-eq11")   # no LLM (recray.conventional)
DIFFERENCES = ("HR@5", "HR@20", "NDCG@5")
CURVES = ("HR@5", "NDCG@5", "DivRatio@1", "ORRatio@1", "MGU@1")
METHOD_NAMES = {"bigrec": "BIGRec", "sprec": "SPRec", "sprec-nodpo": "SPRec-noDPO",
                "sprec-nosft": "SPRec-noSFT", "sprec-rn": "SPRec-RN", "dmpo": "DMPO",
                "sdpo": "SDPO", "rosepo": "RosePO", "rw": "RW", "gdrt": "GDRT", "ufo": "UFO-like", "d3": "D3",
                "mostpop": "MostPop (train-split targets)", "random": "Random", "sasrec": "SASRec",
                "mostpop-general": "MostPop (general train split)", "alpharec": "AlphaRec", "alpharec-reweight": "AlphaRec + Reweight",
                "bifair": "BiFair", "bifair-separate": "BiFair-Separate",
                "bifair-noentropy": "BiFair-noEntropy", "bifair-eq11": "BiFair-Eq11"}


def load_rows(run_dir: Path) -> list[dict]:
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if (run_dir / "metrics.json").exists():
        row = json.loads((run_dir / "metrics.json").read_text())
        # split: as metrics.json records it (recray evaluate writes it), else test
        return [{"method": run_dir.name, "iteration": 0, "split": "test", **row}]
    raise RecrayError(f"{run_dir} has neither metrics.jsonl (a run) nor metrics.json (an evaluation)")


def final_rows(rows: list[dict], split: str) -> list[dict]:
    """Each run's last iteration on `split`; rows a run copied from another (loop.init_from)
    are that other run's, so they count there only; a step UFO-like's verdict reverted is
    not the run's model."""
    return kept_rows([r for r in rows if "reused_from" not in r], split)


def row_name(row: dict, default: str) -> str:
    """The model a row is of: its method, and for BiFair's table the projector and the groups
    it was made fair over (the same method over other groups is another model)."""
    name = row.get("method", default)
    if row.get("projector") == "linear":
        name += " linear"
    if "rerank" in row:         # IFairLRS's re-ranking on top of the model (evaluate.rerank)
        name += " +rerank"
    return name + (f" [{row['groups_trained']}]" if "groups_trained" in row else "")


def _label(name: str) -> str:
    method, _, rest = name.partition(" ")
    label = METHOD_NAMES.get(method, method)
    if rest.startswith("linear"):
        label = label.replace("AlphaRec", "Linear") if "AlphaRec" in label else f"{label} (linear)"
        rest = rest[len("linear"):].strip()
    if rest.startswith("+rerank"):
        label, rest = f"{label} + IFairLRS re-ranking", rest[len("+rerank"):].strip()
    return f"{label} {rest}".strip()


def _better(metric: str) -> str:
    return "min" if metric.split("@")[0] in LOWER_IS_BETTER else "max"


def comparison_table(per_method: dict[str, list[dict]], columns=TABLE_COLUMNS) -> str:
    """Table-1 style: one row per method, mean ± sample std over its runs, a unique best in
    bold (a tie for best bolds nothing)."""
    means = {m: {c: float(np.mean([r[c] for r in rs])) for c in columns} for m, rs in per_method.items()}
    best = {c: (min if _better(c) == "min" else max)(means[m][c] for m in means) for c in columns}
    unique = {c: len(means) > 1 and sum(np.isclose(means[m][c], best[c]) for m in means) == 1
              for c in columns}
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method, runs in per_method.items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs]
            text = f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")
            cells.append(f"**{text}**" if unique[c] and np.isclose(means[method][c], best[c]) else text)
        runs_note = f" (n={len(runs)})" if len(runs) > 1 else ""
        lines.append(f"| {_label(method)}{runs_note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predictions_of(run_dir: Path, row: dict) -> Path:
    if (Path(run_dir) / "predictions.parquet").exists():       # a bare evaluation directory
        return Path(run_dir) / "predictions.parquet"
    return Path(run_dir) / f"it{row['iteration']}" / "eval" / row["split"] / "result" / "predictions.parquet"


def _ranks_by_sample(path: Path) -> dict[str, int]:
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=["sample_id", "target_rank"])
    return dict(zip(table.column("sample_id").to_pylist(), table.column("target_rank").to_pylist()))


def differences_table(finals: list[tuple[Path, dict]], baseline: str, starts: dict[Path, Path],
                      metrics=DIFFERENCES) -> str | None:
    """Each run's last evaluation minus the baseline method's on the same samples, with the paired
    bootstrap 95% interval; None when no baseline run has predictions. A run is paired with the
    baseline of its own π_0 (its own iteration 0, or that of the run it started from,
    `starts`: loop.init_from), so that seed s is measured against seed s's BIGRec; a run with
    neither, against the first baseline run. A row whose samples differ from its baseline's
    (another split subset) says so instead of being paired."""
    found = [(d, r) for d, r in finals
             if row_name(r, d.name) == baseline and predictions_of(d, r).exists()]
    if not found:
        return None
    first, bases = found[0], {d.resolve(): (d, r) for d, r in found}
    ranks_of = {key: _ranks_by_sample(predictions_of(*b)) for key, b in bases.items()}
    header = "| model (run) | against | " + " | ".join(f"Δ{m} [95% CI]" for m in metrics) + " |"
    lines = [header, "|---|---|" + "---|" * len(metrics)]
    for run_dir, row in finals:
        if (run_dir, row) == first or not predictions_of(run_dir, row).exists():
            continue
        own = run_dir.resolve()
        if own in bases and bases[own] != (run_dir, row):      # π_0 is this run's iteration 0
            key = own
        elif starts.get(own) in bases:                          # π_0 copied from that run
            key = starts[own]
        else:
            key = first[0].resolve()
        base_ranks = ranks_of[key]
        ranks = _ranks_by_sample(predictions_of(run_dir, row))
        label = f"{_label(row_name(row, Path(run_dir).name))} ({Path(run_dir).name})"
        against = bases[key][0].name
        if set(ranks) != set(base_ranks):
            lines.append(f"| {label} | {against} | " + " | ".join("other samples" for _ in metrics) + " |")
            continue
        ids = sorted(base_ranks)
        a, b = [base_ranks[i] for i in ids], [ranks[i] for i in ids]
        cells = []
        for metric in metrics:
            diff, low, high = paired_bootstrap(a, b, metric)
            cells.append(f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]")
        lines.append(f"| {label} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def start_runs(run_dirs: list[Path], runs: list[list[dict]]) -> dict[Path, Path]:
    """{run directory: the run its π_0 was copied from (loop.init_from)}, resolved paths."""
    return {Path(d).resolve(): Path(r["reused_from"]).resolve()
            for d, rows in zip(run_dirs, runs) for r in rows if "reused_from" in r}


def mostpop_verdicts(per_method: dict[str, list[dict]], ks=(5, 20)) -> list[str]:
    """One sentence per LLM method that does not beat MostPop on HR@K (spec §4)."""
    if "mostpop" not in per_method:
        return []
    ceiling = {k: np.mean([r[f"HR@{k}"] for r in per_method["mostpop"]]) for k in ks}
    out = []
    for method, runs in per_method.items():
        if method.split(" ")[0] in REFERENCE_ROWS:
            continue
        hr = {k: np.mean([r.get(f"HR@{k}", 0.0) for r in runs]) for k in ks}
        behind = [f"HR@{k} {hr[k]:.4f} ≤ {ceiling[k]:.4f}" for k in ks if hr[k] <= ceiling[k]]
        if behind:
            out.append(f"{_label(method)} does not beat MostPop ({'; '.join(behind)}): it has not "
                       f"learned to recommend beyond the popularity list.")
    return out


def plot_curves(runs: list[list[dict]], split: str, path: Path) -> None:
    """One line per method over iterations: each run's whole trajectory (its iteration 0,
    π_0, included) under the method of its last iteration; seeds give mean ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    by_label: dict[str, list[list[dict]]] = defaultdict(list)
    for rows in runs:
        on_split = [r for r in rows if r.get("split") == split]
        if on_split:
            by_label[max(on_split, key=lambda r: r["iteration"])["method"]].append(on_split)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
    for ax, metric in zip(axes, CURVES):
        for method, trajectories in by_label.items():
            per_iter = defaultdict(list)
            for rows in trajectories:
                for r in rows:
                    if metric in r:
                        per_iter[r["iteration"]].append(r[metric])
            its = sorted(per_iter)
            mean = [np.mean(per_iter[i]) for i in its]
            std = [np.std(per_iter[i]) for i in its]
            ax.errorbar(its, mean, yerr=std, marker="o", capsize=3, label=_label(method))
        ax.set_title(f"{metric} ({'↓' if _better(metric) == 'min' else '↑'})")
        ax.set_xlabel("self-play iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Metrics per iteration ({split} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gu(per_method: dict[str, list[dict]], path: Path, k: int = 1) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    prefix = f"GU@{k}/"
    groups = sorted({key[len(prefix):] for runs in per_method.values() for r in runs
                     for key in r if key.startswith(prefix)})
    if not groups:
        return []
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(per_method)) / 2), 3.8))
    width = 0.8 / len(per_method)
    x = np.arange(len(groups))
    for i, (method, runs) in enumerate(per_method.items()):
        values = [np.mean([r.get(prefix + g, 0.0) for r in runs]) for g in groups]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=_label(method))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(f"GU@{k} = share in top-{k} − share in history")
    ax.set_title(f"Group unfairness per genre at K={k} (0 = calibrated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return groups


def _finals(run_dirs: list[Path], runs: list[list[dict]], split: str) -> list[tuple[Path, dict]]:
    """(run directory, row) of each method's last iteration on `split` in each run (a SPRec
    run holds BIGRec at iteration 0 and SPRec at its last)."""
    out = []
    for run_dir, rows in zip(run_dirs, runs):
        for method in dict.fromkeys(r.get("method", Path(run_dir).name) for r in rows):
            mine = [r for r in rows if r.get("method", Path(run_dir).name) == method]
            finals = final_rows(mine, split)
            if not finals and any(r.get("reverted") for r in mine if r.get("split") == split):
                finals = kept_policy_rows(rows, split, method)
            out += [(Path(run_dir), r) for r in finals]
    return out


def kept_rows(rows: list[dict], split: str) -> list[dict]:
    """The rows on `split` of the model a run ends with: its last iteration that no verdict
    (UFO-like) reverted, rows copied from another run (loop.init_from) included."""
    kept = [r for r in rows if r.get("split") == split and not r.get("reverted")]
    last = max((r["iteration"] for r in kept), default=None)
    return [r for r in kept if r["iteration"] == last]


def kept_policy_rows(rows: list[dict], split: str, method: str) -> list[dict]:
    """A run whose verdicts reverted every step of `method` (UFO-like): its model is the
    policy it kept (π_0, perhaps copied from another run), so that row stands for the run
    under the run's method, with the iteration it comes from."""
    return [{**{k: v for k, v in r.items() if k != "reused_from"}, "method": method,
             "kept_iteration": r["iteration"]} for r in kept_rows(rows, split)]


def _per_method(finals: list[tuple[Path, dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """The `_finals` rows by method, one per run that holds the method, and a line per
    method whose runs are not replicates: those rows are split by their settings and named
    by run ("BIGRec (lr1e-3)"), the line says which keys differ."""
    by_name: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for run_dir, row in finals:
        by_name[row_name(row, run_dir.name)].append((run_dir, row))
    per_method: dict[str, list[dict]] = {}
    notes = []
    for name, members in by_name.items():
        groups: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
        settings = [model_settings(run_dir, row) for run_dir, row in members]
        for member, setting in zip(members, settings):
            groups[json.dumps(setting, sort_keys=True, default=str)].append(member)
        if len(groups) == 1 or not all(settings):      # a bare evaluation: nothing to compare
            per_method[name] = [row for _, row in members]
            continue
        differing = sorted({k for s in settings for k in s
                            if len({json.dumps(t.get(k), default=str) for t in settings}) > 1})
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        notes.append(f"{_label(name)}: the runs differ in {shown}, so each setting is its own "
                     f"row (runs that differ only in seeds are averaged).")
        for group in groups.values():
            runs = ", ".join(dict.fromkeys(run_dir.name for run_dir, _ in group))
            per_method[f"{name} ({runs})"] = [row for _, row in group]
    return per_method, notes


def model_settings(run_dir: Path, row: dict) -> dict:
    """What makes a row's model and its evaluation, seeds left out, as {dotted key: value}:
    π_0's (or a reference recommender's) settings for an iteration-0 row, whichever run it
    comes from, those and the loop's steps' otherwise. Empty for a bare evaluation directory
    (no manifest: nothing to compare)."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return {}
    config = json.loads(path.read_text())["config"]
    keys = INITIAL_POLICY_KEYS + ("train.gdrt", "sasrec", "bifair") + EVALUATION_KEYS
    if row["iteration"] > 0:
        keys += LOOP_STEP_KEYS
    return {k: v for k, v in flatten({key: pick(config, key) for key in keys}).items()
            if k.rsplit(".", 1)[-1] != "seed"}


def _comparison_section(run_dirs: list[Path], runs: list[list[dict]], split: str,
                        baseline: str) -> list[str]:
    finals = _finals(run_dirs, runs, split)
    per_method, unlike = _per_method(finals)
    if not per_method:         # e.g. one run whose rows are all another run's (loop.init_from)
        return [f"## Comparison ({split} split)", "",
                "No model of its own: every row on this split is another run's "
                "(loop.init_from) or was reverted.", ""]
    differences = differences_table(finals, baseline, start_runs(run_dirs, runs))
    verdicts = mostpop_verdicts(per_method)
    table = comparison_table(per_method)
    return [
        f"## Comparison ({split} split, last iteration of each run)", "",
        table, "",
        "↑ higher is better for DivRatio, HR, NDCG; ↓ lower is better for ORRatio, MGU. "
        "Bold: the unique best per column." + (" ± is the sample standard deviation over the "
                                                "n runs shown." if "±" in table else ""), "",
        *([f"- {line}" for line in unlike + verdicts] + [""] if unlike + verdicts else []),
        *([f"### Differences to {_label(baseline)} ({split}; same samples, paired bootstrap, "
           "2,000 resamples)",
           "", differences, "", "Each run against the π_0 it trained or started from (the "
           "`against` run), so a seed is paired with its own seed's BIGRec; an interval that "
           "holds 0 is no evidence of a difference.", ""]
          if differences else []),
    ]


def _general_section(run_dirs: list[Path], runs: list[list[dict]], split: str) -> list[str]:
    per_method, _ = _per_method(_finals(run_dirs, runs, split))
    if not per_method:
        return []
    return [f"## BiFair's general-recommendation protocol ({split} split)", "",
            comparison_table(per_method, GENERAL_COLUMNS), "",
            "Each user's held-out items ranked against the whole catalog less the items it is "
            "known to have; CV and MIN over the users' Recall@20 per group (↓ CV, ↑ MIN, ↑ the "
            "rest). [pop]/[genre]: the groups the model was made fair over. ± is the sample "
            "standard deviation over n runs.", ""]


def for_terminal(markdown: str) -> str:
    """The report as a terminal shows it: a section that is only a plot becomes one line
    naming the file, and a note already shown (the legends under each split) is not
    repeated."""
    lines, seen, plots = [], set(), []
    for block in markdown.split("\n\n"):
        body = [line for line in block.splitlines() if line.strip()]
        if body and all(line.startswith("![") for line in body):
            plots += [line[line.index("](") + 2:-1] for line in body]
            if lines and lines[-1].startswith("#"):
                lines.pop()                       # the plot's heading goes with it
            continue
        note = not block.lstrip().startswith(("#", "|", "-"))
        if note and block in seen:
            continue
        seen.add(block)
        lines.append(block)
    if plots:
        lines.append(f"Plots beside report.md: {', '.join(plots)}")
    return "\n\n".join(lines)


def report(run_dirs: list[Path], output: Path, splits: list[str] | None = None,
           baseline: str = "bigrec") -> Path:
    """`splits`: the splits to compare, first one plotted; None: every split the runs
    evaluated, test first. `baseline`: the method every run's difference is measured to."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    runs = [load_rows(run_dir) for run_dir in run_dirs]
    present = {r.get("split") for rows in runs for r in rows}
    splits = splits or [s for s in ("test", "valid") if s in present]
    missing = [s for s in splits if s not in present]
    if not splits or missing:
        raise RecrayError(f"no {(missing or ['test/valid'])[0]}-split metrics in "
                          f"{', '.join(map(str, run_dirs))}")
    lines = ["# recray report", "", f"Runs: {', '.join(str(d) for d in run_dirs)}", ""]
    general = [[r for r in rows if r.get("protocol") == "general"] for rows in runs]
    runs = [[r for r in rows if r.get("protocol") != "general"] for rows in runs]
    for split in splits:
        if any(general):
            lines += _general_section(run_dirs, general, split)
        if any(r.get("split") == split for rows in runs for r in rows):
            lines += _comparison_section(run_dirs, runs, split, baseline)
    if not any(runs):
        (output / "report.md").write_text("\n".join(lines))
        return output / "report.md"
    plot_curves(runs, splits[0], output / "metrics_per_iteration.png")
    genres = plot_gu(_per_method(_finals(run_dirs, runs, splits[0]))[0], output / "gu_by_genre.png")
    lines += [f"## Metrics per self-play iteration ({splits[0]})", "",
              "![metrics per iteration](metrics_per_iteration.png)", ""]
    if genres:
        lines += [f"## Group unfairness per genre (K=1, {splits[0]})", "",
                  "![GU by genre](gu_by_genre.png)", ""]
    (output / "report.md").write_text("\n".join(lines))
    return output / "report.md"
