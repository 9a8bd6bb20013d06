"""Runs of the LLM-enhanced recommenders of recray.conventional.bifair under both protocols
of seed-methods.md §4.5: what the users, positives and valid rows are, the Ray task that
trains, the trained model as a recommender, and the general protocol's evaluation.

    sequential: users are prompt samples (a history of data.history_len items) of the WHOLE
                train split; valid/test are the prepared subsets every recray method uses,
                scored by recray.conventional.evaluate like SASRec.
    general:    users are users with their train items; valid/test are their held-out
                items, ranked against the catalog less the items the user is known to have.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recray.config import Config
from recray.conventional.bifair import (META, VARIANTS, WEIGHTS, Bags, Encoder, EvalRows, Positives,
                                        item_scores, normalized_graph, projector, top_items, train)
from recray.conventional.general import read_general
from recray.evaluate.evaluate import write_evaluation
from recray.evaluate.metrics import POPULAR, general_metrics_from_tables, popularity_groups


log = logging.getLogger(__name__)

GENERAL_MOSTPOP = "mostpop-general"


def membership(catalog: pa.Table, groups: list[str], kind: str) -> tuple[torch.Tensor, list[str]]:
    """(items x groups) 0/1 and the group names: popularity (top 10% by the catalog's
    train_count) or the genre groups of groups.json."""
    item_ids = catalog.column("item_id").to_pylist()
    if kind == "pop":
        pop = popularity_groups(item_ids, catalog.column("train_count").to_numpy())
        names = [POPULAR, "unpopular"]
        cats = [[pop[i]] for i in item_ids]
    else:
        names, cats = groups, catalog.column("categories").to_pylist()
    column = {g: j for j, g in enumerate(names)}
    out = torch.zeros(len(item_ids), len(names))
    for row, mine in enumerate(cats):
        for g in mine or ():
            if g in column:
                out[row, column[g]] = 1.0
    return out, names


def _indices(lists: list[list[str]], index: dict[str, int]) -> list[list[int]]:
    return [[index[i] for i in row] for row in lists]


def sequential_problem(train_split: Path, prepared: Path, index: dict[str, int], member: torch.Tensor):
    """Train rows: every train-split sample; valid rows appended after them."""
    train_samples, valid = pq.read_table(train_split / "train"), pq.read_table(prepared / "valid")
    histories = _indices(train_samples.column("history_item_ids").to_pylist(), index)
    valid_histories = _indices(valid.column("history_item_ids").to_pylist(), index)
    targets = [index[t] for t in train_samples.column("target_item_id").to_pylist()]
    bags = Bags.of(histories + valid_histories)
    valid_rows = EvalRows(torch.arange(len(histories), len(histories) + len(valid_histories)),
                          [[index[t]] for t in valid.column("target_item_id").to_pylist()],
                          [[] for _ in valid_histories])
    return (bags, None), Positives.of(list(range(len(targets))), targets, member), valid_rows


def general_problem(general: Path, index: dict[str, int], member: torch.Tensor):
    train_items = read_general(general, "train")
    known = _indices([train_items[u] for u in sorted(train_items)], index)
    rows = [r for r, items in enumerate(known) for _ in items]
    positives = Positives.of(rows, [i for items in known for i in items], member)
    return (Bags.of(known), known), positives, general_rows(general, "valid", train_items, index)


def general_rows(general: Path, split: str, train_items: dict[str, list[str]],
                 index: dict[str, int]) -> EvalRows:
    """The users (rows in sorted order of `train_items`) with items in `split`; masked: their
    train items (and valid ones for test)."""
    held_out = read_general(general, split)
    masked = [train_items] + ([read_general(general, "valid")] if split == "test" else [])
    users = sorted(train_items)
    row_of = {u: r for r, u in enumerate(users)}
    chosen = [u for u in users if u in held_out]
    return EvalRows(torch.tensor([row_of[u] for u in chosen]),
                    _indices([held_out[u] for u in chosen], index),
                    _indices([[i for m in masked for i in m.get(u, [])] for u in chosen], index))


def item_embeddings(cfg: Config, titles: list[str]) -> np.ndarray:
    """Z_0: the titles' embeddings (cached like the grounding's)."""
    from recray.assets import embedder_dir, home, model_dir
    from recray.evaluate.grounding import HiddenStateEmbedder, SentenceEmbedder, catalog_embeddings
    if cfg.bifair.embedder == "sentence":
        embedder = SentenceEmbedder(embedder_dir())
    else:
        from recray.evaluate.evaluate import load_policy_model
        embedder = HiddenStateEmbedder(*load_policy_model(cfg.loop.base_model or str(model_dir())))
    return catalog_embeddings(embedder, titles, home() / "cache" / "embeddings")


def train_model(method: str, cfg: Config, prepared: Path, data: Path, out: Path) -> dict:
    """Train `method` on `data` (the whole train split, or the general split) and write it."""
    catalog = pq.read_table(data / "catalog.parquet")
    groups = json.loads((prepared / "groups.json").read_text())["groups"]
    item_ids = catalog.column("item_id").to_pylist()
    index = {item: i for i, item in enumerate(item_ids)}
    member, names = membership(catalog, groups, cfg.bifair.groups)
    if cfg.bifair.protocol == "general":
        parts, positives, valid = general_problem(data, index, member)
    else:
        parts, positives, valid = sequential_problem(data, prepared, index, member)
    z0 = item_embeddings(cfg, catalog.column("title").to_pylist())
    record = train(method, z0, parts, positives, valid, cfg.bifair, out)
    (out / META).write_text(json.dumps({**record, "item_ids": item_ids, "groups": names,
                                        "embedding_dim": int(z0.shape[1])}))
    return {k: v for k, v in record.items() if k != "curve"}


def fit(method: str, cfg: Config, prepared: Path, data: Path, out: Path) -> dict:
    """`train_model` as a Ray task (one CPU), like SASRec's."""
    import ray
    return ray.get(ray.remote(num_cpus=1)(train_model).remote(method, cfg, Path(prepared),
                                                              Path(data), Path(out)))


class Trained:
    """A trained model as a recommender: per-item scores for prompt samples (sequential)
    or for the users of a general split."""

    def __init__(self, folder: Path, cfg: Config):
        from safetensors.torch import load_file
        record = json.loads((Path(folder) / META).read_text())
        weights = load_file(str(Path(folder) / WEIGHTS))
        self.module = projector(cfg.bifair, record["embedding_dim"])
        self.module.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items()
                                     if k.startswith("projector.")})
        self.z, self.cfg = weights["items"], cfg.bifair
        self.index = {item: i for i, item in enumerate(record["item_ids"])}
        self.params = dict(self.module.named_parameters())

    def scores(self, samples: pa.Table) -> np.ndarray:
        bags = Bags.of(_indices(samples.column("history_item_ids").to_pylist(), self.index))
        with torch.no_grad():
            return item_scores(Encoder(self.module, bags, None, 0), self.params, self.z, None).numpy()

    def general_scores(self, train_items: dict[str, list[str]], rows: EvalRows) -> torch.Tensor:
        known = _indices([train_items[u] for u in sorted(train_items)], self.index)
        graph = normalized_graph(known, len(self.z)) if self.cfg.graph_layers else None
        encoder = Encoder(self.module, Bags.of(known), graph, self.cfg.graph_layers)
        with torch.no_grad():
            return item_scores(encoder, self.params, self.z, rows.rows)


class GeneralMostPop:
    """MostPop under the general protocol: the items by this split's train count, each
    user's known items masked (the reference row BiFair's table is read against)."""

    def __init__(self, general: Path):
        catalog = pq.read_table(general / "catalog.parquet")
        self.index = {item: i for i, item in enumerate(catalog.column("item_id").to_pylist())}
        self.counts = torch.tensor(catalog.column("train_count").to_numpy(), dtype=torch.float32)

    def general_scores(self, train_items: dict[str, list[str]], rows: EvalRows) -> torch.Tensor:
        return self.counts.repeat(len(rows.rows), 1)


def evaluate_general(trained: Trained | GeneralMostPop, general: Path, prepared: Path, split: str,
                     output: Path, about: dict | None = None, topk: int = 20) -> dict:
    """Rank the catalog for every user with items in `split` (its known items masked) and
    score it with the multi-target metrics; the same file contract plus target_item_ids."""
    catalog = pq.read_table(general / "catalog.parquet")
    groups = json.loads((prepared / "groups.json").read_text())["groups"]
    item_ids = np.asarray(catalog.column("item_id").to_pylist(), dtype=object)
    train_items = read_general(general, "train")
    users = sorted(train_items)
    rows = general_rows(general, split, train_items, trained.index)
    start = time.time()
    top = top_items(trained.general_scores(train_items, rows), rows, topk)
    chosen = [users[r] for r in rows.rows.tolist()]
    predictions = pa.table({
        "user_id": pa.array(chosen, pa.string()),
        "history_item_ids": pa.array([item_ids[m].tolist() for m in rows.masked], pa.list_(pa.string())),
        "target_item_ids": pa.array([item_ids[t].tolist() for t in rows.targets], pa.list_(pa.string())),
        "topk_item_ids": pa.array([item_ids[t].tolist() for t in top], pa.list_(pa.string())),
    })
    metrics = general_metrics_from_tables(predictions, catalog, groups)
    metrics.update({"split": split, "seconds_score": round(time.time() - start, 1), **(about or {})})
    write_evaluation(output, predictions, metrics)
    return metrics


def evaluator(method: str, run, cfg: Config, prepared: Path):
    """The loop's evaluator for `method`: its training data (stage it0/data: the whole train
    split, or the general split) and model (it0/model) made once, then (split, out) -> metrics."""
    from recray.conventional.evaluate import evaluate_recommender
    from recray.conventional.general import general_split
    from recray.data.loaders import load
    from recray.data.prepare import prepare
    from recray.tracking import track
    general = cfg.bifair.protocol == "general" or method == GENERAL_MOSTPOP
    if not run.done("it0/data"):
        with run.stage("it0/data") as out:
            if general:
                stats = general_split(load(cfg.data), pq.read_table(prepared / "catalog.parquet"),
                                      cfg.bifair, out, cfg.data.seed)
            else:       # every train-split sample: the subsets stay those of `prepared`
                stats = prepare(load(cfg.data), cfg.data.model_copy(update={"n_train": 10 ** 12}),
                                out, overwrite=True)["samples"]
            log.info("%s training data (%s protocol): %s", method, cfg.bifair.protocol, stats)
    data = run.path("it0/data")
    if method == GENERAL_MOSTPOP:
        return lambda split, out: evaluate_general(GeneralMostPop(data), data, prepared, split, out,
                                                   {"protocol": "general"})
    if not run.done("it0/model"):
        with run.stage("it0/model") as out:
            log.info("%s trained: %s", method, fit(method, cfg, prepared, data, out))
            for entry in json.loads((out / META).read_text())["curve"]:    # TensorBoard, MLflow
                track(cfg, run.root, entry, entry["epoch"], "fit")
    trained = Trained(run.path("it0/model"), cfg)
    about = {"protocol": cfg.bifair.protocol, "projector": cfg.bifair.projector,
             "trained_on": "general train split" if general else "whole train split"}
    if VARIANTS[method].weighting != "mean":       # the groups change the model
        about["groups_trained"] = cfg.bifair.groups
    if general:
        return lambda split, out: evaluate_general(trained, data, prepared, split, out, about)
    return lambda split, out: evaluate_recommender(prepared, split, trained, out, cfg.evaluate.limit,
                                                   about=about)
