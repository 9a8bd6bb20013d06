"""Evaluate a policy on a prepared split: generate → parse → ground → metrics (spec §4).

    evaluate(data_dir, "test", Policy(model_dir), cfg, out)   # writes predictions.parquet, metrics.json

`score` is the part after generation; it is what a reader needs to recompute: the
predictions table it writes holds everything `metrics_from_tables` needs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.atomic import atomic_dir
from recray.data.prompts import parse_title
from recray.errors import DataError, RecrayError
from recray.evaluate.grounding import Embedder, catalog_embeddings, rank_catalog
from recray.evaluate.metrics import KS, metrics_from_tables, recommendation_profile


TOPK = 20
PARSE_STATUSES = ("quoted", "cut", "line", "unparsable")


def read_prepared(data_dir: Path, split: str, limit: int | None = None
                  ) -> tuple[pa.Table, pa.Table, list[str]]:
    """(samples of the split, catalog, genre groups) of a `recray prepare` output."""
    data_dir = Path(data_dir)
    for required in (data_dir / split, data_dir / "catalog.parquet", data_dir / "groups.json"):
        if not required.exists():
            raise DataError(f"{required} is missing: is {data_dir} the output of `recray prepare`?")
    samples = pq.read_table(data_dir / split)
    if samples.num_rows == 0:
        raise DataError(f"{data_dir / split} holds no samples")
    if limit is not None:
        samples = samples.slice(0, limit)
    groups = json.loads((data_dir / "groups.json").read_text())["groups"]
    return samples, pq.read_table(data_dir / "catalog.parquet"), groups


def predictions_table(samples: pa.Table, item_ids: list, top: np.ndarray, ranks: np.ndarray,
                      answers: dict[str, pa.Array] | None = None) -> pa.Table:
    """The predictions contract: the sample's keys, what an LLM answered (if one did), the
    top-k catalog indices `top` as item ids, and the target's rank in the whole catalog."""
    ids = np.asarray(item_ids, dtype=object)
    return pa.table({
        **{c: samples.column(c) for c in ("sample_id", "user_id", "target_item_id", "history_item_ids")},
        **(answers or {}),
        "topk_item_ids": pa.array([ids[row].tolist() for row in top], pa.list_(pa.string())),
        "target_rank": pa.array(ranks, pa.int64()),
    })


def score(samples: pa.Table, answers: pa.Table, catalog: pa.Table, groups: list[str],
          embedder: Embedder, cache_dir: Path, ks=KS,
          item_scale: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """Parse each sample's first answer, rank the whole catalog for it, compute metrics.
    `item_scale`: a re-ranker's per-item distance factor (rank_catalog).

    An unparsable answer (nothing but whitespace) gets target rank = catalog size, a miss
    at every K; its top-K list is still the nearest items to the empty text, so the
    diversity metrics see what the model really recommended.
    """
    by_id = dict(zip(answers.column("sample_id").to_pylist(),
                     answers.column("candidates").to_pylist()))
    missing = [s for s in samples.column("sample_id").to_pylist() if not by_id.get(s)]
    if missing:
        raise RecrayError(f"{len(missing)} samples have no generated answer (first: {missing[0]})")
    texts = [by_id[s][0] for s in samples.column("sample_id").to_pylist()]
    parsed = [parse_title(t) for t in texts]

    item_ids = catalog.column("item_id").to_pylist()
    index = {item: i for i, item in enumerate(item_ids)}
    targets = samples.column("target_item_id").to_pylist()
    unknown = [t for t in targets if t not in index]
    if unknown:
        raise DataError(f"{len(unknown)} targets are not in the catalog (first: {unknown[0]})")
    item_emb = catalog_embeddings(embedder, catalog.column("title").to_pylist(), cache_dir)
    queries = [title if title is not None else text.strip() for (title, _), text in zip(parsed, texts)]
    top, ranks = rank_catalog(embedder.embed(queries), item_emb,
                              np.array([index[t] for t in targets]), topk=min(TOPK, len(item_ids)),
                              item_scale=item_scale)
    statuses = [status for _, status in parsed]
    ranks[np.array([s == "unparsable" for s in statuses])] = len(item_ids)

    predictions = predictions_table(samples, item_ids, top, ranks, {
        "generated_text": pa.array(texts, pa.string()),
        "parsed_title": pa.array([title for title, _ in parsed], pa.string()),
        "parse_status": pa.array(statuses, pa.string())})
    metrics = metrics_from_tables(predictions, catalog, groups, ks=ks)
    counts = Counter(statuses)
    metrics.update({f"parse_{s}": counts.get(s, 0) for s in PARSE_STATUSES})
    catalog_titles = set(catalog.column("title").to_pylist())
    metrics["exact_title_share"] = float(np.mean([t in catalog_titles for t, _ in parsed]))
    metrics.update(recommendation_profile(predictions, catalog))
    return predictions, metrics


def score_items(samples: pa.Table, item_scores: np.ndarray, catalog: pa.Table,
                groups: list[str], ks=KS) -> tuple[pa.Table, dict]:
    """`score` for a model that scores every catalog item (MostPop, Random, SASRec): row u
    of `item_scores` (samples x catalog items, catalog order) ranks the catalog for sample
    u, ties broken by catalog order; the predictions table has the same contract."""
    item_ids = catalog.column("item_id").to_pylist()
    if item_scores.shape != (samples.num_rows, len(item_ids)):
        raise RecrayError(f"item scores of shape {item_scores.shape} for {samples.num_rows} "
                          f"samples and {len(item_ids)} catalog items")
    index = {item: i for i, item in enumerate(item_ids)}
    targets = np.array([index[t] for t in samples.column("target_item_id").to_pylist()])
    order = np.argsort(-item_scores, axis=1, kind="stable")
    ranks = np.argsort(order, axis=1)[np.arange(len(targets)), targets]
    predictions = predictions_table(samples, item_ids, order[:, :min(TOPK, len(item_ids))], ranks)
    metrics = metrics_from_tables(predictions, catalog, groups, ks=ks)
    metrics.update(recommendation_profile(predictions, catalog))
    return predictions, metrics


def write_evaluation(output: Path, predictions: pa.Table, metrics: dict,
                     rerank_plan: dict | None = None) -> None:
    """The files appear together or not at all."""
    with atomic_dir(output) as staging:
        pq.write_table(predictions, staging / "predictions.parquet")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if rerank_plan is not None:
            (staging / "rerank.json").write_text(json.dumps(rerank_plan, indent=1))


def make_embedder(kind: str, policy=None) -> Embedder:
    """The grounding embedder named by config: the sentence model, or the policy LLM itself."""
    from recray.evaluate.grounding import HiddenStateEmbedder, SentenceEmbedder
    if kind == "sentence":
        from recray.assets import embedder_dir
        return SentenceEmbedder(embedder_dir())
    model, tokenizer = load_policy_model(policy.model, policy.adapter)
    return HiddenStateEmbedder(model, tokenizer)


def load_policy_model(model_dir: str, adapter: str | None = None):
    """The policy as one plain model in this process (adapter merged), for hidden states."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), tokenizer


def evaluate(data_dir: Path, split: str, policy, cfg, output: Path, limit: int | None = None,
             pool=None, rerank_plan: Path | None = None, prior=None) -> dict:
    """Generate one answer per prompt of `split` with `policy`, then `score` and write.
    With evaluate.rerank on, valid fits the re-ranker (written as rerank.json) and any
    other split applies the one in `rerank_plan` (that valid evaluation's rerank.json).
    `prior`: a recommender scoring every item (D3's SASRec), whose log-softmax guides
    decoding with weight evaluate.decoding.prior_weight."""
    from recray.assets import home
    from recray.generate import GenerationPool

    samples, catalog, groups = read_prepared(data_dir, split, limit)
    start = time.time()
    own_pool = pool is None
    pool = pool or GenerationPool(cfg.generate, policy.model)
    prompts = samples
    if prior is not None:
        scores = prior.scores(samples).astype(np.float64)
        log_prior = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
        prompts = samples.append_column("item_log_prior", pa.array(log_prior.tolist(),
                                                                   pa.list_(pa.float64())))
    try:
        answers = pool.generate(prompts, policy, cfg.evaluate.decoding, catalog_titles=(
            catalog.column("title").to_pylist() if cfg.generate.constrain_to_catalog else None))
    finally:
        if own_pool:
            pool.close()
    generated = time.time()
    embedder = make_embedder(cfg.evaluate.embedder, policy)
    def ground(scale=None):
        return score(samples, answers, catalog, groups, embedder, home() / "cache" / "embeddings",
                     item_scale=scale)

    predictions, metrics = ground()
    plan = None
    if cfg.evaluate.rerank.enabled:
        predictions, metrics, plan = rerank_predictions(
            ground, (predictions, metrics), catalog, cfg.evaluate.rerank,
            fit=split == "valid", plan_file=rerank_plan)
    metrics["split"] = split
    metrics["engine"] = pool.engine         # the backend that really generated, with version
    metrics["seconds_generate"] = round(generated - start, 1)
    metrics["seconds_score"] = round(time.time() - generated, 1)
    write_evaluation(output, predictions, metrics, plan if split == "valid" else None)
    return metrics


def rerank_predictions(ground, plain: tuple[pa.Table, dict], catalog: pa.Table, cfg, fit: bool,
                       plan_file: Path | None) -> tuple[pa.Table, dict, dict]:
    """IFairLRS re-ranking (recray.evaluate.rerank) of one evaluation. `ground(scale)`
    grounds and scores the answers with a distance scale. `fit` (valid): fit π and λ
    (and π's fixed-point rounds) here; else apply the plan in `plan_file`. The metrics keep
    the plain ranking's too."""
    from recray.evaluate import rerank
    if fit:
        categories = catalog.column("categories").to_pylist()
        penalty = rerank.item_penalty(rerank.group_unfairness(plain[1], cfg.k), categories)
        results = {0.0: plain, **{lam: ground(rerank.scale(penalty, lam))
                                  for lam in cfg.lambdas if lam != 0}}
        lam = rerank.choose_lambda({k: m for k, (_, m) in results.items()}, cfg.k, cfg.ndcg_guard)
        watched = ("HR@5", "NDCG@5", "DivRatio@5", f"MGU@{cfg.k}")
        predictions, metrics = results[lam]
        rounds = [{w: metrics[w] for w in watched}]
        while lam and len(rounds) < cfg.rounds:
            more = penalty + rerank.item_penalty(rerank.group_unfairness(metrics, cfg.k),
                                                 categories)
            again = ground(rerank.scale(more, lam))
            if not rerank.round_helps(again[1], metrics, plain[1], cfg.k, cfg.ndcg_guard):
                break
            penalty, (predictions, metrics) = more, again
            rounds.append({w: metrics[w] for w in watched})
        plan = {"lambda": lam, "k": cfg.k, "ndcg_guard": cfg.ndcg_guard, "estimated_on": "valid",
                "penalty": dict(zip(map(str, catalog.column("item_id").to_pylist()),
                                    penalty.tolist())),
                "sweep": [{"lambda": k, **{w: m[w] for w in watched}}
                          for k, (_, m) in sorted(results.items())],
                "rounds": rounds}
    else:
        if plan_file is None or not Path(plan_file).exists():
            raise RecrayError(f"evaluate.rerank: {plan_file} is missing: the valid split is "
                              f"evaluated first and fits the re-ranker (evaluate.splits=[valid, test])")
        plan = json.loads(Path(plan_file).read_text())
        penalty = np.array([plan["penalty"][str(i)] for i in catalog.column("item_id").to_pylist()])
        predictions, metrics = (ground(rerank.scale(penalty, plan["lambda"]))
                                if plan["lambda"] else plain)
    metrics = {**metrics, "rerank": {"lambda": plan["lambda"], "k": plan["k"],
                                     "plain": {k: v for k, v in plain[1].items()
                                               if isinstance(v, float) and "/" not in k}}}
    return predictions, metrics, plan


def metrics_table(metrics: dict, ks=(1, 5)) -> str:
    """The headline numbers as a small aligned table (what `recray evaluate` prints)."""
    names = ("HR", "NDCG", "DivRatio", "ORRatio", "MGU", "DGU")
    head = "K   " + "".join(f"{n:>10s}" for n in names)
    rows = [f"{k:<4d}" + "".join(f"{metrics[f'{n}@{k}']:>10.4f}" for n in names) for k in ks]
    parse = ", ".join(f"{s} {metrics[f'parse_{s}']}" for s in PARSE_STATUSES)
    return "\n".join([head, *rows, f"n = {metrics['n_samples']}; parsed: {parse}"])
