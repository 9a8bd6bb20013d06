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
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from recray.atomic import atomic_dir
from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.prompts import article_first, build_completion, build_prompt
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
    # The user's usable sequence in (time, item) order; empty for users below min_interactions.
    ("item_ids", pa.list_(pa.string())),
    ("times", pa.list_(pa.int64())),
])

COUNTS = ("n_raw", "n_bad_row", "n_unknown_item", "n_empty_title", "n_duplicate", "n_valid")
BLOCK_COUNTS = pa.schema([*(pa.field(name, pa.list_(pa.int64())) for name in COUNTS),
                          ("examples", pa.list_(pa.string())), ("target_times", pa.list_(pa.int64()))])
TIED = pa.schema([("sample_id", pa.string()), ("target_time", pa.int64())])
BLOCK_SUMMARY = pa.schema([          # one row per block of users (split, subsets, train counts)
    ("split_sizes", pa.list_(pa.int64())),
    ("candidate_split", pa.list_(pa.int8())),
    ("candidate_id", pa.list_(pa.string())),
    ("candidate_hash", pa.list_(pa.uint64())),
    ("train_item", pa.list_(pa.string())),
    ("train_count", pa.list_(pa.int64())),
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


def shown_titles(catalog: pa.Table, form: str) -> tuple[pa.Table, int]:
    """The catalog with `title` in the form the model sees and is scored in (prompts,
    answers, negatives, grounding) and `source_title` as stored; and how many changed."""
    stored = catalog.column("title").to_pylist()
    shown = [article_first(t) for t in stored] if form == "article_first" else stored
    index = catalog.column_names.index("title")
    catalog = catalog.set_column(index, "title", pa.array(shown, pa.string()))
    catalog = catalog.append_column("source_title", pa.array(stored, pa.string()))
    return catalog, sum(a != b for a, b in zip(stored, shown))


# ---------------------------------------------------------------- per user

OK, BAD_ROW, EMPTY_TITLE, UNKNOWN_ITEM = 0, 1, 2, 3
_STATUS_TEXT = {BAD_ROW: "bad row", EMPTY_TITLE: "item has an empty title",
                UNKNOWN_ITEM: "item not in catalog"}


def _classify(rows: pa.Table, valid_items: pa.Array, empty_title_items: pa.Array,
              files: pa.Array) -> pa.Table:
    """Tag each raw row with why it is unusable (vectorised, per block, before the shuffle),
    and keep only what the per-user pass reads: a file's rank in `files` (sorted) stands
    in for its name, which would be most of the bytes the shuffle moves."""
    status = np.full(rows.num_rows, OK, dtype=np.int8)
    unknown = ~pc.is_in(rows.column("item_id"), value_set=valid_items).to_numpy(zero_copy_only=False)
    status[unknown] = UNKNOWN_ITEM
    empty = pc.is_in(rows.column("item_id"), value_set=empty_title_items).to_numpy(zero_copy_only=False)
    status[empty] = EMPTY_TITLE
    status[pc.is_valid(rows.column("drop_reason")).to_numpy(zero_copy_only=False)] = BAD_ROW
    file_rank = pc.index_in(rows.column("source_file"), value_set=files)
    if file_rank.null_count:
        raise RecrayError(f"a row names a file the loader did not list: "
                          f"{rows.column('source_file').filter(pc.is_null(file_rank))[0]}")
    return pa.table({"user_id": pc.fill_null(rows.column("user_id"), ""),
                     "item_id": rows.column("item_id"), "timestamp": rows.column("timestamp"),
                     "file": file_rank.cast(pa.int32()), "source_line": rows.column("source_line"),
                     "drop_reason": rows.column("drop_reason"),
                     "status": pa.array(status, pa.int8())})


def _drop_examples(rows: pa.Table, status: np.ndarray, dup: np.ndarray, files: list[str]) -> list[str]:
    """`reason: file line N` for the first few dropped rows of a block."""
    out = []
    for row in np.flatnonzero((status != OK) | dup)[:MAX_EXAMPLES].tolist():
        if status[row] == BAD_ROW:
            out.append(rows.column("drop_reason")[row].as_py())
        else:
            reason = "duplicate (user, item, timestamp)" if status[row] == OK else _STATUS_TEXT[status[row]]
            out.append(f"{reason}: {files[rows.column('file')[row].as_py()]} "
                       f"line {rows.column('source_line')[row].as_py()}")
    return out


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer codes, equal where the strings are equal: numpy compares them fast."""
    return pc.dictionary_encode(column.combine_chunks()).indices.to_numpy(zero_copy_only=False)


def _users_of_block(rows: pa.Table, min_interactions: int, files: list[str]) -> pa.Table:
    """One row per user of a block that holds ALL rows of its users (hash-partitioned by
    user): what was dropped and why, and the usable sequence. Vectorised over users."""
    # Per user: time, then item id (spec §1.3); file and line make exact ties stable.
    rows = rows.take(pc.sort_indices(rows, sort_keys=[
        (name, "ascending") for name in ("user_id", "timestamp", "item_id", "file", "source_line")]))
    users, items = _codes(rows.column("user_id")), _codes(rows.column("item_id"))
    status = rows.column("status").to_numpy()
    times = np.where(status == OK, pc.fill_null(rows.column("timestamp"), 0).to_numpy(), 0).astype(np.int64)
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], int)
    user_of_row = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(users)]))

    ok = np.flatnonzero(status == OK)
    # Among a user's usable rows, sorted by (time, item), exact duplicates are neighbours.
    dup_ok = np.zeros(len(ok), dtype=bool)
    dup_ok[1:] = ((user_of_row[ok[1:]] == user_of_row[ok[:-1]]) & (items[ok[1:]] == items[ok[:-1]])
                  & (times[ok[1:]] == times[ok[:-1]]))
    dup = np.zeros(len(users), dtype=bool)
    dup[ok[dup_ok]] = True
    valid = ok[~dup_ok]

    def per_user(mask_rows: np.ndarray) -> np.ndarray:
        return np.bincount(user_of_row[mask_rows], minlength=len(first)).astype(np.int64)

    n_valid = per_user(valid)
    kept = n_valid >= min_interactions
    listed = valid[kept[user_of_row[valid]]]
    offsets = np.r_[0, np.cumsum(np.where(kept, n_valid, 0))].astype(np.int32)
    examples = _drop_examples(rows, status, dup, files)
    return pa.table({
        "user_id": rows.column("user_id").take(first).combine_chunks(),
        "n_raw": per_user(np.arange(len(users))),
        "n_bad_row": per_user(np.flatnonzero(status == BAD_ROW)),
        "n_unknown_item": per_user(np.flatnonzero(status == UNKNOWN_ITEM)),
        "n_empty_title": per_user(np.flatnonzero(status == EMPTY_TITLE)),
        "n_duplicate": per_user(np.flatnonzero(dup)),
        "n_valid": n_valid,
        "examples": pa.array([examples] + [[]] * (len(first) - 1) if len(first) else [],
                             pa.list_(pa.string())),
        "item_ids": pa.ListArray.from_arrays(offsets, rows.column("item_id").take(listed).combine_chunks()),
        "times": pa.ListArray.from_arrays(offsets, pa.array(times[listed], pa.int64())),
    }, schema=USER_ROW)


def _targets(users: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user row, position, time) of every sample's target: each position after the first."""
    lengths = pc.list_value_length(users.column("item_ids")).to_numpy(zero_copy_only=False)
    times = pc.list_flatten(users.column("times")).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.cumsum(lengths)[:-1]] if len(lengths) else np.array([], int)
    position = np.arange(len(times)) - np.repeat(starts, lengths)
    is_target = position >= 1
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return owner[is_target], position[is_target], times[is_target]


def _after_first(lists: pa.ChunkedArray) -> pa.Array:
    """Each user's list without its first entry, flattened: the targets' column in _targets' order."""
    return pc.list_flatten(pc.list_slice(lists, 1)).combine_chunks()


def _sample_ids(users: pa.Table, owner: np.ndarray, position: np.ndarray) -> np.ndarray:
    """"user:position" of each sample, joined in Arrow (numpy's int-to-str conversion took
    1.2 of the 1.6 s a 2.5M-sample block spent in _block_summary)."""
    user_ids = users.column("user_id").combine_chunks().take(pa.array(owner, pa.int64()))
    positions = pc.cast(pa.array(position, pa.int64()), pa.string())
    return pc.binary_join_element_wise(user_ids, positions, ":").to_numpy(zero_copy_only=False)


def _block_counts(users: pa.Table) -> pa.Table:
    """One row per block of users: each user's counts, the drop examples and every sample's
    target time (all the driver needs before the split cuts, in one pass)."""
    def one_row(values: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    return pa.table({**{name: one_row(users.column(name)) for name in COUNTS},
                     "examples": one_row(pc.list_flatten(users.column("examples"))),
                     "target_times": one_row(_after_first(users.column("times")))},
                    schema=BLOCK_COUNTS)


def _samples_at(users: pa.Table, times: list[int]) -> pa.Table:
    """(sample id, target time) of the samples whose target time is one of `times`."""
    owner, position, target_times = _targets(users)
    at = np.isin(target_times, times)
    return pa.table({"sample_id": pa.array(_sample_ids(users, owner[at], position[at]), pa.string()),
                     "target_time": pa.array(target_times[at], pa.int64())}, schema=TIED)


def split_of(times: np.ndarray, sample_ids: np.ndarray, cuts: list[tuple[int, str] | None]) -> np.ndarray:
    """0/1/2 for train/valid/test: a sample is before a cut when its (target time, sample id)
    is smaller than the cut's, the first sample past it (None: no sample is past it)."""
    def before(cut):
        if cut is None:
            return np.ones(len(times), dtype=bool)
        time, sample_id = cut
        tied = np.flatnonzero(times == time)
        below = times < time
        below[tied] = sample_ids[tied] < sample_id
        return below
    return (2 - before(cuts[1]).astype(np.int8) - before(cuts[0]).astype(np.int8)).astype(np.int8)


def _block_summary(users: pa.Table, cuts: list, seed: int, sizes: list[int]) -> pa.Table:
    """One row per block: its samples per split, each split's `size` smallest-hash
    candidates, and its train-split target counts (all the driver needs; the keys stay here)."""
    owner, position, times = _targets(users)
    items = _after_first(users.column("item_ids"))
    sample_ids = _sample_ids(users, owner, position)
    split = split_of(times, sample_ids, cuts)
    hashes = sample_hash(sample_ids, seed)
    picked = np.concatenate([smallest_hashes(np.flatnonzero(split == i), hashes, sample_ids, size)
                             for i, size in enumerate(sizes)])
    train = pc.value_counts(items.filter(pa.array(split == 0)))
    return pa.table({
        "split_sizes": pa.array([np.bincount(split, minlength=3).tolist()], pa.list_(pa.int64())),
        "candidate_split": pa.array([split[picked].tolist()], pa.list_(pa.int8())),
        "candidate_id": pa.array([sample_ids[picked].tolist()], pa.list_(pa.string())),
        "candidate_hash": pa.array([hashes[picked].tolist()], pa.list_(pa.uint64())),
        "train_item": pa.array([train.field("values").to_pylist()], pa.list_(pa.string())),
        "train_count": pa.array([train.field("counts").to_pylist()], pa.list_(pa.int64())),
    }, schema=BLOCK_SUMMARY)


def _samples_of_users(users: pa.Table, sample_ids: list[str], history_len: int) -> pa.Table:
    """The chosen samples with their histories, built from their users' sequences."""
    by_user = {r["user_id"]: r for r in users.to_pylist()}
    rows = []
    for sample_id in sample_ids:
        user, pos = sample_id.rsplit(":", 1)
        seq, pos = by_user[user], int(pos)
        rows.append({"sample_id": sample_id, "user_id": user,
                     "history_item_ids": seq["item_ids"][max(0, pos - history_len):pos],
                     "target_item_id": seq["item_ids"][pos], "target_time": seq["times"][pos]})
    table = pa.Table.from_pylist(rows, schema=SAMPLE)
    # Block order varies with parallelism; this order does not.
    order = pc.sort_indices(table, sort_keys=[("target_time", "ascending"), ("sample_id", "ascending")])
    return table.take(order)


# ---------------------------------------------------------------- split + subsets

def sample_hash(sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """A keyed 64-bit hash per sample id: the seeded order subsets are drawn in."""
    key = f"{seed:016d}"[-16:]
    return pd.util.hash_array(np.asarray(sample_ids, dtype=object), hash_key=key,
                              categorize=False)


def split_cuts(times: np.ndarray, fractions: tuple[float, float, float]) -> list[tuple[int, int] | None]:
    """Where the (target time, sample id) order is cut 8:1:1, as (time, rank among the
    samples tied at that time) of the first sample past each cut; None: nothing past it."""
    n = len(times)
    positions = [int(round(n * fractions[0])), int(round(n * (fractions[0] + fractions[1])))]
    inside = [c for c in positions if c < n]
    at = dict(zip(inside, np.partition(times, inside)[inside].tolist())) if inside else {}
    return [(at[c], c - int((times < at[c]).sum())) if c in at else None for c in positions]


def smallest_hashes(idx: np.ndarray, hashes: np.ndarray, sample_ids: np.ndarray, size: int) -> np.ndarray:
    """The `size` of `idx` with the smallest (hash, sample id): a seeded draw that is the
    same whichever blocks the candidates come from."""
    if len(idx) > size > 0:
        idx = idx[hashes[idx] <= np.partition(hashes[idx], size - 1)[size - 1]]
    return idx[np.lexsort((sample_ids[idx], hashes[idx]))[:size]]


# ---------------------------------------------------------------- groups

def choose_groups(target_counts: Mapping[str, int], item_categories: dict[str, list[str]],
                  n_groups: int, exclude: list[str]) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Top categories among train targets (item -> count), with no category nested in
    another (spec §1.6)."""
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
    """Classify rows, hash-partition by user, summarise each user (one vectorised call per
    block: a partition holds every row of its users, as Ray's own map_groups relies on)."""
    files = sorted(set(source.files))
    classified = source.interactions.map_batches(
        _classify, batch_format="pyarrow",
        fn_kwargs={"valid_items": catalog.column("item_id").combine_chunks(),
                   "empty_title_items": empty_title_items, "files": pa.array(files, pa.string())})
    partitions = cfg.partitions or max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    users = classified.repartition(partitions, keys=["user_id"]).map_batches(
        _users_of_block, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"min_interactions": cfg.min_interactions, "files": files})
    # Measured at 10M rows on 2 CPUs (docs/prepare.md): with Ray Data's defaults each
    # operator keeps a reserved share of the CPUs, so the read ran one task at a time, and
    # the shuffle buffered all its input before mapping it in one task. Stream instead:
    # the per-user pass cannot start before the shuffle ends anyway.
    users.context.op_resource_reservation_enabled = False
    users.context.shuffle_input_batch_bytes = 0         # one shuffle map task per block
    return users.materialize()


def _gather(ds: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    """`ds`'s `schema` columns in the driver. Streamed: an eager execution would warn of
    no free CPUs while the previous pass's tasks are still giving theirs back."""
    blocks = list(ds.select_columns(schema.names).iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables([b.cast(schema) for b in blocks]) if blocks else schema.empty_table()


def _split_cuts(users: ray.data.Dataset, times: np.ndarray,
                fractions: tuple[float, float, float]) -> list:
    """The train/valid and valid/test cuts as (time, sample id) of the first sample past
    each, from every sample's target `times`: only the ids tied at a cut's time reach the driver."""
    cuts = split_cuts(times, fractions)
    at = sorted({cut[0] for cut in cuts if cut is not None})
    tied = (_gather(users.map_batches(_samples_at, batch_format="pyarrow", fn_kwargs={"times": at}), TIED)
            if at else TIED.empty_table())          # no cut inside: no pass for ties
    ids_at = {t: sorted(tied.filter(pc.equal(tied.column("target_time"), t)).column("sample_id").to_pylist())
              for t in at}
    return [None if cut is None else (cut[0], ids_at[cut[0]][cut[1]]) for cut in cuts]


def _merge_candidates(blocks: pa.Table, sizes: list[int]) -> dict[str, list[str]]:
    """Each split's `size` samples with the smallest (hash, sample id) over all blocks."""
    split = pc.list_flatten(blocks.column("candidate_split")).to_numpy()
    ids = pc.list_flatten(blocks.column("candidate_id")).to_numpy(zero_copy_only=False)
    hashes = pc.list_flatten(blocks.column("candidate_hash")).to_numpy()
    chosen = {}
    for i, (name, size) in enumerate(zip(SPLITS, sizes)):
        chosen[name] = ids[smallest_hashes(np.flatnonzero(split == i), hashes, ids, size)].tolist()
    return chosen


def prepare(source: Source, cfg: DataConfig, output: Path, overwrite: bool = False) -> dict:
    """Run spec §1 on `source` and write the prepared dataset to `output` atomically."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise RecrayError(f"{output} already exists: choose another --output or pass --overwrite")
    start = time.time()
    timings: dict[str, float] = {}       # seconds per phase, in stats.json: where the time goes
    lap = _stopwatch(timings)
    catalog, catalog_drops = clean_catalog(source.catalog)
    catalog, n_article_first = shown_titles(catalog, cfg.title_form)
    all_ids = set(source.catalog.column("item_id").to_pylist())
    empty_title_items = pa.array(sorted(all_ids - set(catalog.column("item_id").to_pylist())),
                                 pa.string())

    lap("catalog")
    users = _collect_users(source, catalog, empty_title_items, cfg)
    lap("read, classify, shuffle by user, per-user summaries")
    counts = _gather(users.map_batches(_block_counts, batch_format="pyarrow"), BLOCK_COUNTS)
    column = {name: pc.list_flatten(counts.column(name)) for name in BLOCK_COUNTS.names}
    totals = {name: int(pc.sum(column[name]).as_py() or 0) for name in COUNTS}
    n_valid = column["n_valid"].to_numpy()
    kept_users = int((n_valid >= cfg.min_interactions).sum())
    if kept_users == 0:
        raise DataError(f"no user has {cfg.min_interactions} usable interactions "
                        f"(data.min_interactions); {len(n_valid)} users, at most "
                        f"{int(n_valid.max()) if len(n_valid) else 0} each")
    examples = sorted(column["examples"].to_pylist())[:4 * MAX_EXAMPLES]  # the same whatever the blocks
    target_times = column["target_times"].to_numpy()
    lap("counts and target times to the driver")

    cuts = _split_cuts(users, target_times, cfg.split)
    n_samples = len(target_times)
    lap("split cuts (ids tied at a cut)")
    sizes = [cfg.n_train, cfg.n_valid, cfg.n_test]
    blocks = _gather(users.map_batches(_block_summary, batch_format="pyarrow", fn_kwargs={
        "cuts": cuts, "seed": cfg.seed, "sizes": sizes}), BLOCK_SUMMARY)
    split_sizes = np.array(blocks.column("split_sizes").to_pylist(), dtype=np.int64).sum(axis=0)
    chosen = _merge_candidates(blocks, sizes)
    train_counts: Counter = Counter()
    for items, counts in zip(blocks.column("train_item").to_pylist(), blocks.column("train_count").to_pylist()):
        train_counts.update(dict(zip(items, counts)))
    lap("split, subsets and train counts per block")

    item_categories = dict(zip(catalog.column("item_id").to_pylist(),
                               catalog.column("categories").to_pylist()))
    groups, dropped_groups, group_freq = choose_groups(
        train_counts, item_categories, cfg.n_groups, cfg.exclude_categories)
    catalog = catalog.append_column("train_count", pa.array(
        [train_counts.get(i, 0) for i in catalog.column("item_id").to_pylist()], pa.int64()))
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    lap("groups, catalog counts")
    wanted_users = pa.array(sorted({sid.rsplit(":", 1)[0] for ids in chosen.values() for sid in ids}),
                            pa.string())
    chosen_users = _gather(users.map_batches(
        lambda t: t.filter(pc.is_in(t.column("user_id"), value_set=wanted_users)),
        batch_format="pyarrow"), USER_ROW)
    subsets = {name: _with_prompts(_samples_of_users(chosen_users, chosen[name], cfg.history_len),
                                   titles, cfg.noun)
               for name in SPLITS}
    lap("chosen users to the driver, histories, prompts")

    stats = {
        "files": source.files,
        "loader_dropped": source.dropped,
        "catalog": {"items_in": source.catalog.num_rows, "items_kept": catalog.num_rows,
                    "titles_article_first": n_article_first, **catalog_drops},
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
        "samples": {"total": n_samples,
                    "skipped_empty_history": kept_users,
                    **{f"{name}_split": int(split_sizes[i]) for i, name in enumerate(SPLITS)},
                    **{f"{name}_subset": subsets[name].num_rows for name in SPLITS}},
        "groups": {"chosen": groups, "dropped": dropped_groups},
        "drop_examples": examples,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.time() - start, 1),
    }
    stats["timings"] = timings          # up to here; writing the (small) subsets follows
    _write(output, subsets, catalog, groups, dropped_groups, group_freq, stats)
    return stats


def _stopwatch(timings: dict[str, float]):
    """lap(name): the seconds since the last lap (or since now) go to timings[name]."""
    last = [time.time()]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - last[0], 2)
        last[0] = now
    return lap


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
    with atomic_dir(output) as staging:
        for name, table in subsets.items():
            (staging / name).mkdir()
            pq.write_table(table, staging / name / "part-00000.parquet")
        pq.write_table(catalog, staging / "catalog.parquet")
        (staging / "groups.json").write_text(json.dumps({
            "groups": groups, "dropped": dropped_groups,
            "train_target_frequency": {g: group_freq[g] for g in groups}}, indent=1))
        (staging / "stats.json").write_text(json.dumps(stats, indent=1))


def prepared_line(stats: dict) -> str:
    """The table below in one line: what was kept, what was dropped, what was written."""
    i, s = stats["interactions"], stats["samples"]
    return (f"{i['used']:,} of {i['read']:,} interactions used ({i['read'] - i['used']:,} "
            f"dropped), {stats['users']['kept']:,} users, {stats['catalog']['items_kept']:,} "
            f"items; subsets train/valid/test {s['train_subset']}/{s['valid_subset']}/"
            f"{s['test_subset']} in {stats['seconds']} s")


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
        ("  titles shown article-first", stats["catalog"].get("titles_article_first", 0)),
        ("samples (train / valid / test split)",
         f"{s['total']} ({s['train_split']} / {s['valid_split']} / {s['test_split']})"),
        ("subsets written (train / valid / test)",
         f"{s['train_subset']} / {s['valid_subset']} / {s['test_subset']}"),
        ("groups", ", ".join(stats["groups"]["chosen"])),
        ("seconds", stats["seconds"]),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
