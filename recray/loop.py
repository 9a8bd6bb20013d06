"""The SPRec self-play loop (spec §3), every baseline and ablation from this one page.

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
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.config import Config, build_config
from recray.errors import ConfigError
from recray.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    about: str                  # one line for `recray methods` and docs/loop.md
    loop: bool = True           # False: π_0 only
    sft: bool = True            # the in-loop SFT step
    dpo: bool = True            # the DPO step
    negatives: str = "self"     # "self": the policy's answers; "random": catalog titles;
                                # "semantic": the catalog titles nearest the target
    k: int | None = None        # negatives per prompt when generate.n_negatives is not set
    dmpo: bool = False          # DMPO's objective over the k negatives (loop.dmpo_form)
    one_pass: bool = False      # DMPO, SDPO: a single DPO pass (T = 1)
    reweight: bool = False      # RW (IFairLRS): re-weighted initial SFT
    loss: str | None = None     # its DPO loss (train.multi_negative_loss), e.g. RosePO's
    gdrt: bool = False          # GDRT: π_0's SFT is group DRO over answer-token groups
    judge: bool = False         # UFO-like: a judger stage weights SFT samples and DPO pairs,
                                # and a verdict stage may revert or stop (recray.judge)
    recommender: str | None = None   # a reference row with no LLM (recray.conventional)
    prior: str | None = None    # D3: a text-free recommender whose scores guide decoding


METHODS = {
    "sprec": Method("initial SFT, then T × (self-play negatives → SFT → DPO)"),
    "bigrec": Method("initial SFT only", loop=False),
    "sprec-nodpo": Method("SPRec without the DPO step (no negatives generated)", dpo=False),
    "sprec-nosft": Method("SPRec without the SFT step (DPO's reference is π_{t-1})", sft=False),
    "sprec-rn": Method("SPRec with negatives drawn uniformly from the catalog",
                       negatives="random"),
    "dmpo": Method("one DPO pass after π_0, k = 3 random negatives, DMPO's mean-reward loss "
                   "(loop.dmpo_form)", sft=False, negatives="random", k=3, dmpo=True,
                   one_pass=True),
    "sdpo": Method("one DPO pass after π_0, k = 3 random negatives, softmax (S-DPO) loss",
                   sft=False, negatives="random", k=3, one_pass=True),
    "rosepo": Method("one DPO pass after π_0 against the catalog title nearest each target, "
                     "with RosePO's personalised label smoothing (train.rosepo)", sft=False,
                     negatives="semantic", one_pass=True, loss="rosepo"),
    "gdrt": Method("initial SFT as group DRO over answer tokens grouped by how predictable "
                   "they are without the history (train.gdrt)", loop=False, gdrt=True),
    "rw": Method("initial SFT with IFairLRS re-weighting only", loop=False, reweight=True),
    "d3": Method("π_0 (BIGRec) decoded over the catalog's titles without length "
                 "normalisation, SASRec's item scores added with weight α "
                 "(evaluate.decoding.prior_weight)", loop=False, prior="sasrec"),
    "ufo": Method("UFO-like: SPRec's loop with a judger weighting SFT samples and DPO pairs by "
                  "the group unfairness of the policy's own grounded answers, and a revert/stop "
                  "rule on valid (ufo)", judge=True),
    "mostpop": Method("no LLM: the most frequent train-split targets, the same list for "
                      "everyone", loop=False, recommender="mostpop"),
    "random": Method("no LLM: a seeded uniform ranking per sample", loop=False,
                     recommender="random"),
    "sasrec": Method("no LLM: item-ID SASRec on the train subset, early-stopped on valid",
                     loop=False, recommender="sasrec"),
    "mostpop-general": Method("no LLM: MostPop under BiFair's general protocol (its train "
                              "counts, each user's known items masked)", loop=False,
                              recommender="mostpop-general"),
    "alpharec": Method("no LLM training: an MLP (or linear, bifair.projector) over the titles' "
                       "embeddings, InfoNCE; BiFair's unfair baseline", loop=False,
                       recommender="alpharec"),
    "alpharec-reweight": Method("alpharec with each positive weighted by its group's inverse "
                                "frequency (BiFair's \"Reweight\")", loop=False,
                                recommender="alpharec-reweight"),
    "bifair": Method("alpharec trained bi-level: fair group weights (Frank-Wolfe + entropy) on "
                     "the projector, DARTS-style steps on the item representations (bifair)",
                     loop=False, recommender="bifair"),
    "bifair-separate": Method("bifair ablation: the projector first, then the item "
                              "representations with the projector frozen", loop=False,
                              recommender="bifair-separate"),
    "bifair-noentropy": Method("bifair ablation: Frank-Wolfe over the group gradients only "
                               "(no entropy objective)", loop=False, recommender="bifair-noentropy"),
    "bifair-eq11": Method("bifair ablation: the literal Eq. 11 (the entropy vector's weight "
                          "dropped from the step)", loop=False, recommender="bifair-eq11"),
}


def method_config(cfg: Config) -> Config:
    """`cfg` with its method's switches applied, as every stage of the run sees it: RW's
    re-weighting, the method's negatives and their number k (unless generate.n_negatives
    is set), and its DPO loss (DMPO's, RosePO's)."""
    method = METHODS[cfg.loop.method]
    out = cfg.model_copy(deep=True)
    out.train.reweight = cfg.train.reweight or method.reweight
    out.generate.source = method.negatives
    out.generate.ground = cfg.generate.ground or method.judge   # the judger reads catalog items
    if method.k is not None and "n_negatives" not in cfg.generate.model_fields_set:
        out.generate.n_negatives = method.k
    if method.dmpo and cfg.loop.dmpo_form == "mean_reward":
        out.train.multi_negative_loss = "mean_reward"
    if method.loss:
        out.train.multi_negative_loss = method.loss
    if method.prior:            # D3 (seed-methods.md §5.2): 4 beams over the titles, α = 0.25
        out.generate.constrain_to_catalog = True
        decoding, chosen = out.evaluate.decoding, cfg.evaluate.decoding.model_fields_set
        decoding.prior_weight = decoding.prior_weight if "prior_weight" in chosen else 0.25
        decoding.mode = decoding.mode if "mode" in chosen else "beam"
    return out


def pairs_per_negative(cfg: Config) -> bool:
    """DMPO's mean_pairs form: one standard DPO pair per negative."""
    return METHODS[cfg.loop.method].dmpo and cfg.loop.dmpo_form == "mean_pairs"


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


def planned_iterations(cfg: Config) -> int:
    """The last iteration a run of `cfg` evaluates (0: π_0 only)."""
    method = METHODS[cfg.loop.method]
    return 0 if not method.loop else (1 if method.one_pass else cfg.loop.iterations)


def check_config(cfg: Config) -> None:
    """Key combinations that would stop a run part-way (after π_0 is trained), refused
    before anything starts, and a set N that overrides a method's own k, said once; a
    sweep checks every trial config with it too."""
    from recray.generate.negatives import negatives_decoding
    method = METHODS[cfg.loop.method]
    looping = planned_iterations(cfg) > 0
    if looping and method.dpo and method.negatives == "self":
        negatives_decoding(cfg.generate.decoding, cfg.generate.n_negatives, cfg.loop.seed)
    if looping and method.sft and cfg.train.reweight:
        raise ConfigError(f"train.reweight=true re-weights π_0's SFT on the prepared split, and "
                          f"loop.method={cfg.loop.method} also runs SFT steps on each iteration's "
                          f"samples, which RW does not define: use loop.method=rw (RW's π_0), or "
                          f"drop train.reweight")
    scorer = cfg.train.gdrt.scorer
    if method.gdrt and scorer and not ((Path(scorer) / "adapter_config.json").exists()
                                       or (Path(scorer) / "config.json").exists()):
        raise ConfigError(f"train.gdrt.scorer={scorer}: no LoRA adapter (adapter_config.json) or "
                          f"model (config.json) there; point it at a BIGRec π_0 (a run's "
                          f"it0/policy/adapter), or leave it unset to train one")
    if (method.recommender or "").startswith(("alpharec", "bifair")) and cfg.bifair.graph_layers \
            and cfg.bifair.protocol == "sequential":
        raise ConfigError("bifair.graph_layers: LightGCN propagates over the user-item graph of "
                          "bifair.protocol=general; prompt samples (protocol sequential) have no "
                          "such graph: set bifair.graph_layers=0 or bifair.protocol=general")
    if method.k is not None and "n_negatives" in cfg.generate.model_fields_set \
            and cfg.generate.n_negatives != method.k:
        log.warning("loop.method=%s takes generate.n_negatives=%d as set (its own k is %d)",
                    cfg.loop.method, cfg.generate.n_negatives, method.k)
    splits = cfg.evaluate.splits
    if method.judge and "valid" not in splits:
        raise ConfigError(f"loop.method={cfg.loop.method} decides after each iteration on the "
                          f"valid split whether to keep or stop: evaluate.splits needs valid "
                          f"(got {splits})")
    if cfg.evaluate.rerank.enabled and (method.recommender or "valid" not in splits
                                        or splits.index("valid") > 0):
        raise ConfigError("evaluate.rerank re-ranks grounded LLM answers with a penalty fitted "
                          "on valid: it needs an LLM method and evaluate.splits starting with "
                          f"valid (got loop.method={cfg.loop.method}, evaluate.splits={splits})")
    if "source" in cfg.generate.model_fields_set and cfg.generate.source != method.negatives:
        raise ConfigError(f"generate.source={cfg.generate.source}: in `recray run` the method "
                          f"chooses the negatives (loop.method={cfg.loop.method} uses "
                          f"{method.negatives!r}); generate.source is for `recray generate "
                          f"--negatives` alone: remove it")


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
                train.sft(base, data, out, cfg, phase="initial")
        policy = _trained_policy(base, run.path("it0/policy"), cfg)
        prior = _reference_recommender(method.prior, run, cfg, prepared) if method.prior else None
        metrics = _evaluate(run, 0, cfg, cfg.loop.method if prior else
                            initial_policy(cfg.model_dump(mode="json")),
                            _llm_evaluator(policy, pool, cfg, prepared,
                                           run.path("it0/eval/valid"), prior))
        if on_iteration:
            on_iteration(0, metrics)

        kept_valid = metrics.get("valid")       # the judger's verdicts compare on valid
        for t in range(1, iterations + 1):
            it, previous = f"it{t}", policy
            if not run.done(f"{it}/samples"):
                with run.stage(f"{it}/samples") as out:
                    pq.write_table(iteration_samples(train_split, cfg.loop.samples_per_iteration,
                                                     cfg.loop.seed, t), out / "samples.parquet")
            samples = run.path(f"{it}/samples") / "samples.parquet"

            if method.dpo and not run.done(f"{it}/negatives"):
                with run.stage(f"{it}/negatives") as out:
                    make_negatives(pool, pq.read_table(samples), policy, catalog,
                                   cfg.generate, out, seed=cfg.loop.seed * 1000 + t)
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
                        train.sft(policy.model, samples, out, cfg, phase="loop",
                                  adapter=policy.adapter)
                reference = _trained_policy(base, run.path(f"{it}/sft"), cfg)

            policy = reference
            if method.dpo:
                if not run.done(f"{it}/policy"):
                    with run.stage(f"{it}/policy") as out:
                        train.dpo(reference.model, pairs, out, cfg, adapter=reference.adapter)
                policy = _trained_policy(base, run.path(f"{it}/policy"), cfg)
            metrics = _evaluate(run, t, cfg, cfg.loop.method,
                                _llm_evaluator(policy, pool, cfg, prepared,
                                               run.path(f"{it}/eval/valid")))
            if on_iteration:
                on_iteration(t, metrics)
            if method.judge:
                verdict = verdict_stage(run, t, metrics["valid"], kept_valid, cfg)
                write_metrics_log(run)
                policy, kept_valid = ((policy, metrics["valid"]) if verdict["kept"]
                                      else (previous, kept_valid))
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


# What makes two runs' π_0 the same model (with the methods' switches applied:
# method_config), and what makes its evaluation rows the same (with the engine's backend).
INITIAL_POLICY_KEYS = ("data", "loop.base_model", "train.lora", "train.sft", "train.reweight",
                       "train.max_length", "train.seed", "train.per_device_batch_size",
                       "train.gradient_accumulation_steps", "train.scaling.num_workers",
                       "train.scaling.use_gpu", "train.precision", "train.warmup_ratio",
                       "train.weight_decay", "train.deepspeed")
EVALUATION_KEYS = ("generate.max_model_len", "generate.constrain_to_catalog", "evaluate.decoding",
                   "evaluate.embedder", "evaluate.limit", "evaluate.rerank")


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
    from recray.rundir import config_diff
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
    if differences:
        raise ConfigError(f"loop.init_from: {source} trained π_0 with another config:\n  "
                          + "\n  ".join(differences))
    evaluated_otherwise = _differences(theirs, ours, EVALUATION_KEYS)
    their_backend = manifest.get("generation_engine", {}).get("backend",
                                                             _pick(theirs, "generate.backend"))
    if their_backend != engine["backend"]:
        evaluated_otherwise.append(f"generation backend: {their_backend!r} -> "
                                   f"{engine['backend']!r}")
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
                track(cfg, run.root, _row_metrics(row), 0, row["split"])


def _differences(theirs: dict, ours: dict, keys: tuple[str, ...]) -> list[str]:
    from recray.rundir import config_diff
    differences = []
    for key in keys:
        a, b = _pick(theirs, key), _pick(ours, key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_diff(a, b, key + ".")
        elif a != b:
            differences.append(f"{key}: {a!r} -> {b!r}")
    return differences


def _pick(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


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
            results[split] = _row_metrics(row)
            continue
        with run.stage(stage) as out:
            metrics = evaluate_split(split, out / "result")
            (out / "row.json").write_text(json.dumps(
                {"method": label, "iteration": t, "split": split, **metrics}))
        log.info("iteration %d %s: HR@5 %.4f NDCG@5 %.4f DivRatio@1 %.4f ORRatio@1 %.4f MGU@1 %.4f",
                 t, split, metrics["HR@5"], metrics["NDCG@5"], metrics["DivRatio@1"],
                 metrics["ORRatio@1"], metrics["MGU@1"])
        track(cfg, run.root, metrics, t, split)
        results[split] = metrics
    write_metrics_log(run)      # kept current: a sweep may stop a run after any iteration
    return results


def _row_metrics(row: dict) -> dict:
    """An evaluation stage's row.json without what names the row: its metrics."""
    return {k: v for k, v in row.items()
            if k not in ("method", "iteration", "split", "reused_from")}


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
