"""The SPRec self-play loop (spec §3): every method from this one page, each a row of
recray.methods.METHODS that says which of these stages it runs and what it adds.

    π_0 = SFT(base, train subset)                                   # = BIGRec
    for t = 1..T:
        D_t = seeded sample of n_t train samples
        negatives = generate(π_{t-1}, prompts(D_t), N)              # or random catalog titles
        π'  = SFT(π_{t-1}, positives(D_t))                          # skipped by sprec-nosft
        π_t = DPO(π', ref = frozen π', (prompt, positive, negatives), β)   # skipped by sprec-nodpo
        evaluate π_t on valid and test

Policies are LoRA adapters on the one base model, so the generation pool keeps its
engines for the whole run and hot-swaps each iteration's adapter. Every box above is a
stage of the run directory: written under a temp name, renamed when complete, skipped
on --resume.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.config import Config
from recray.errors import ConfigError
from recray.init_from import initial_policy, reuse_initial_policy
from recray.methods import (METHODS, check_config, method_config, pairs_per_negative,
                             planned_iterations)
from recray.rundir import RunDir, row_metrics

log = logging.getLogger(__name__)


def iteration_samples(train: pa.Table, n: int, seed: int, iteration: int) -> pa.Table:
    """D_t: the n train samples with the smallest keyed hash for (seed, t); all if fewer."""
    from recray.data.prepare import sample_hash
    if n >= train.num_rows:
        return train
    hashes = sample_hash(train.column("sample_id").to_numpy(zero_copy_only=False),
                         seed * 1000 + iteration)
    keep = np.sort(np.argsort(hashes, kind="stable")[:n])
    return train.take(pa.array(keep))


def pairwise(negatives: pa.Table) -> pa.Table:
    """DMPO's pairs: one (prompt, chosen, [rejected_j]) row per negative j."""
    rows = [{**r, "rejected": [rej], "rejected_scores": [score]}
            for r in negatives.to_pylist()
            for rej, score in zip(r["rejected"], r["rejected_scores"])]
    return pa.Table.from_pylist(rows, schema=negatives.schema)


# Called after each iteration's evaluations (iteration 0 = π_0) with {split: metrics}; a
# sweep trial reports them to Ray Tune from here. On --resume it also gets the finished
# iterations' metrics again, so a restarted trial reports its whole trajectory.
OnIteration = Callable[[int, dict[str, dict]], None]


def run_loop(cfg: Config, run: RunDir, prepared: Path,
             on_iteration: OnIteration | None = None) -> None:
    from recray import train
    from recray.generate import GenerationPool
    from recray.generate.negatives import make_negatives
    from recray.judge import judge_stage, verdict_stage
    from recray.train.token_groups import gdrt_sft_data

    check_config(cfg)
    cfg = method_config(cfg)
    method = METHODS[cfg.loop.method]
    base = cfg.loop.base_model or str(_embedded_model())
    iterations = planned_iterations(cfg)
    catalog = pq.read_table(prepared / "catalog.parquet")
    train_split = pq.read_table(prepared / "train")

    if method.recommender:
        metrics = _evaluate(run, 0, cfg, cfg.loop.method,
                            _reference_evaluator(method.recommender, run, cfg, prepared, catalog))
        if on_iteration:
            on_iteration(0, metrics)
        return
    check_resources(cfg)
    with GenerationPool(cfg.generate, base) as pool:
        run.record("generation_engine", pool.engine)
        if cfg.loop.init_from:
            reuse_initial_policy(run, Path(cfg.loop.init_from), cfg, pool.engine)
        elif not run.done("it0/policy"):
            data = gdrt_sft_data(run, cfg, base, prepared) if method.gdrt else prepared
            with run.stage("it0/policy") as out:
                run.outcome(train.sft(base, data, out, cfg, phase="initial").line())
        policy = _trained_policy(base, run.path("it0/policy"), cfg)
        prior = _reference_recommender(method.prior, run, cfg, prepared) if method.prior else None
        metrics = _evaluate(run, 0, cfg, cfg.loop.method if prior else
                            initial_policy(cfg.model_dump(mode="json")),
                            _llm_evaluator(policy, pool, cfg, prepared,
                                           run.path("it0/eval/valid"), prior))
        if on_iteration:
            on_iteration(0, metrics)

        kept = metrics                  # the kept model's metrics (a verdict may revert a step)
        for t in range(1, iterations + 1):
            it, previous = f"it{t}", policy
            if not run.done(f"{it}/samples"):
                with run.stage(f"{it}/samples") as out:
                    pq.write_table(iteration_samples(train_split, cfg.loop.samples_per_iteration,
                                                     cfg.loop.seed, t), out / "samples.parquet")
            samples = run.path(f"{it}/samples") / "samples.parquet"

            if method.dpo and not run.done(f"{it}/negatives"):
                with run.stage(f"{it}/negatives") as out:
                    made = make_negatives(pool, pq.read_table(samples), policy, catalog,
                                          cfg.generate, out, seed=cfg.loop.seed * 1000 + t).stats
                    run.outcome(f"{made['rows']} rows of {made['samples']} samples, "
                                f"{made['short_of_n']} short of {made['n_negatives']} negatives")
                    if pairs_per_negative(cfg):
                        pq.write_table(pairwise(pq.read_table(out / "negatives.parquet")),
                                       out / "negatives.parquet")

            pairs = run.path(f"{it}/negatives") / "negatives.parquet"
            if method.judge:                                      # weighted samples and pairs
                samples, pairs = judge_stage(run, t, pool, base, samples, pairs, catalog,
                                             prepared, cfg)

            reference = policy                                    # π' = π_{t-1} without SFT
            if method.sft:
                if not run.done(f"{it}/sft"):
                    with run.stage(f"{it}/sft") as out:
                        run.outcome(train.sft(policy.model, samples, out, cfg, phase="loop",
                                              adapter=policy.adapter).line())
                reference = _trained_policy(base, run.path(f"{it}/sft"), cfg)

            policy = reference
            if method.dpo:
                if not run.done(f"{it}/policy"):
                    with run.stage(f"{it}/policy") as out:
                        run.outcome(train.dpo(reference.model, pairs, out, cfg,
                                              adapter=reference.adapter).line())
                policy = _trained_policy(base, run.path(f"{it}/policy"), cfg)
            metrics = _evaluate(run, t, cfg, cfg.loop.method,
                                _llm_evaluator(policy, pool, cfg, prepared,
                                               run.path(f"{it}/eval/valid")))
            verdict = verdict_stage(run, t, metrics["valid"], kept["valid"], cfg) \
                if method.judge else {"kept": True, "stop": False}
            if verdict["kept"]:
                kept = metrics
            else:                       # the run's model is still the one kept before
                policy = previous
                write_metrics_log(run)
            if on_iteration:            # a sweep scores the run's model, not a reverted step
                on_iteration(t, kept)
            if verdict["stop"]:
                break


def _trained_policy(base: str, stage: Path, cfg: Config):
    """A training stage's policy: its LoRA adapter on the base model, or (full fine-tuning)
    its own model folder. Each step starts from, and DPO references, exactly the policy
    passed to it: the adapter keeps training, or the full model is the step's `model`."""
    from recray.generate import Policy
    if cfg.train.lora.enabled:
        return Policy(base, str(stage / "adapter"))
    return Policy(str(stage / "model"), None)


def check_resources(cfg: Config, trial_cpus: float = 0) -> None:
    """The pool lives for the whole run, beside each training fit: both must fit at once,
    and in a sweep beside the trial's own driver (`trial_cpus`, trial_resources.cpu)."""
    import ray
    pool = cfg.generate.actors * cfg.generate.cpus_per_actor
    workers = cfg.train.scaling.num_workers * cfg.train.scaling.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if pool + workers + trial_cpus <= have:
        return
    trial = f", the sweep trial's driver ({trial_cpus:g}, trial_resources.cpu)" if trial_cpus else ""
    message = (f"the generation pool ({pool:g} CPUs){trial} and the training workers ({workers:g} "
               f"CPUs) need {pool + workers + trial_cpus:g} CPUs at once; the Ray cluster has "
               f"{have:g}. Lower generate.cpus_per_actor (0 lets the idle engine share cores with "
               f"training), train.scaling.num_workers or train.scaling.cpus_per_worker")
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        log.warning("%s (waiting for the cluster to grow)", message)
    else:
        raise ConfigError(message)


# (split, output folder) -> metrics, writing predictions.parquet and metrics.json there
Evaluator = Callable[[str, Path], dict]


def _llm_evaluator(policy, pool, cfg: Config, prepared: Path, valid_stage: Path,
                   prior=None) -> Evaluator:
    """`valid_stage`: this model's valid evaluation, whose re-ranker (evaluate.rerank) the
    other splits apply; `prior`: D3's text-free recommender."""
    from recray.evaluate.evaluate import evaluate
    return lambda split, out: evaluate(prepared, split, policy, cfg, out, cfg.evaluate.limit,
                                       pool=pool, rerank_plan=valid_stage / "result" / "rerank.json",
                                       prior=prior)


def _reference_evaluator(name: str, run: RunDir, cfg: Config, prepared: Path,
                         catalog: pa.Table) -> Evaluator:
    """Random, MostPop, SASRec or an LLM-enhanced model (trained once, as stage it0/model)
    scoring every item."""
    from recray.conventional import baselines, enhanced
    from recray.conventional.evaluate import evaluate_recommender
    if name in enhanced.VARIANTS or name == enhanced.GENERAL_MOSTPOP:
        return enhanced.evaluator(name, run, cfg, prepared)
    recommender = (_reference_recommender(name, run, cfg, prepared) if name == "sasrec" else
                   baselines.MostPop(catalog) if name == "mostpop"
                   else baselines.Random(catalog, cfg.loop.seed))
    return lambda split, out: evaluate_recommender(prepared, split, recommender, out,
                                                   cfg.evaluate.limit)


def _reference_recommender(name: str, run: RunDir, cfg: Config, prepared: Path):
    """SASRec, trained once as stage it0/model (its own row, or D3's prior)."""
    from recray.conventional import sasrec
    assert name == "sasrec", name
    if not run.done("it0/model"):
        with run.stage("it0/model") as out:
            log.info("sasrec trained: %s", sasrec.fit(prepared, cfg.sasrec, out))
    return sasrec.Trained(run.path("it0/model"))


def _evaluate(run: RunDir, t: int, cfg: Config, label: str,
              evaluate_split: Evaluator) -> dict[str, dict]:
    """Evaluate iteration t's model on every configured split (a finished stage is read
    back, not redone)."""
    from recray.tracking import track
    results = {}
    for split in cfg.evaluate.splits:
        stage = f"it{t}/eval/{split}"
        if run.done(stage):
            row = json.loads((run.path(stage) / "row.json").read_text())
            results[split] = row_metrics(row)
            continue
        with run.stage(stage) as out:
            metrics = evaluate_split(split, out / "result")
            (out / "row.json").write_text(json.dumps(
                {"method": label, "iteration": t, "split": split, **metrics}))
            run.outcome(f"{metrics['n_samples']:.0f} samples: " + " ".join(
                f"{k} {metrics[k]:.4f}" for k in ("HR@5", "NDCG@5", "DivRatio@1", "ORRatio@1", "MGU@1")))
        track(cfg, run.root, metrics, t, split)
        results[split] = metrics
    write_metrics_log(run)      # kept current: a sweep may stop a run after any iteration
    return results


def write_metrics_log(run: RunDir) -> Path:
    """metrics.jsonl, rebuilt from the evaluation stages: one line per (iteration, split)."""
    rows = [json.loads(p.read_text()) for p in run.root.glob("it*/eval/*/row.json")]
    for row in rows:            # a step UFO-like's verdict reverted is not the run's model
        verdict = run.root / f"it{row['iteration']}" / "verdict" / "verdict.json"
        if verdict.exists() and not json.loads(verdict.read_text())["kept"]:
            row["reverted"] = True
    rows.sort(key=lambda r: (r["iteration"], r["split"]))
    path = run.root / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _embedded_model() -> Path:
    from recray.assets import model_dir
    return model_dir()
