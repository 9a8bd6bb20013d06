"""loop.init_from: start a run from another run's π_0 (ablations of one seed share it),
refusing a π_0 trained another way and copying its evaluation rows only when they were
made the way this run evaluates."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from recray.config import EVALUATION_KEYS, INITIAL_POLICY_KEYS, Config, build_config, pick
from recray.errors import ConfigError
from recray.methods import METHODS, method_config
from recray.rundir import RunDir, config_diff, row_metrics

log = logging.getLogger(__name__)


def initial_policy(config: dict) -> str:
    """What a run's π_0 is (its row name): bigrec, rw or gdrt; `config` effective."""
    if METHODS[config["loop"]["method"]].gdrt:
        return "gdrt"
    return "rw" if config["train"]["reweight"] else "bigrec"


def effective_config(manifest: dict) -> dict:
    """A run's config as its stages saw it (method_config), from its manifest: the settings
    it was given where recorded (older runs: the whole config, where every key counts as
    given)."""
    return method_config(build_config(manifest.get("config_given", manifest["config"]))
                         ).model_dump(mode="json")


def reuse_initial_policy(run: RunDir, source: Path, cfg: Config, engine: dict) -> None:
    """Start from another run's π_0 (ablations of one seed share it): copy its it0/policy,
    refusing a source trained another way (the configs compared as π_0 was trained:
    effective_config). Its evaluation rows are copied too, marked as reused so a report
    counts that model once, when they were made the way this run evaluates (same
    evaluation keys and generation engine, `engine`); otherwise this run evaluates π_0
    itself (D3's decoding, IFairLRS's re-ranking)."""
    if not (source / "it0" / "policy" / ".stage.json").exists():
        raise ConfigError(f"loop.init_from: {source} holds no finished it0/policy stage")
    manifest = json.loads((source / "manifest.json").read_text())
    theirs = effective_config(manifest)
    ours = method_config(cfg).model_dump(mode="json")
    differences = _differences(theirs, ours, INITIAL_POLICY_KEYS)
    if initial_policy(theirs) != initial_policy(ours):
        differences.append(f"π_0: {initial_policy(theirs)!r} -> {initial_policy(ours)!r}")
    elif initial_policy(ours) == "gdrt":
        differences += config_diff(theirs["train"]["gdrt"], ours["train"]["gdrt"], "train.gdrt.")
    differences += _precision_difference(source, cfg)
    if differences:
        raise ConfigError(f"loop.init_from: {source} trained π_0 with another config:\n  "
                          + "\n  ".join(differences))
    evaluated_otherwise = _differences(theirs, ours, EVALUATION_KEYS)
    their_backend = manifest.get("generation_engine", {}).get("backend",
                                                             pick(theirs, "generate.backend"))
    if their_backend != engine["backend"]:
        evaluated_otherwise.append(f"generation backend: {their_backend!r} -> "
                                   f"{engine['backend']!r}")
    their_dtype = manifest.get("generation_engine", {}).get("dtype")   # None: an older run
    if their_dtype != engine["dtype"]:          # auto resolves by machine
        evaluated_otherwise.append(f"generation dtype: {their_dtype!r} -> {engine['dtype']!r}")
    stages = ["it0/policy"]
    if evaluated_otherwise:
        log.warning("loop.init_from: %s evaluated π_0 another way (%s): this run evaluates it "
                    "again", source, "; ".join(evaluated_otherwise))
    else:
        stages += [f"it0/eval/{split}" for split in cfg.evaluate.splits
                   if (source / "it0" / "eval" / split / ".stage.json").exists()]
    from recray.tracking import track
    for stage in stages:
        if run.done(stage):
            continue
        with run.stage(stage) as out:
            shutil.copytree(source / stage, out, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".stage.json"))
            if (out / "row.json").exists():
                row = json.loads((out / "row.json").read_text())
                (out / "row.json").write_text(json.dumps({**row, "reused_from": str(source)}))
                # this run's MLflow and TensorBoard show π_0 at step 0, as if it were trained here
                track(cfg, run.root, row_metrics(row), 0, row["split"])


def _precision_difference(source: Path, cfg: Config) -> list[str]:
    """train.precision as π_0 really trained (auto resolves by machine), against ours."""
    from recray.train.deepspeed import precision
    summary = source / "it0" / "policy" / "summary.json"
    theirs = json.loads(summary.read_text()).get("precision") if summary.exists() else None
    ours = precision(cfg.train)
    return [] if theirs == ours else [f"precision as trained: {theirs!r} -> {ours!r}"]


def _differences(theirs: dict, ours: dict, keys: tuple[str, ...]) -> list[str]:
    differences = []
    for key in keys:
        a, b = pick(theirs, key), pick(ours, key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_diff(a, b, key + ".")
        elif a != b:
            differences.append(f"{key}: {a!r} -> {b!r}")
    return differences
