"""Interaction log → prompt datasets, on Ray Data (spec §1).

    raw files ─load─▶ canonical rows ─groupby(user)─▶ one row per user (counts + packed samples)
      ─explode─▶ samples ─chronological 8:1:1 split─▶ seeded subsets ─▶ prompts ─▶ Parquet

Everything per user happens in one `map_groups` call, so every count in stats.json
(bad rows, unknown items, empty titles, duplicates, short users) comes from the
same pass that builds the samples, and nothing is dropped without being counted.
The output is a pure function of the input and the seed: subsets are chosen by a
keyed hash of each sample id, never by block order.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.prompts import build_completion, build_prompt
from recray.errors import DataError, RecrayError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MAX_EXAMPLES = 5   # example lines kept per drop reason in stats.json

USER_ROW = pa.schema([
    ("user_id", pa.string()),
    ("n_raw", pa.int64()),
    ("n_bad_row", pa.int64()),
    ("n_unknown_item", pa.int64()),
    ("n_empty_title", pa.int64()),
    ("n_duplicate", pa.int64()),
    ("n_valid", pa.int64()),
    ("examples", pa.list_(pa.string())),      # "reason: file line N" for the first drops
    ("target_item_id", pa.list_(pa.string())),
    ("target_time", pa.list_(pa.int64())),
    ("history_item_ids", pa.list_(pa.list_(pa.string()))),
    ("position", pa.list_(pa.int64())),
])

SAMPLE = pa.schema([
    ("sample_id", pa.string()),
    ("user_id", pa.string()),
    ("history_item_ids", pa.list_(pa.string())),
    ("target_item_id", pa.string()),
    ("target_time", pa.int64()),
])


# ---------------------------------------------------------------- catalog

def clean_catalog(catalog: pa.Table) -> tuple[pa.Table, dict]:
    """Items with an id and a non-empty title, first occurrence of each id kept."""
    ids = catalog.column("item_id").to_pylist()
    titles = catalog.column("title").to_pylist()
    keep, seen, stats = [], set(), Counter()
    for i, (item, title) in enumerate(zip(ids, titles)):
        if item in seen:
            stats["catalog_duplicate_item_id"] += 1
        elif title is None or not str(title).strip():
            stats["catalog_empty_title"] += 1
            seen.add(item)
        else:
            keep.append(i)
            seen.add(item)
    return catalog.take(pa.array(keep, pa.int64())), dict(stats)


# ---------------------------------------------------------------- per user

OK, BAD_ROW, EMPTY_TITLE, UNKNOWN_ITEM = 0, 1, 2, 3
_STATUS_TEXT = {BAD_ROW: "bad row", EMPTY_TITLE: "item has an empty title",
                UNKNOWN_ITEM: "item not in catalog"}


def _classify(rows: pa.Table, valid_items: pa.Array, empty_title_items: pa.Array) -> pa.Table:
    """Tag each raw row with why it is unusable (vectorised, per block, before the shuffle)."""
    status = np.full(rows.num_rows, OK, dtype=np.int8)
    unknown = ~pc.is_in(rows.column("item_id"), value_set=valid_items).to_numpy(zero_copy_only=False)
    status[unknown] = UNKNOWN_ITEM
    empty = pc.is_in(rows.column("item_id"), value_set=empty_title_items).to_numpy(zero_copy_only=False)
    status[empty] = EMPTY_TITLE
    status[pc.is_valid(rows.column("drop_reason")).to_numpy(zero_copy_only=False)] = BAD_ROW
    rows = rows.set_column(rows.schema.get_field_index("user_id"), "user_id",
                           pc.fill_null(rows.column("user_id"), ""))
    return rows.append_column("status", pa.array(status, pa.int8()))


def _drop_examples(rows: pa.Table, status: np.ndarray) -> list[str]:
    idx = np.flatnonzero(status != OK)[:MAX_EXAMPLES]
    out = []
    for i in idx.tolist():
        if status[i] == BAD_ROW:
            out.append(rows.column("drop_reason")[i].as_py())
        else:
            out.append(f"{_STATUS_TEXT[status[i]]}: {rows.column('source_file')[i].as_py()} "
                       f"line {rows.column('source_line')[i].as_py()}")
    return out


def _user_rows(rows: pa.Table, min_interactions: int, history_len: int) -> pa.Table:
    """One output row per user: counts of what was dropped and why, and the user's samples."""
    status = rows.column("status").to_numpy()
    examples = _drop_examples(rows, status)
    ok = np.flatnonzero(status == OK)
    items = rows.column("item_id").to_numpy(zero_copy_only=False)[ok]
    times = rows.column("timestamp").to_numpy(zero_copy_only=False)[ok].astype(np.int64)
    lines = rows.column("source_line").to_numpy(zero_copy_only=False)[ok]
    files = rows.column("source_file").to_numpy(zero_copy_only=False)[ok]
    order = np.lexsort((lines, files, items, times))   # time, then item id (spec §1.3)
    items, times = items[order], times[order]
    # Sorted by (time, item), exact duplicates are neighbours; keep the first.
    dup = np.zeros(len(items), dtype=bool)
    dup[1:] = (items[1:] == items[:-1]) & (times[1:] == times[:-1])
    if dup.any() and len(examples) < MAX_EXAMPLES:
        first = ok[order][np.flatnonzero(dup)[0]]
        examples.append(f"duplicate (user, item, timestamp): {files[order][dup][0]} "
                        f"line {rows.column('source_line')[int(first)].as_py()}")
    items, times = items[~dup].tolist(), times[~dup].tolist()
    positions = list(range(1, len(items))) if len(items) >= min_interactions else []
    return pa.Table.from_pylist([{
        "user_id": rows.column("user_id")[0].as_py(), "n_raw": rows.num_rows,
        "n_bad_row": int((status == BAD_ROW).sum()),
        "n_unknown_item": int((status == UNKNOWN_ITEM).sum()),
        "n_empty_title": int((status == EMPTY_TITLE).sum()),
        "n_duplicate": int(dup.sum()), "n_valid": len(items), "examples": examples,
        "target_item_id": [items[p] for p in positions],
        "target_time": [times[p] for p in positions],
        "history_item_ids": [items[max(0, p - history_len):p] for p in positions],
        "position": positions,
    }], schema=USER_ROW)


def _explode_samples(users: pa.Table) -> pa.Table:
    lengths = pc.list_value_length(users.column("position")).to_numpy(zero_copy_only=False)
    user_ids = np.repeat(np.asarray(users.column("user_id").to_pylist(), dtype=object), lengths)
    positions = pc.list_flatten(users.column("position")).to_numpy(zero_copy_only=False)
    return pa.table({
        "sample_id": pa.array([f"{u}:{p}" for u, p in zip(user_ids, positions)], pa.string()),
        "user_id": pa.array(user_ids, pa.string()),
        "history_item_ids": pc.list_flatten(users.column("history_item_ids")),
        "target_item_id": pc.list_flatten(users.column("target_item_id")),
        "target_time": pc.list_flatten(users.column("target_time")),
    }, schema=SAMPLE)


# ---------------------------------------------------------------- split + subsets

def sample_hash(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """A keyed 64-bit hash per sample id: the seeded order subsets are drawn in."""
    key = f"{seed:016d}"[-16:]
    return pd.util.hash_array(np.asarray(sample_ids, dtype=object), hash_key=key,
                              categorize=False)


def assign_splits(times: np.ndarray, sample_ids: np.ndarray,
                  fractions: tuple[float, float, float]) -> np.ndarray:
    """0/1/2 for train/valid/test: samples ordered by (target time, sample id), cut 8:1:1."""
    order = np.lexsort((sample_ids, times))
    n = len(order)
    cut_train = int(round(n * fractions[0]))
    cut_valid = int(round(n * (fractions[0] + fractions[1])))
    split = np.empty(n, dtype=np.int8)
    split[order[:cut_train]] = 0
    split[order[cut_train:cut_valid]] = 1
    split[order[cut_valid:]] = 2
    return split


def choose_subset(hashes: np.ndarray, in_split: np.ndarray, size: int) -> np.ndarray:
    """Indices of the `size` samples of a split with the smallest hash (all when fewer)."""
    idx = np.flatnonzero(in_split)
    if len(idx) > size:
        idx = idx[np.argsort(hashes[idx], kind="stable")[:size]]
    return idx


# ---------------------------------------------------------------- groups

def choose_groups(train_targets: list[str], item_categories: dict[str, list[str]],
                  n_groups: int, exclude: list[str]) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Top categories among train targets, with no category nested in another (spec §1.6)."""
    target_counts = Counter(train_targets)
    freq: Counter = Counter()
    members: dict[str, set] = {}
    for item, count in target_counts.items():
        for cat in set(item_categories.get(item, [])):
            freq[cat] += count
            members.setdefault(cat, set()).add(item)
    n_items = len(target_counts)
    excluded = {e.lower() for e in exclude}
    chosen: list[str] = []
    dropped: dict[str, str] = {}
    for cat, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) == n_groups:
            break
        if cat.lower() in excluded:
            dropped[cat] = "excluded by data.exclude_categories"
        elif len(members[cat]) >= 0.9 * n_items and n_items > 1:
            dropped[cat] = f"carried by {len(members[cat])}/{n_items} train target items (a root)"
        else:
            parent = next((g for g in chosen
                           if len(members[cat] & members[g]) >= 0.95 * len(members[cat])), None)
            if parent is not None:
                dropped[cat] = f"nested in '{parent}' (>=95% of its items)"
            else:
                chosen.append(cat)
    return chosen, dropped, dict(freq)


# ---------------------------------------------------------------- the pipeline

def _collect_users(source: Source, catalog: pa.Table, empty_title_items: pa.Array,
                   cfg: DataConfig) -> ray.data.Dataset:
    classified = source.interactions.map_batches(
        _classify, batch_format="pyarrow",
        fn_kwargs={"valid_items": catalog.column("item_id").combine_chunks(),
                   "empty_title_items": empty_title_items})
    return classified.groupby("user_id").map_groups(
        _user_rows, batch_format="pyarrow",
        fn_kwargs={"min_interactions": cfg.min_interactions,
                   "history_len": cfg.history_len}).materialize()


def prepare(source: Source, cfg: DataConfig, output: Path, overwrite: bool = False) -> dict:
    """Run spec §1 on `source` and write the prepared dataset to `output` atomically."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise RecrayError(f"{output} already exists: choose another --output or pass --overwrite")
    start = time.time()
    catalog, catalog_drops = clean_catalog(source.catalog)
    all_ids = set(source.catalog.column("item_id").to_pylist())
    empty_title_items = pa.array(sorted(all_ids - set(catalog.column("item_id").to_pylist())),
                                 pa.string())

    users = _collect_users(source, catalog, empty_title_items, cfg)
    user_stats = pa.concat_tables(ray.get(users.select_columns(
        ["n_raw", "n_bad_row", "n_unknown_item", "n_empty_title", "n_duplicate", "n_valid"]
    ).to_arrow_refs()))
    totals = {name: int(pc.sum(user_stats.column(name)).as_py() or 0)
              for name in user_stats.column_names}
    n_valid = user_stats.column("n_valid").to_numpy()
    kept_users = int((n_valid >= cfg.min_interactions).sum())
    if kept_users == 0:
        raise DataError(f"no user has {cfg.min_interactions} usable interactions "
                        f"(data.min_interactions); {len(n_valid)} users, at most "
                        f"{int(n_valid.max()) if len(n_valid) else 0} each")
    examples = [e for b in users.select_columns(["examples"]).iter_batches(batch_format="pyarrow")
                for e in pc.list_flatten(b.column("examples")).to_pylist()][:4 * MAX_EXAMPLES]

    samples = users.map_batches(_explode_samples, batch_format="pyarrow").materialize()
    keys = pa.concat_tables(ray.get(samples.select_columns(
        ["sample_id", "target_time"]).to_arrow_refs()))
    sample_ids = keys.column("sample_id").to_numpy(zero_copy_only=False)
    split = assign_splits(keys.column("target_time").to_numpy(), sample_ids, cfg.split)
    hashes = sample_hash(sample_ids, cfg.seed)
    sizes = dict(zip(SPLITS, (cfg.n_train, cfg.n_valid, cfg.n_test)))
    chosen = {name: set(sample_ids[choose_subset(hashes, split == i, sizes[name])])
              for i, name in enumerate(SPLITS)}
    train_ids = pa.array(sample_ids[split == 0], pa.string())

    train_target_items = _train_target_items(samples, train_ids)
    item_categories = dict(zip(catalog.column("item_id").to_pylist(),
                               catalog.column("categories").to_pylist()))
    groups, dropped_groups, group_freq = choose_groups(
        train_target_items, item_categories, cfg.n_groups, cfg.exclude_categories)

    train_counts = Counter(train_target_items)
    catalog = catalog.append_column("train_count", pa.array(
        [train_counts.get(i, 0) for i in catalog.column("item_id").to_pylist()], pa.int64()))
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    subsets = {name: _with_prompts(_take(samples, chosen[name]), titles, cfg.noun)
               for name in SPLITS}

    stats = {
        "files": source.files,
        "loader_dropped": source.dropped,
        "catalog": {"items_in": source.catalog.num_rows, "items_kept": catalog.num_rows,
                    **catalog_drops},
        "interactions": {
            "read": totals["n_raw"],
            "dropped_bad_row": totals["n_bad_row"],
            "dropped_item_not_in_catalog": totals["n_unknown_item"],
            "dropped_item_empty_title": totals["n_empty_title"],
            "dropped_duplicate": totals["n_duplicate"],
            "valid": totals["n_valid"],
            "dropped_short_user": int(n_valid[n_valid < cfg.min_interactions].sum()),
            "used": int(n_valid[n_valid >= cfg.min_interactions].sum()),
        },
        "users": {"seen": len(n_valid), "kept": kept_users,
                  "dropped_fewer_than_min_interactions": len(n_valid) - kept_users},
        "samples": {"total": len(sample_ids),
                    "skipped_empty_history": kept_users,
                    **{f"{name}_split": int((split == i).sum()) for i, name in enumerate(SPLITS)},
                    **{f"{name}_subset": subsets[name].num_rows for name in SPLITS}},
        "groups": {"chosen": groups, "dropped": dropped_groups},
        "drop_examples": examples,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.time() - start, 1),
    }
    _write(output, subsets, catalog, groups, dropped_groups, group_freq, stats)
    return stats


def _train_target_items(samples: ray.data.Dataset, train_ids: pa.Array) -> list[str]:
    def keep_train(t: pa.Table) -> pa.Table:
        return t.filter(pc.is_in(t.column("sample_id"), value_set=train_ids)).select(["target_item_id"])
    parts = samples.map_batches(keep_train, batch_format="pyarrow").to_arrow_refs()
    return pa.concat_tables(ray.get(parts)).column("target_item_id").to_pylist()


def _take(samples: ray.data.Dataset, ids: set[str]) -> pa.Table:
    wanted = pa.array(sorted(ids), pa.string())
    parts = samples.map_batches(
        lambda t: t.filter(pc.is_in(t.column("sample_id"), value_set=wanted)),
        batch_format="pyarrow").to_arrow_refs()
    table = pa.concat_tables(ray.get(parts), promote_options="default")
    # Block order varies with parallelism; this order does not.
    order = pc.sort_indices(table, sort_keys=[("target_time", "ascending"),
                                              ("sample_id", "ascending")])
    return table.take(order)


def _with_prompts(samples: pa.Table, titles: dict[str, str], noun: str) -> pa.Table:
    histories = samples.column("history_item_ids").to_pylist()
    history_titles = [[titles[i] for i in h] for h in histories]
    target_titles = [titles[i] for i in samples.column("target_item_id").to_pylist()]
    return (samples
            .append_column("history_titles", pa.array(history_titles, pa.list_(pa.string())))
            .append_column("target_title", pa.array(target_titles, pa.string()))
            .append_column("prompt", pa.array([build_prompt(h, noun) for h in history_titles]))
            .append_column("completion", pa.array([build_completion(t) for t in target_titles])))


def _write(output: Path, subsets: dict[str, pa.Table], catalog: pa.Table, groups: list[str],
           dropped_groups: dict, group_freq: dict, stats: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        for name, table in subsets.items():
            (staging / name).mkdir()
            pq.write_table(table, staging / name / "part-00000.parquet")
        pq.write_table(catalog, staging / "catalog.parquet")
        (staging / "groups.json").write_text(json.dumps({
            "groups": groups, "dropped": dropped_groups,
            "train_target_frequency": {g: group_freq[g] for g in groups}}, indent=1))
        (staging / "stats.json").write_text(json.dumps(stats, indent=1))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def summary_table(stats: dict) -> str:
    """The human-readable end of `recray prepare`."""
    i, u, s = stats["interactions"], stats["users"], stats["samples"]
    rows = [
        ("interactions read", i["read"]),
        ("  dropped: bad row", i["dropped_bad_row"]),
        ("  dropped: item not in catalog", i["dropped_item_not_in_catalog"]),
        ("  dropped: item has empty title", i["dropped_item_empty_title"]),
        ("  dropped: duplicate (user, item, time)", i["dropped_duplicate"]),
        ("  dropped: user below min_interactions", i["dropped_short_user"]),
        ("interactions used", i["used"]),
        ("users kept / seen", f"{u['kept']} / {u['seen']}"),
        ("catalog items kept / read", f"{stats['catalog']['items_kept']} / {stats['catalog']['items_in']}"),
        ("samples (train / valid / test split)",
         f"{s['total']} ({s['train_split']} / {s['valid_split']} / {s['test_split']})"),
        ("subsets written (train / valid / test)",
         f"{s['train_subset']} / {s['valid_subset']} / {s['test_subset']}"),
        ("groups", ", ".join(stats["groups"]["chosen"])),
        ("seconds", stats["seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
