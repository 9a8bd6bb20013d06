"""The generic Parquet/CSV loader (format: table) on small files written here."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.config import DataConfig, TableColumns
from recray.data.loaders import Source, load
from recray.data.schema import CATALOG, INTERACTIONS, interactions_table
from recray.errors import DataError
from recray.runtime import unwrap

COLUMNS = TableColumns(user_id="uid", item_id="sku", timestamp="ts", rating="stars", title="name",
                       categories="tags", categories_sep=";")


def rows(source: Source) -> list[dict]:
    assert source.interactions.schema().base_schema == INTERACTIONS
    assert source.catalog.schema == CATALOG
    return sorted(source.interactions.take_all(), key=lambda r: (r["source_file"], r["source_line"]))


def failure(excinfo) -> DataError:
    err = unwrap(excinfo.value)
    assert isinstance(err, DataError)
    return err


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def cfg(input: Path, catalog: Path | None = None, **kw) -> DataConfig:
    return DataConfig(format="table", input=str(input), catalog=None if catalog is None else str(catalog),
                      columns=COLUMNS, **kw)


LOG_CSV = ("uid,sku,ts,stars,name,tags\n"
           "alice,B01,1500000000,5,\"Blue, Train\",Jazz;Hard Bop\n"
           "alice,B02,1500000100,,Kind of Blue,Jazz;Modal\n"
           "bob,B01,1500000200,3,Blue Train (remaster),Jazz\n"
           "bob,B03,1500000300,4,,\n")


def test_csv_log_with_titles_in_it(ray_session, tmp_path):
    log = write(tmp_path / "log.csv", LOG_CSV)
    source = load(cfg(log))
    assert source.files == [str(log)] and source.dropped == {}
    # One catalog row per item, its first title and categories; an empty title stays for preparation to count.
    assert source.catalog.to_pylist() == [
        {"item_id": "B01", "title": "Blue, Train", "categories": ["Jazz", "Hard Bop"]},
        {"item_id": "B02", "title": "Kind of Blue", "categories": ["Jazz", "Modal"]},
        {"item_id": "B03", "title": "", "categories": []}]
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["rating"], r["source_line"]) for r in rows(source)] == [
        ("alice", "B01", 1500000000, 5.0, 2), ("alice", "B02", 1500000100, None, 3),
        ("bob", "B01", 1500000200, 3.0, 4), ("bob", "B03", 1500000300, 4.0, 5)]


def test_csv_directory_with_separate_catalog(ray_session, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    write(logs / "a.csv", "uid,sku,ts\nalice,B01,10\nalice,B02,20\n")
    write(logs / "b.csv", "sku,ts,uid\nB02,30,bob\nB01,40,bob\nB03,50,carol\n")
    catalog = write(tmp_path / "items.csv", "sku,name,tags\nB01,Blue Train,Jazz\n,No id,Pop\n"
                                            "B02,Kind of Blue,Jazz;Modal\nB01,Blue Train again,Jazz\n")
    columns = COLUMNS.model_copy(update={"rating": None})
    source = load(DataConfig(format="table", input=str(logs), catalog=str(catalog), columns=columns))
    assert source.files == [str(logs / "a.csv"), str(logs / "b.csv"), str(catalog)]
    assert source.catalog.column("title").to_pylist() == ["Blue Train", "Kind of Blue"]
    assert source.dropped == {"catalog: no item id": 1, "catalog: repeated item id": 1}
    got = rows(source)
    assert [(Path(r["source_file"]).name, r["source_line"], r["user_id"], r["item_id"]) for r in got] == [
        ("a.csv", 2, "alice", "B01"), ("a.csv", 3, "alice", "B02"),
        ("b.csv", 2, "bob", "B02"), ("b.csv", 3, "bob", "B01"), ("b.csv", 4, "carol", "B03")]
    assert all(r["rating"] is None for r in got)


def test_parquet_rows_numbered_exactly_and_arrow_timestamps_in_seconds(ray_session, tmp_path):
    utc = dt.timezone.utc
    stamps = [dt.datetime(2017, 1, 1, tzinfo=utc) + dt.timedelta(seconds=s) for s in (0, 1, 2, 3, 4)]
    log = pa.table({"uid": ["a", "a", "b", "b", "c"], "sku": [1, 2, 1, 3, 2],
                    "ts": pa.array(stamps, pa.timestamp("ms", tz="UTC")), "stars": [1.0, 2.0, 3.0, 4.0, 5.0]})
    pq.write_table(log, tmp_path / "log.parquet", row_group_size=2)
    items = pa.table({"sku": [1, 2, 3], "name": ["One", "Two", None],
                      "tags": pa.array([["Rock", "Pop"], [], None], pa.list_(pa.string()))})
    pq.write_table(items, tmp_path / "items.parquet")
    source = load(cfg(tmp_path / "log.parquet", tmp_path / "items.parquet"))
    assert source.catalog.to_pylist() == [
        {"item_id": "1", "title": "One", "categories": ["Rock", "Pop"]},
        {"item_id": "2", "title": "Two", "categories": []},
        {"item_id": "3", "title": None, "categories": []}]
    got = rows(source)
    assert [r["source_line"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["timestamp"] - 1483228800 for r in got] == [0, 1, 2, 3, 4]
    assert got[3]["item_id"] == "3" and got[3]["rating"] == 4.0


def test_missing_mapped_column_is_named_with_the_columns_present(tmp_path):
    log = write(tmp_path / "log.csv", "uid,item,ts\nalice,B01,10\n")
    with pytest.raises(DataError) as info:
        load(cfg(log))
    assert (info.value.path, info.value.field) == (str(log), "sku")
    assert "uid, item, ts" in str(info.value)
    pq.write_table(pa.table({"uid": ["a"], "sku": ["x"], "when": [1]}), tmp_path / "log.parquet")
    with pytest.raises(DataError) as info:
        load(cfg(tmp_path / "log.parquet"))
    assert info.value.field == "ts" and "uid, sku, when" in str(info.value)


@pytest.mark.parametrize("stamp, words", [("yesterday", "not a number"), ("-1", "negative")])
def test_bad_timestamp_names_file_line_field_or_is_marked_under_drop(ray_session, tmp_path, stamp, words):
    log = write(tmp_path / "log.csv", f"uid,sku,ts\nalice,B01,10\nbob,B01,{stamp}\ncarol,B01,30\n")
    columns = TableColumns(user_id="uid", item_id="sku", timestamp="ts", title="sku", categories=None)
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(format="table", input=str(log), columns=columns)))
    err = failure(info)
    assert (err.path, err.line, err.field) == (str(log), 3, "ts") and words in str(err)
    got = rows(load(DataConfig(format="table", input=str(log), columns=columns, on_bad_rows="drop")))
    assert [r["drop_reason"] is not None for r in got] == [False, True, False]
    assert words in got[1]["drop_reason"]


def test_short_csv_row_under_drop_is_marked_once(ray_session, tmp_path):
    log = write(tmp_path / "log.csv", LOG_CSV.replace("bob,B01,1500000200,3,Blue Train (remaster),Jazz",
                                                      "bob,B01"))
    with pytest.raises(DataError) as info:
        load(cfg(log))
    assert info.value.line == 4 and "expected 6 comma-separated fields" in str(info.value)
    source = load(cfg(log, on_bad_rows="drop"))
    got = rows(source)
    assert [r["source_line"] for r in got if r["drop_reason"]] == [4]
    assert source.dropped == {}     # counted by its drop_reason, not a second time


def test_non_utf8_csv_names_line(ray_session, tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(LOG_CSV.encode().replace(b"Kind of Blue", b"Kind of Bl\xfce"))
    with pytest.raises(DataError) as info:
        load(cfg(log, on_bad_rows="drop"))
    err = failure(info)
    assert (err.path, err.line) == (str(log), 3)


def test_not_the_declared_format(tmp_path):
    fake = write(tmp_path / "log.parquet", LOG_CSV)
    with pytest.raises(DataError, match="not a Parquet file"):
        load(cfg(fake))
    with pytest.raises(DataError, match="expected a .parquet or .csv"):
        load(cfg(write(tmp_path / "log.json", "{}\n")))
    write(tmp_path / "other.csv", LOG_CSV)
    with pytest.raises(DataError, match="both Parquet and CSV"):
        load(cfg(tmp_path))


def test_empty_csv(tmp_path):
    with pytest.raises(DataError, match="file is empty"):
        load(cfg(write(tmp_path / "log.csv", "")))


@pytest.mark.parametrize("stamps", [
    pa.array([5, 0, 7], pa.int32()),
    pa.array([5_000, 0, 7_999], pa.timestamp("ms")),
    pa.array([1, 0, 2], pa.date32()),
])
def test_arrow_columns_take_the_vectorised_path_with_the_row_path_result(stamps):
    """Clean Arrow columns give exactly what the row-by-row conversion gives."""
    from recray.data.schema import _clean_columns, _unix_seconds_list, interactions_from_arrow
    users, items = pa.array(["u1", "u2", "u3"]), pa.array([10, 11, 12], pa.int64())
    ratings = pa.array([4.0, float("nan"), None])
    assert _clean_columns(users, items, stamps, ratings) is not None
    fast = interactions_from_arrow(users, items, stamps, ratings, "f.parquet", 7)
    rows = interactions_table(users.to_pylist(), items.to_pylist(), _unix_seconds_list(stamps),
                              ratings.to_pylist(), "f.parquet", [7, 8, 9])
    assert fast.equals(rows)


@pytest.mark.parametrize("users, stamps, found", [
    (["u1", " u2", "u3"], [1, 2, 3], None),                       # padded: stripped row by row
    (["u1", "u2\x1f", "u3"], [1, 2, 3], None),                    # str.strip() whitespace too
    (["u1", "", "u3"], [1, 2, 3], "line 8, field 'user_id': missing id"),
    (["u1", "u2", "u3"], [1, -2, 3], "line 8, field 'ts': timestamp -2 is negative"),
])
def test_arrow_columns_with_a_bad_row_go_row_by_row(users, stamps, found):
    from recray.data.schema import interactions_from_arrow
    args = (pa.array(users), pa.array(["a", "b", "c"]), pa.array(stamps), None, "f.parquet", 7)
    if found is None:
        table = interactions_from_arrow(*args, timestamp_field="ts")
        assert table.column("user_id").to_pylist() == [u.strip() for u in users]
    else:
        with pytest.raises(DataError, match=found):
            interactions_from_arrow(*args, timestamp_field="ts")
        dropped = interactions_from_arrow(*args, timestamp_field="ts", on_bad_rows="drop")
        assert dropped.column("drop_reason").null_count == 2
