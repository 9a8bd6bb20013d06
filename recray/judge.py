"""UFO-like's judger (seed 001; seed-methods.md §3.3): the policy's own grounded answers on
D_t turned into group-exposure unfairness, SFT sample weights and DPO pair weights, and the
corrector's stop/revert rule. The seed gives only its abstract, so every formula here is a
[CHOICE] of seed-methods.md, named "UFO-like" in docs.

    u_g = GU_g + ρ·P_g,   GU_g = p_gen(g) − p_hist(g),  P_g = p_base(g) − p_hist(g)
    w_x = mean1( mean_{g ∈ G(target)} exp(−η u_g / s) )          s = max_g |u_g|
    c_x = mean1( 1 + κ·max(0, mean_{g ∈ G(answer)} u_g / s) )     both clipped to [1/clip, clip]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.config import Config, UfoConfig
from recray.evaluate.metrics import genre_shares
from recray.generate.negatives import same_title
from recray.rundir import RunDir

log = logging.getLogger(__name__)


def answer_items(negatives: pa.Table, catalog: pa.Table) -> dict[str, str]:
    """sample id -> the catalog item of its top negative (the policy's best grounded answer
    that is not the target), for rows whose answer is a catalog title."""
    by_title: dict[str, str] = {}
    for item, title in zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()):
        by_title.setdefault(same_title(title), item)
    out = {}
    for sid, rejected in zip(negatives.column("sample_id").to_pylist(), negatives.column("rejected").to_pylist()):
        title = rejected[0].strip().removeprefix('"').removesuffix('"') if rejected else ""
        if same_title(title) in by_title:
            out[sid] = by_title[same_title(title)]
    return out


def _item_groups(catalog: pa.Table) -> dict:
    return dict(zip(catalog.column("item_id").to_pylist(), catalog.column("categories").to_pylist()))


def answer_unfairness(samples: pa.Table, negatives: pa.Table, catalog: pa.Table,
                      groups: list[str]) -> tuple[dict[str, str], dict[str, float]]:
    """(sample id -> answer item, GU_g = p_answers(g) − p_hist(g)) of a policy's negatives."""
    answer_of = answer_items(negatives, catalog)
    return answer_of, unfairness(list(answer_of.values()), samples.column("history_item_ids").to_pylist(),
                                 _item_groups(catalog), groups)


def unfairness(answers: list[str], histories: list[list[str]], item_groups: dict, groups: list[str]) -> dict[str, float]:
    """p_answers(g) − p_hist(g) per group, with the metrics' share convention."""
    p_gen = genre_shares([[a] for a in answers], item_groups, groups)
    p_hist = genre_shares(histories, item_groups, groups)
    return {g: p_gen[g] - p_hist[g] for g in groups}


def _mean1(values: np.ndarray, clip: float) -> np.ndarray:
    values = np.clip(values / values.mean(), 1.0 / clip, clip)
    return values / values.mean()


def weights(u: dict[str, float], targets: list[str], answers: list[str | None], item_groups: dict,
            cfg: UfoConfig) -> tuple[np.ndarray, np.ndarray]:
    """(w per sample, c per pair): targets of under-exposed groups weigh more in SFT,
    negatives of over-exposed groups weigh more in DPO; items in no group weigh 1."""
    s = max(max(abs(v) for v in u.values()), 1e-12)

    def mine(item):
        return [u[g] / s for g in item_groups.get(item) or () if g in u] if item else []
    w = np.array([np.mean(np.exp(-cfg.eta * np.array(m))) if (m := mine(t)) else 1.0 for t in targets])
    c = np.array([1 + cfg.kappa * max(0.0, float(np.mean(m))) if (m := mine(a)) else 1.0 for a in answers])
    return _mean1(w, cfg.clip), _mean1(c, cfg.clip)


def judge(samples: pa.Table, negatives: pa.Table, catalog: pa.Table, groups: list[str],
          cfg: UfoConfig, out: Path, prior: dict[str, float] | None = None) -> dict:
    """Write out/samples.parquet (with `weight`), out/negatives.parquet (with `weight`, the
    pair weight) and out/judge.json (u, GU, its data and model parts, P, the weights' range)."""
    item_groups = _item_groups(catalog)
    answer_of, gu = answer_unfairness(samples, negatives, catalog, groups)
    histories = samples.column("history_item_ids").to_pylist()
    targets = samples.column("target_item_id").to_pylist()
    data_part = unfairness(targets, histories, item_groups, groups)          # D_g: p_tgt − p_hist
    u = {g: gu[g] + cfg.rho * (prior or {}).get(g, 0.0) for g in groups}
    sample_ids = samples.column("sample_id").to_pylist()
    pair_ids = negatives.column("sample_id").to_pylist()
    w, c = weights(u, targets, [answer_of.get(s) for s in pair_ids], item_groups, cfg)
    pq.write_table(samples.append_column("weight", pa.array(w)), out / "samples.parquet")
    pq.write_table(negatives.append_column("weight", pa.array(c)), out / "negatives.parquet")
    record = {"u": u, "GU": gu, "data_part": data_part,
              "model_part": {g: gu[g] - data_part[g] for g in groups}, "prior": prior,
              "answers_grounded": len(answer_of), "pairs": len(pair_ids), "samples": len(sample_ids),
              "sft_weight_range": [float(w.min()), float(w.max())],
              "pair_weight_range": [float(c.min()), float(c.max())]}
    (out / "judge.json").write_text(json.dumps(record, indent=1))
    return record


def verdict(first: dict, previous: dict, current: dict, cfg: UfoConfig) -> dict:
    """The corrector's dynamic feedback on valid metrics: revert to π_{t−1} when HR@10 falls by
    more than `max_hr_drop` of its value, stop when MGU@5 is at most `stop_ratio` × π_0's."""
    kept = current["HR@10"] >= (1 - cfg.max_hr_drop) * previous["HR@10"]
    mgu = (current if kept else previous)["MGU@5"]
    return {"kept": bool(kept), "stop": bool(mgu <= cfg.stop_ratio * first["MGU@5"]),
            "HR@10": [previous["HR@10"], current["HR@10"]], "MGU@5": mgu,
            "stop_at_MGU@5": cfg.stop_ratio * first["MGU@5"]}


# ---------------------------------------------------------------- the loop's stages

def judge_stage(run: RunDir, t: int, pool, base: str, samples: Path, pairs: Path, catalog: pa.Table,
                prepared: Path, cfg: Config) -> tuple[Path, Path]:
    """UFO-like's judger stage it<t>/judge (and, once, the base model's prior it0/prior when
    ufo.rho > 0): the iteration's samples and pairs with their weights."""
    from recray.generate import Policy
    from recray.generate.negatives import make_negatives
    groups = json.loads((prepared / "groups.json").read_text())["groups"]
    prior = None
    if cfg.ufo.rho > 0:         # P_g: the base model's answers on the first iteration's samples
        if not run.done("it0/prior"):
            with run.stage("it0/prior") as out:
                rows = pq.read_table(samples)
                make_negatives(pool, rows, Policy(base, None), catalog, cfg.generate, out,
                               seed=cfg.loop.seed * 1000)
                _, prior = answer_unfairness(rows, pq.read_table(out / "negatives.parquet"),
                                             catalog, groups)
                (out / "prior.json").write_text(json.dumps(prior))
        prior = json.loads((run.path("it0/prior") / "prior.json").read_text())
    stage = f"it{t}/judge"
    if not run.done(stage):
        with run.stage(stage) as out:
            record = judge(pq.read_table(samples), pq.read_table(pairs), catalog, groups, cfg.ufo,
                           out, prior)
            log.info("judge (iteration %d): u = %s; SFT weights %s, pair weights %s", t,
                     {g: round(v, 3) for g, v in record["u"].items()},
                     record["sft_weight_range"], record["pair_weight_range"])
    return run.path(stage) / "samples.parquet", run.path(stage) / "negatives.parquet"


def verdict_stage(run: RunDir, t: int, current: dict, kept: dict, cfg: Config) -> dict:
    """Stage it<t>/verdict: keep π_t or revert to the last kept policy; stop or go on."""
    stage = f"it{t}/verdict"
    if not run.done(stage):
        with run.stage(stage) as out:
            first = json.loads((run.path("it0/eval/valid") / "row.json").read_text())
            result = verdict(first, kept, current, cfg.ufo)
            (out / "verdict.json").write_text(json.dumps(result, indent=1))
            log.info("verdict (iteration %d): %s", t, result)
    return json.loads((run.path(stage) / "verdict.json").read_text())
