"""Spec §1 on real MovieLens-100k and on small logs built here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray.data

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.prepare import SPLITS, choose_groups, prepare, split_cuts, split_of
from recray.data.schema import catalog_table, interactions_table
from recray.errors import DataError, RecrayError


def read_split(out: Path, name: str) -> pa.Table:
    return pq.read_table(out / name)


@pytest.fixture(scope="module")
def ml100k(ml100k_prepared):
    return ml100k_prepared


def test_ml100k_split_invariants(ml100k):
    out, stats = ml100k
    tables = {name: read_split(out, name) for name in SPLITS}
    ids = [set(t.column("sample_id").to_pylist()) for t in tables.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert [t.num_rows for t in tables.values()] == [4096, 512, 1000]
    train_max = max(tables["train"].column("target_time").to_pylist())
    for name in ("valid", "test"):
        assert min(tables[name].column("target_time").to_pylist()) >= train_max
    assert min(tables["test"].column("target_time").to_pylist()) >= \
        max(tables["valid"].column("target_time").to_pylist())
    for t in tables.values():
        assert max(len(h) for h in t.column("history_item_ids").to_pylist()) <= 10
        assert min(len(h) for h in t.column("history_item_ids").to_pylist()) >= 1


def test_ml100k_histories_are_the_preceding_items(ml100k):
    """Rebuild some samples straight from the raw parquet and compare."""
    from recray import assets
    out, _ = ml100k
    raw = pq.read_table(assets.movielens100k_dir() / "MovieLens100k_data.parquet.brotli").to_pandas()
    raw["item_id"] = raw["movie_id"].astype(str)
    test = read_split(out, "test").to_pylist()
    for row in test[:: len(test) // 20]:
        user = raw[raw["user_id"].astype(str) == row["user_id"]]
        user = user.sort_values(["timestamp", "item_id"])
        seq, times = user["item_id"].tolist(), user["timestamp"].tolist()
        pos = int(row["sample_id"].split(":")[1])
        assert seq[pos] == row["target_item_id"] and times[pos] == row["target_time"]
        assert row["history_item_ids"] == seq[max(0, pos - 10):pos]
        assert row["prompt"].count('", "') == len(row["history_item_ids"]) - 1
        assert row["completion"] == f'"{row["target_title"]}"\n'


def test_ml100k_stats_add_up(ml100k):
    out, stats = ml100k
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["interactions"] == stats["interactions"]
    i, u, s = stats["interactions"], stats["users"], stats["samples"]
    assert i["read"] == 100_000
    assert i["read"] == (i["dropped_bad_row"] + i["dropped_item_not_in_catalog"]
                         + i["dropped_item_empty_title"] + i["dropped_duplicate"] + i["valid"])
    assert i["valid"] == i["dropped_short_user"] + i["used"]
    assert s["total"] == i["used"] - u["kept"]     # each kept user's first item has no history
    assert s["train_split"] + s["valid_split"] + s["test_split"] == s["total"]
    assert u["seen"] == 943
    groups = json.loads((out / "groups.json").read_text())["groups"]
    assert len(groups) == 10 and "unknown" not in groups and groups[0] == "Drama"
    catalog = pq.read_table(out / "catalog.parquet")
    assert catalog.num_rows == 1682
    assert sum(catalog.column("train_count").to_pylist()) == s["train_split"]


# ---------------------------------------------------------------- small logs built here

def make_source(rows, items, files=("log.csv",)) -> Source:
    """rows: (user, item, timestamp); items: (item_id, title, categories)."""
    users, item_ids, stamps = zip(*rows)
    inter = interactions_table(users, item_ids, stamps, None, files[0], range(1, len(rows) + 1))
    catalog = catalog_table(*zip(*items)) if items else catalog_table([], [], [])
    return Source(ray.data.from_arrow(inter), catalog, list(files))


def small_log(n_users=6, per_user=12, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{int(rng.integers(n_items))}", int(1000 + 10 * k + u))
            for u in range(n_users) for k in range(per_user)]
    items = [(f"i{j}", f"Item {j} ({1990 + j})", ["A" if j % 2 else "B", "C"][: 1 + j % 2])
             for j in range(n_items)]
    return rows, items


def small_cfg(**kw) -> DataConfig:
    return DataConfig(n_train=20, n_valid=5, n_test=5, **kw)


def test_output_is_the_same_whatever_the_blocks(ray_session, tmp_path):
    rows, items = small_log()
    one = make_source(rows, items)
    many = make_source(rows, items)
    many.interactions = many.interactions.repartition(7)
    prepare(one, small_cfg(partitions=1), tmp_path / "a")    # every sample in one block
    prepare(many, small_cfg(partitions=11), tmp_path / "b")
    for name in ("train/part-00000.parquet", "valid/part-00000.parquet",
                 "test/part-00000.parquet", "catalog.parquet", "groups.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_seed_changes_the_subset(ray_session, tmp_path):
    rows, items = small_log()
    prepare(make_source(rows, items), small_cfg(seed=1), tmp_path / "a")
    prepare(make_source(rows, items), small_cfg(seed=2), tmp_path / "b")
    a = set(read_split(tmp_path / "a", "train").column("sample_id").to_pylist())
    b = set(read_split(tmp_path / "b", "train").column("sample_id").to_pylist())
    assert len(a) == len(b) == 20 and a != b


def test_drops_are_counted_never_silent(ray_session, tmp_path):
    rows, items = small_log()
    rows = rows + [("u0", "i3", 1000), ("u0", "i3", 1000),   # duplicates of one new row
                   ("u1", "nope", 1005),                      # not in the catalog
                   ("u2", "i99", 1007),                       # item with empty title
                   ("lonely", "i1", 5)]                       # user with 1 interaction
    items = items + [("i99", "  ", ["A"])]
    stats = prepare(make_source(rows, items), small_cfg(), tmp_path / "out")
    i = stats["interactions"]
    assert i["dropped_duplicate"] == 1
    assert i["dropped_item_not_in_catalog"] == 1
    assert i["dropped_item_empty_title"] == 1
    assert i["dropped_short_user"] == 1 and stats["users"]["dropped_fewer_than_min_interactions"] == 1
    assert stats["catalog"]["catalog_empty_title"] == 1
    assert any("log.csv line" in e for e in stats["drop_examples"])


def test_bad_rows_under_drop_mode_are_counted(ray_session, tmp_path):
    rows, items = small_log()
    users, item_ids, stamps = zip(*rows)
    stamps = list(stamps)
    stamps[3] = "-7"
    inter = interactions_table(users, item_ids, stamps, None, "log.csv", range(1, len(rows) + 1),
                               on_bad_rows="drop")
    source = Source(ray.data.from_arrow(inter), catalog_table(*zip(*items)), ["log.csv"])
    stats = prepare(source, small_cfg(on_bad_rows="drop"), tmp_path / "out")
    assert stats["interactions"]["dropped_bad_row"] == 1
    assert any("log.csv, line 4, field 'timestamp'" in e for e in stats["drop_examples"])


def test_no_user_with_enough_interactions_is_an_error_and_leaves_nothing(ray_session, tmp_path):
    rows, items = small_log(per_user=5)
    with pytest.raises(DataError, match="min_interactions"):
        prepare(make_source(rows, items), small_cfg(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(ray_session, tmp_path):
    (tmp_path / "out").mkdir()
    rows, items = small_log()
    with pytest.raises(RecrayError, match="already exists"):
        prepare(make_source(rows, items), small_cfg(), tmp_path / "out")


def test_split_cut_breaks_time_ties_by_sample_id():
    times = np.array([5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    ids = np.array([f"u:{k}" for k in range(10)], dtype=object)
    cuts = split_cuts(times, (0.8, 0.1, 0.1))
    assert cuts == [(5, 8), (5, 9)]          # the 9th and 10th of the ten tied at time 5
    split = split_of(times, ids, [(5, sorted(ids)[8]), (5, sorted(ids)[9])])
    assert split.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]


def test_groups_skip_roots_nested_and_excluded():
    # 'CDs' is on every item (a root); 'Classic Rock' sits inside 'Rock'.
    cats = {"a": ["CDs", "Rock", "Classic Rock"], "b": ["CDs", "Rock", "Classic Rock"],
            "c": ["CDs", "Rock"], "d": ["CDs", "Pop"], "e": ["CDs", "unknown", "Jazz"]}
    targets = ["a", "a", "b", "c", "d", "e"]
    groups, dropped, _ = choose_groups(Counter(targets), cats, n_groups=10, exclude=["unknown"])
    assert groups == ["Rock", "Jazz", "Pop"]
    assert set(dropped) == {"CDs", "Classic Rock", "unknown"}
    assert "nested in 'Rock'" in dropped["Classic Rock"]


def test_block_summaries_merge_to_the_global_split_and_draw():
    """Cuts, splits and subsets from per-block summaries equal one global sort by
    (target time, sample id) and one global draw by hash, for any cut of users into blocks."""
    from recray.data.prepare import (COUNTS, _block_counts, _block_summary, _merge_candidates,
                                     _samples_at, sample_hash)
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 30, size=60)
    users = pa.table({
        "user_id": [f"u{k}" for k in range(len(lengths))],
        "item_ids": [[f"i{j}" for j in rng.integers(0, 40, size=n)] for n in lengths],
        "times": [np.sort(rng.integers(0, 50, size=n)).tolist() for n in lengths],    # many ties
        **{name: rng.integers(0, 9, size=len(lengths)) for name in COUNTS},
        "examples": [[f"bad row: f line {k}"] if k % 7 == 0 else [] for k in range(len(lengths))]})
    ids = np.array([f"u{k}:{p}" for k, n in enumerate(lengths) for p in range(1, n)], dtype=object)
    times = np.array([t for row in users.column("times").to_pylist() for t in row[1:]])
    items = np.array([i for row in users.column("item_ids").to_pylist() for i in row[1:]], dtype=object)
    order = np.lexsort((ids, times))
    want_split = np.full(len(ids), 2)
    want_split[order[:round(0.8 * len(ids))]] = 0
    want_split[order[round(0.8 * len(ids)):round(0.9 * len(ids))]] = 1
    hashes = sample_hash(ids, 7)
    sizes = [30, 5, 500]           # the last larger than its split: all of it
    want = {name: sorted(ids[np.flatnonzero(want_split == i)[np.argsort(hashes[want_split == i])][:size]])
            for i, (name, size) in enumerate(zip(SPLITS, sizes))}

    blocks = [users.slice(0, 1), users.slice(1, 22), users.slice(23)]
    counts = pa.concat_tables([_block_counts(b) for b in blocks])
    for name in COUNTS:                                     # one row per block, every user in it
        assert [x for row in counts.column(name).to_pylist() for x in row] == users.column(name).to_pylist()
    assert sum(counts.column("examples").to_pylist(), []) == sum(users.column("examples").to_pylist(), [])
    all_times = np.array(sum(counts.column("target_times").to_pylist(), []))
    cuts = split_cuts(all_times, (0.8, 0.1, 0.1))
    tied = pa.concat_tables([_samples_at(b, [c[0] for c in cuts]) for b in blocks])
    cut_ids = [(t, sorted(tied.filter(pc.equal(tied.column("target_time"), t))
                          .column("sample_id").to_pylist())[r]) for t, r in cuts]
    summary = pa.concat_tables([_block_summary(b, cut_ids, 7, sizes) for b in blocks])
    chosen = _merge_candidates(summary, sizes)
    assert {name: sorted(chosen[name]) for name in SPLITS} == want
    assert np.array(summary.column("split_sizes").to_pylist()).sum(axis=0).tolist() == \
        np.bincount(want_split, minlength=3).tolist()
    train_counts = Counter()
    for its, cs in zip(summary.column("train_item").to_pylist(), summary.column("train_count").to_pylist()):
        train_counts.update(dict(zip(its, cs)))
    assert train_counts == Counter(items[want_split == 0].tolist())
