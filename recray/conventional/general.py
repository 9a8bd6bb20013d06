"""BiFair's general-recommendation data (seed 003 [003:L220]; seed-methods.md §4.4-4.5 B):
the interactions with rating >= min_rating, users with >= min_user_interactions of them,
each user's items split at random 4:3:3 into train/valid/test, valid and test items that
no user has in train dropped. Read with Ray Data from the same loader as `recray prepare`;
every row filtered out is counted by reason in stats.json.

    general_split(source, catalog, cfg.bifair, out, seed)   # out/{train,valid,test}.parquet (user_id, item_id),
                                                      # out/catalog.parquet (train_count of this train split)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recray.config import BifairConfig
from recray.errors import DataError
from recray.generate.seeding import keyed_rng

SPLITS = ("train", "valid", "test")
FRACTIONS = (0.4, 0.3, 0.3)


def _usable(batch: pa.Table, items: pa.Array, min_rating: float) -> pa.Table:
    """Each row with the reason it is unusable (null: usable), in one vectorised pass."""
    reason = pc.if_else(pc.is_null(batch.column("drop_reason")), pa.scalar(None, pa.string()),
                        pa.scalar("bad_row"))
    known = pc.is_in(batch.column("item_id"), value_set=items)
    reason = pc.if_else(pc.and_(pc.is_null(reason), pc.invert(known)), "item_not_in_catalog", reason)
    rated = pc.fill_null(pc.greater_equal(batch.column("rating"), min_rating), False)
    reason = pc.if_else(pc.and_(pc.is_null(reason), pc.invert(rated)), "rating_below_min", reason)
    return pa.table({"user_id": batch.column("user_id"), "item_id": batch.column("item_id"),
                     "timestamp": batch.column("timestamp"), "reason": reason})


def _split_user(user: str, items: list[str], seed: int) -> list[int]:
    """0/1/2 per item of one user: a seeded shuffle cut 4:3:3 (the user's own seed, so the
    split of one user never depends on the others)."""
    order = keyed_rng(seed, f"general:{user}").permutation(len(items))
    cut_train = int(round(len(items) * FRACTIONS[0]))
    cut_valid = int(round(len(items) * (FRACTIONS[0] + FRACTIONS[1])))
    split = np.empty(len(items), dtype=np.int8)
    split[order[:cut_train]], split[order[cut_train:cut_valid]], split[order[cut_valid:]] = 0, 1, 2
    return split.tolist()


def general_split(source, catalog: pa.Table, cfg: BifairConfig, out: Path, seed: int) -> dict:
    """`seed`: the split's (data.seed), so that models of several seeds share one split."""
    import ray
    rows = source.interactions.map_batches(
        _usable, batch_format="pyarrow",
        fn_kwargs={"items": catalog.column("item_id").combine_chunks(), "min_rating": cfg.min_rating})
    table = pa.concat_tables(ray.get(rows.to_arrow_refs()))
    counts = {"read": table.num_rows}
    reasons = table.column("reason").value_counts().to_pylist()
    counts.update({f"dropped_{r['values']}": r["counts"] for r in reasons if r["values"] is not None})
    table = table.filter(pc.is_null(table.column("reason"))).sort_by(
        [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")])
    users, items = table.column("user_id").to_pylist(), table.column("item_id").to_pylist()
    per_user: dict[str, dict[str, None]] = {}     # insertion-ordered sets
    for user, item in zip(users, items):
        per_user.setdefault(user, {})[item] = None   # a re-rating: its first rating counts
    per_user = {u: list(its) for u, its in per_user.items()}
    counts["dropped_duplicate"] = len(users) - sum(len(its) for its in per_user.values())
    short = {u for u, its in per_user.items() if len(its) < cfg.min_user_interactions}
    counts["dropped_short_user"] = sum(len(per_user[u]) for u in short)
    counts["users_dropped_short"] = len(short)
    split_rows: dict[int, list[tuple[str, str]]] = {0: [], 1: [], 2: []}
    for user in sorted(set(per_user) - short):
        for item, s in zip(per_user[user], _split_user(user, per_user[user], seed)):
            split_rows[s].append((user, item))
    in_train = {item for _, item in split_rows[0]}
    for s, name in ((1, "valid"), (2, "test")):
        kept = [(u, i) for u, i in split_rows[s] if i in in_train]
        counts[f"dropped_{name}_item_not_in_train"] = len(split_rows[s]) - len(kept)
        split_rows[s] = kept
    if not split_rows[0]:
        raise DataError(f"general protocol: no user has {cfg.min_user_interactions} interactions "
                        f"rated >= {cfg.min_rating} (bifair.min_user_interactions, bifair.min_rating)")
    out.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(SPLITS):
        pq.write_table(pa.table({"user_id": pa.array([u for u, _ in split_rows[s]], pa.string()),
                                 "item_id": pa.array([i for _, i in split_rows[s]], pa.string())}),
                       out / f"{name}.parquet")
        counts[f"{name}_interactions"] = len(split_rows[s])
        counts[f"{name}_users"] = len({u for u, _ in split_rows[s]})
    train_counts = pc.value_counts(pa.array([i for _, i in split_rows[0]])).to_pylist()
    by_item = {c["values"]: c["counts"] for c in train_counts}
    general_catalog = catalog.set_column(
        catalog.column_names.index("train_count"), "train_count",
        pa.array([by_item.get(i, 0) for i in catalog.column("item_id").to_pylist()], pa.int64()))
    pq.write_table(general_catalog, out / "catalog.parquet")
    (out / "stats.json").write_text(json.dumps(counts, indent=1))
    return counts


def read_general(folder: Path, split: str) -> dict[str, list[str]]:
    """user id -> that user's items in `split`."""
    table = pq.read_table(Path(folder) / f"{split}.parquet")
    out: dict[str, list[str]] = {}
    for user, item in zip(table.column("user_id").to_pylist(), table.column("item_id").to_pylist()):
        out.setdefault(user, []).append(item)
    return out
