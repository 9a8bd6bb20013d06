"""Ray Tune sweeps: one trial = one run of the self-play loop, reported after every iteration.

    recray sweep -c tune/sweep-movielens.yaml --output runs/sweeps/ml [key=value ...]
    recray sweep --resume runs/sweeps/ml          # Tuner.restore an interrupted sweep
    recray report runs/sweeps/ml                  # trials.csv, report.md + PNGs, best.yaml

A sweep YAML (`SweepConfig`, docs/sweeps.md) names a base run config plus overrides, a
search space over dotted run-config keys, an objective (a metric with a mode, optionally
under constraints), the search algorithm, the scheduler and the trial resources. Every
mistake in it is a ConfigError naming the key, raised before any trial starts.

Train V2 refuses Tuner(TorchTrainer), so a trial is a plain driver function (`run_trial`)
that runs the loop, whose SFT/DPO steps build their own TorchTrainers (recray.train).

The sweep directory:

    sweep.json          the sweep config and the resolved base run config: trials, --resume
                        and the report read these, never the YAML files again
    prepared/           the data, prepared once for every trial (unless the space varies data.*)
    trials/<trial_id>/  each trial's recray run directory (`recray report` works on it)
    tune-<trial_id>/, experiment_state-*.json, tuner.pkl, ...   Ray Tune's own state
    report/             the sweep report (recray/evaluate/sweep_report.py)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from recray.config import (Config, Strict, _format_validation_error, build_config, given_tree,
                           load_config, read_yaml)
from recray.errors import ConfigError, RecrayError

log = logging.getLogger(__name__)

MARKER = "recray-sweep/1"
# A trial that breaks a constraint scores -(PENALTY + violation) under max, +(...) under min:
# worse than any feasible score (every metric lies within [-1, 1]), finite because ASHA's rung
# percentiles and Optuna turn -inf into NaN, and graded so the search still learns which
# infeasible trials came closest.
PENALTY = 1000.0
_METRIC = re.compile(r"(HR|NDCG|Recall|DivRatio|ORRatio|MGU|DGU)@(\d+)|(CV|MIN)@(\d+)/(pop|genre)")


def _check_metric(name: str) -> str:
    from recray.evaluate.metrics import KS
    match = _METRIC.fullmatch(name)
    if not match or int(match.group(2) or match.group(4)) not in KS:
        raise ValueError(f"unknown metric {name!r}: one of HR, NDCG, Recall (BiFair's general "
                         f"protocol), DivRatio, ORRatio, MGU, DGU as NAME@K, or CV@K/pop, MIN@K/genre, ...; K in {list(KS)}")
    return name


class Distribution(Strict):
    """One search dimension. randint includes both ends: {low: 1, high: 5} draws 1..5."""
    type: Literal["loguniform", "uniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list | None = None

    @model_validator(mode="after")
    def _well_formed(self):
        if self.type in ("choice", "grid"):
            if self.low is not None or self.high is not None or self.values is None:
                raise ValueError(f"{self.type} takes a `values` list (no low/high)")
            if not self.values:
                raise ValueError("empty values list")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes `low` and `high` (no values)")
        if self.low >= self.high:
            raise ValueError(f"empty range: low {self.low:g} >= high {self.high:g}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.type == "randint" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("randint needs integer low and high")
        return self

    def probes(self) -> list:
        """Values that show whether the run-config key takes this dimension's draws; the
        third of a float range is not an integer, so an int key under uniform fails."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high, self.low + (self.high - self.low) / 3]

    def domain(self):
        from ray import tune
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)   # Tune's high is exclusive
        if self.type == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


class Constraint(Strict):
    """The objective counts only while `metric` <= max and/or >= min."""
    metric: str
    max: float | None = None
    min: float | None = None

    check_metric = field_validator("metric")(_check_metric)

    @model_validator(mode="after")
    def _bounded(self):
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs max or min")
        return self


class Objective(Strict):
    metric: str = "NDCG@5"
    mode: Literal["max", "min"] = "max"
    split: Literal["valid", "test"] = "valid"     # select on valid; test stays for reporting
    constraints: list[Constraint] = []

    check_metric = field_validator("metric")(_check_metric)


class TrialResources(Strict):
    """What Tune reserves for a trial's driver; the trial's training workers and generation
    pool ask Ray for their own (train.scaling, generate.*) while it runs."""
    cpu: float = Field(1, ge=0)
    # Tune refuses a request of nothing; memory also makes a 0-CPU driver a real request.
    memory_gb: float = Field(0.5, gt=0)

    def request(self) -> dict:
        return {"cpu": self.cpu, "memory": int(self.memory_gb * 2**30)}


class SweepConfig(Strict):
    base: str | None = None                # run config YAML (from the working dir); None: defaults
    overrides: list[str] = []              # dotted key=value on the base, as on `recray run`
    space: dict[str, Distribution] = Field(min_length=1)
    objective: Objective = Field(default_factory=Objective)
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)     # asha: iterations every trial runs before it may stop
    reduction_factor: float = Field(2, gt=1)   # asha: each rung keeps the best 1/reduction_factor
    num_samples: int = Field(8, ge=1)      # trials (grid: repeats of the whole grid)
    max_concurrent_trials: int | None = Field(None, ge=1)   # None: as many as resources allow
    trial_resources: TrialResources = Field(default_factory=TrialResources)
    seed: int | None = 0                   # random/optuna sampler seed (None: unseeded)


# ---------------------------------------------------------------- loading and validation

def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """The sweep YAML and its base run config (+ its overrides, then `overrides`), checked."""
    tree = read_yaml(path, "sweep file")
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as e:
        message = _format_validation_error(e).replace("Value error, ", "")
        raise ConfigError(message.replace("invalid config", f"invalid sweep {path}")) from None
    try:
        base = load_config(sweep.base, [*sweep.overrides, *(overrides or [])])
    except ConfigError as e:
        where = sweep.base or "defaults"
        raise ConfigError(f"base run config ({where} + overrides): {e}") from None
    check_sweep(sweep, base)
    return sweep, base


def _is_run_config_key(dotted: str) -> bool:
    node = Config
    for part in dotted.split("."):
        if not isinstance(node, type) or not issubclass(node, BaseModel):
            return False
        if part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def check_sweep(sweep: SweepConfig, base: Config) -> None:
    """Everything about the sweep that can be wrong before a trial starts."""
    from recray.methods import check_config
    tree = given_tree(base)
    for key, dist in sweep.space.items():
        if not _is_run_config_key(key):
            raise ConfigError(f"space.{key}: unknown run-config key")
        for value in dist.probes():
            try:
                check_config(build_config(tree, [(key, value)]))
            except ConfigError as e:
                detail = str(e).removeprefix("invalid config:\n  ")
                raise ConfigError(f"space.{key}: {dist.type} value {value!r} does not fit the "
                                  f"run config: {detail}") from None
        if sweep.search == "grid" and dist.type != "grid":
            raise ConfigError(f"space.{key}: search grid takes only type grid (got {dist.type})")
        if sweep.search == "optuna" and dist.type == "grid":
            raise ConfigError(f"space.{key}: Optuna has no grid dimension; use type choice")
    split = sweep.objective.split
    if split not in base.evaluate.splits:
        raise ConfigError(f"objective.split: the run config evaluates {base.evaluate.splits} "
                          f"only; add evaluate.splits=[{split},test] to the sweep's overrides")
    if sweep.scheduler == "asha" and sweep.grace_period > max_iterations(sweep, base):
        raise ConfigError(f"grace_period: {sweep.grace_period} exceeds the most iterations a "
                          f"trial runs ({max_iterations(sweep, base)})")


def max_iterations(sweep: SweepConfig, base: Config) -> int:
    dist = sweep.space.get("loop.iterations")
    if dist is None:
        return base.loop.iterations
    return int(max(dist.values) if dist.values else dist.high)


def shares_prepared(sweep: SweepConfig) -> bool:
    """One prepared dataset serves every trial unless the space varies the data config."""
    return not any(key == "data" or key.startswith("data.") for key in sweep.space)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def read_sweep(root: Path) -> tuple[SweepConfig, Config]:
    try:
        state = json.loads((Path(root) / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        state = {}
    if state.get("format") != MARKER:
        raise RecrayError(f"{root} is not a recray sweep directory (no valid sweep.json)")
    return SweepConfig.model_validate(state["sweep"]), build_config(state["base"])


# ---------------------------------------------------------------- the objective

def objective_value(metrics: dict, objective: Objective) -> tuple[float, bool]:
    """(score, feasible): the metric if every constraint holds, else the PENALTY score."""
    violation = 0.0
    for c in objective.constraints:
        value = float(metrics[c.metric])
        if c.max is not None:
            violation += max(0.0, value - c.max)
        if c.min is not None:
            violation += max(0.0, c.min - value)
    if violation == 0:
        return float(metrics[objective.metric]), True
    penalty = PENALTY + violation
    return (-penalty if objective.mode == "max" else penalty), False


def trial_result(iteration: int, by_split: dict[str, dict], objective: Objective) -> dict:
    """What a trial reports to Tune: the objective split's metrics by name, other splits' as
    `<split>/<metric>`, `iteration` (ASHA's clock), `objective` and `feasible`."""
    chosen = by_split[objective.split]
    result = {f"{split}/{key}": value for split, metrics in by_split.items()
              if split != objective.split for key, value in metrics.items()
              if isinstance(value, (int, float))}
    result.update({k: v for k, v in chosen.items() if isinstance(v, (int, float))})
    score, feasible = objective_value(chosen, objective)
    result.update(iteration=iteration, objective=score, feasible=feasible)
    return result


# ---------------------------------------------------------------- running

def run_trial(params: dict, sweep_dir: str) -> None:
    """One trial: the loop with `params` set on the base run config, in trials/<trial_id>/,
    reported to Tune after every iteration. A restarted trial (Tuner.restore) resumes its
    run directory from the last finished stage.

    Tune runs this function inside the trial's placement group and captures every task and
    actor it starts into it: the loop's own (the generation pool, Ray Data, adapter merges)
    would not fit in the trial's bundle. So the loop runs in a task scheduled outside it
    ("DEFAULT"), as under `recray run`, and streams each iteration's metrics back here. The
    task belongs to this trial: when ASHA stops the trial, Ray ends the task with it."""
    import ray
    from ray import tune
    root = Path(sweep_dir)
    sweep, base = read_sweep(root)
    cfg = build_config(given_tree(base), params.items())
    run_dir = root / "trials" / tune.get_context().get_trial_id()
    prepared = root / "prepared" if shares_prepared(sweep) else None
    # No retries: a second attempt would report the iterations again from 0 (ASHA's clock
    # must only grow); a failed trial resumes its run directory on `--resume` instead.
    loop = ray.remote(_loop_task).options(num_cpus=0, num_returns="streaming", max_retries=0,
                                          scheduling_strategy="DEFAULT")
    for ref in loop.remote(cfg, run_dir, prepared):
        iteration, by_split = ray.get(ref)
        tune.report(trial_result(iteration, by_split, sweep.objective))


def _loop_task(cfg: Config, run_dir: Path, prepared: Path | None):
    """`recray run` of one trial as a Ray generator task: yields (iteration, {split: metrics})
    after every iteration's evaluation (run_loop calls back from its own thread here)."""
    import queue
    import threading

    from recray.job import run_job
    results, failure = queue.Queue(), []

    def job():
        try:
            run_job(cfg, run_dir, resume=(run_dir / "manifest.json").exists(), prepared=prepared,
                    on_iteration=lambda iteration, by_split: results.put((iteration, by_split)))
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the task
            failure.append(e)
        finally:
            results.put(None)

    threading.Thread(target=job, daemon=True).start()
    while (item := results.get()) is not None:
        yield item
    if failure:
        raise failure[0]


def check_concurrency(sweep: SweepConfig, base: Config) -> None:
    """Tune starts as many trials as their drivers' CPUs allow; on a local instance trials
    whose training workers then find no CPU left would wait forever, so the trials allowed
    at once must fit whole (driver + pool + workers). A cluster may grow: not checked."""
    import ray
    if base.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    s, g = base.train.scaling, base.generate
    need = (sweep.trial_resources.cpu + g.actors * g.cpus_per_actor
            + s.num_workers * s.cpus_per_worker)
    have = ray.cluster_resources().get("CPU", 0)
    at_once = sweep.max_concurrent_trials or sweep.num_samples
    if need and at_once * need > have:
        raise ConfigError(f"max_concurrent_trials: {at_once} trials at once need "
                          f"{at_once * need:g} CPUs ({need:g} each: driver, generation pool, "
                          f"training workers); the local Ray instance has {have:g}: set "
                          f"max_concurrent_trials to {int(have // need)}")


def _trial_dirname(trial) -> str:
    return f"tune-{trial.trial_id}"     # Tune's default name spells out every parameter


def _tuner(sweep: SweepConfig, base: Config, root: Path, trainable):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search = OptunaSearch(seed=sweep.seed)     # Tune limits its concurrency itself
    else:           # random and grid: grid dimensions expand, the others are drawn
        # Tune ignores max_concurrent_trials for a generator passed in: it must carry it.
        search = BasicVariantGenerator(random_state=sweep.seed,
                                       max_concurrent=sweep.max_concurrent_trials or 0)
    scheduler = FIFOScheduler()
    if sweep.scheduler == "asha":
        # +1: a trial that reaches the most iterations ends by itself, not by a STOP that
        # would kill it before its run writes its report.
        scheduler = ASHAScheduler(time_attr="iteration", max_t=max_iterations(sweep, base) + 1,
                                  grace_period=sweep.grace_period,
                                  reduction_factor=sweep.reduction_factor)
    return tune.Tuner(
        trainable, param_space={key: d.domain() for key, d in sweep.space.items()},
        tune_config=tune.TuneConfig(metric="objective", mode=sweep.objective.mode,
                                    search_alg=search, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=(sweep.max_concurrent_trials
                                                           if sweep.search == "optuna" else None),
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=root.name, storage_path=str(root.parent), verbose=1))


def run_sweep(sweep: SweepConfig, base: Config, output: Path, resume: bool = False,
              source: str | None = None) -> Path:
    """Run (or, with resume, Tuner.restore) the sweep in `output`; returns its report."""
    from ray import tune

    from recray.data.loaders import load
    from recray.data.prepare import prepare
    from recray.evaluate.sweep_report import sweep_report
    from recray.loop import check_resources
    from recray.runtime import init_ray

    root = Path(output).resolve()
    if resume:
        if not tune.Tuner.can_restore(str(root)):
            raise RecrayError(f"{root} holds no Ray Tune state to resume")
    else:
        if root.exists() and any(root.iterdir()):
            raise RecrayError(f"{root} already exists: pick a new --output, or continue that "
                              f"sweep with --resume {root}")
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.json").write_text(json.dumps(
            {"format": MARKER, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": source,
             "sweep": sweep.model_dump(mode="json"), "base": given_tree(base)},
            indent=1))
    init_ray(base.ray)
    check_resources(base, trial_cpus=sweep.trial_resources.cpu)
    check_concurrency(sweep, base)
    if shares_prepared(sweep) and not (root / "prepared").exists():
        prepare(load(base.data), base.data, root / "prepared")

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep_dir=str(root)),
                                    sweep.trial_resources.request())
    if resume:
        # Errored trials resume too: their run directories skip every finished stage.
        tuner = tune.Tuner.restore(str(root), trainable, resume_errored=True)
    else:
        tuner = _tuner(sweep, base, root, trainable)
    results = tuner.fit()
    if results.errors:
        log.warning("%d trial(s) failed; see the report and %s/tune-*/error.txt",
                    len(results.errors), root)
    return sweep_report(root, root / "report")
