"""Shared reader machinery, the dispatcher and the MovieLens loader, on small files
written here in each raw format."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.config import DataConfig
from recray.data.loaders import Source, load
from recray.data.loaders.movielens import GENRES_100K, PARQUET_DATA, PARQUET_ITEMS
from recray.data.loaders.readers import (LineFormatError, csv_records, decoded_lines, file_chunks,
                                         text_lines)
from recray.data.schema import CATALOG, INTERACTIONS
from recray.errors import ConfigError, DataError
from recray.runtime import unwrap


def rows(source: Source) -> list[dict]:
    assert source.interactions.schema().base_schema == INTERACTIONS
    assert source.catalog.schema == CATALOG
    return sorted(source.interactions.take_all(), key=lambda r: (r["source_file"], r["source_line"]))


def failure(excinfo) -> DataError:
    """The DataError itself, whether raised in the driver or inside a Ray task."""
    err = unwrap(excinfo.value)
    assert isinstance(err, DataError)
    return err


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def split_line_rows(text: str, path: str, line: int):
    fields = text.split(",")
    if len(fields) != 3:
        raise LineFormatError("expected user,item,timestamp", path, line)
    return (*fields, None)


# ---------------------------------------------------------------- readers, no Ray

def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"a,b,1\nc,d,\xff2\n")
    with pytest.raises(DataError) as info:
        list(decoded_lines(str(path)))
    assert (info.value.path, info.value.line) == (str(path), 2)
    assert "0xff" in str(info.value) and "utf-8" in str(info.value)


def test_chunks_keep_exact_line_numbers_across_chunks_and_blank_lines(tmp_path):
    path = write(tmp_path / "log.txt", "u1,i1,10\n\nu1,i2,20\nu2,i1,30\r\nu2,i3,40\nu3,i1,50\n")
    chunks = list(file_chunks(str(path), text_lines, split_line_rows, "error", "timestamp", chunk_rows=2))
    assert [c.num_rows for c in chunks] == [2, 2, 1]
    table = pa.concat_tables(chunks)
    assert table.column("source_line").to_pylist() == [1, 3, 4, 5, 6]
    assert table.column("timestamp").to_pylist() == [10, 20, 30, 40, 50]
    assert table.column("item_id").to_pylist() == ["i1", "i2", "i1", "i3", "i1"]


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "log.txt"
    path.write_bytes(content)
    for mode in ("error", "drop"):
        with pytest.raises(DataError, match="file is empty"):
            list(file_chunks(str(path), text_lines, split_line_rows, mode, "timestamp"))


def test_structural_problem_is_a_row_under_drop_but_not_on_line_one(tmp_path):
    path = write(tmp_path / "log.txt", "u1,i1,10\nnot a record\nu2,i1,-5\n")
    table = pa.concat_tables(file_chunks(str(path), text_lines, split_line_rows, "drop", "timestamp"))
    reasons = table.column("drop_reason").to_pylist()
    assert reasons[0] is None
    assert "line 2" in reasons[1] and "expected user,item,timestamp" in reasons[1]
    assert "line 3" in reasons[2] and "negative" in reasons[2]
    with pytest.raises(DataError) as info:
        list(file_chunks(str(path), text_lines, split_line_rows, "error", "timestamp"))
    assert info.value.line == 2
    wrong = write(tmp_path / "wrong.txt", '{"user": "u1"}\nu1,i1,10\n')
    with pytest.raises(LineFormatError) as info:
        list(file_chunks(str(wrong), text_lines, split_line_rows, "drop", "timestamp"))
    assert info.value.line == 1


def test_csv_records_report_the_line_a_record_starts_on(tmp_path):
    path = write(tmp_path / "t.csv", '\ufeffid,title\n1,"two\nlines"\n\n2,plain\n')
    assert list(csv_records(str(path))) == [(1, ["id", "title"]), (2, ["1", "two\nlines"]), (5, ["2", "plain"])]


def test_gzip_files_are_read_transparently(tmp_path):
    path = tmp_path / "log.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("u1,i1,10\nu2,i2,20\n")
    assert [line for line, _ in text_lines(str(path))] == [1, 2]


def test_load_needs_input_except_for_movielens():
    with pytest.raises(ConfigError, match="data.input"):
        load(DataConfig(format="steam"))


# ---------------------------------------------------------------- MovieLens

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
    "|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)"
    "|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0\n"
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "1533|Café au lait (1993)|01-Jan-1993||http://us.imdb.com/x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|1|0|0|0|0\n"
)
U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n244\t51\t2\t880606923\n"


def ml100k_raw(directory: Path, data: str = U_DATA) -> Path:
    write(directory / "u.item", U_ITEM, "latin-1")
    write(directory / "u.data", data, "latin-1")
    return directory


def test_movielens_100k_raw(ray_session, tmp_path):
    source = load(DataConfig(input=str(ml100k_raw(tmp_path))))
    assert source.files == [str(tmp_path / "u.data"), str(tmp_path / "u.item")]
    assert source.catalog.to_pylist() == [
        {"item_id": "1", "title": "Toy Story (1995)", "categories": ["Animation", "Children's", "Comedy"]},
        {"item_id": "2", "title": "GoldenEye (1995)", "categories": ["Action", "Adventure", "Thriller"]},
        {"item_id": "267", "title": "unknown", "categories": ["unknown"]},
        {"item_id": "1533", "title": "Café au lait (1993)", "categories": ["Comedy", "Romance"]},
    ]
    got = rows(source)
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["rating"], r["source_line"]) for r in got] == [
        ("196", "242", 881250949, 3.0, 1), ("186", "302", 891717742, 3.0, 2),
        ("22", "377", 878887116, 1.0, 3), ("244", "51", 880606923, 2.0, 4)]
    assert {r["source_file"] for r in got} == {str(tmp_path / "u.data")}
    assert all(r["drop_reason"] is None for r in got) and source.dropped == {}


def test_movielens_1m_dat_latin1_titles_with_colons(ray_session, tmp_path):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n"
          "260::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi\n"
          "3::Les Misérables (1995)::Drama|War\n", "latin-1")
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::260::4::978300275\n")
    source = load(DataConfig(input=str(tmp_path)))
    assert source.catalog.column("title").to_pylist() == [
        "Toy Story (1995)", "Star Wars: Episode IV - A New Hope (1977)", "Les Misérables (1995)"]
    assert source.catalog.column("categories").to_pylist()[1] == ["Action", "Adventure", "Fantasy", "Sci-Fi"]
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["rating"]) for r in rows(source)] == [
        ("1", "1193", 978300760, 5.0), ("1", "661", 978302109, 3.0), ("2", "260", 978300275, 4.0)]


def test_movielens_10m_dat_utf8_half_stars_and_no_genres(ray_session, tmp_path):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Adventure|Animation\n"
          "8536::Intolerância (1916)::Drama\n"
          "64997::War of the Worlds (2005)::(no genres listed)\n")
    write(tmp_path / "ratings.dat", "1::122::5::838985046\n1::8536::3.5::838983525\n2::64997::0.5::868245777\n")
    source = load(DataConfig(input=str(tmp_path)))
    assert source.catalog.column("title").to_pylist()[1] == "Intolerância (1916)"
    assert source.catalog.column("categories").to_pylist() == [["Adventure", "Animation"], ["Drama"], []]
    assert [r["rating"] for r in rows(source)] == [5.0, 3.5, 0.5]


def test_movielens_parquet_pair_row_numbers_across_row_groups(ray_session, tmp_path):
    data = pa.table({"user_id": [1, 1, 2, 2, 3], "movie_id": [10, 20, 10, 30, 20],
                     "rating": [4, 5, 3, 2, 1], "timestamp": [100, 200, 300, 400, 500]})
    pq.write_table(data, tmp_path / PARQUET_DATA, compression="brotli", row_group_size=2)
    flags = {g: [0, 0, 0] for g in GENRES_100K}
    flags["Drama"], flags["War"], flags["unknown"] = [1, 0, 0], [1, 0, 0], [0, 0, 1]
    flags["Comedy"] = [0, 1, 0]
    items = pa.table({"movie_id": [10, 20, 30], "movie_title": ["A (1990)", "B (1991)", "C (1992)"],
                      "release_date": ["", "", ""], "video_release_date": [None, None, None],
                      "IMDb_URL": ["", "", ""], **flags})
    pq.write_table(items, tmp_path / PARQUET_ITEMS, compression="brotli")
    source = load(DataConfig(input=str(tmp_path)))
    assert source.catalog.to_pylist() == [
        {"item_id": "10", "title": "A (1990)", "categories": ["Drama", "War"]},
        {"item_id": "20", "title": "B (1991)", "categories": ["Comedy"]},
        {"item_id": "30", "title": "C (1992)", "categories": ["unknown"]}]
    got = rows(source)
    assert [r["source_line"] for r in got] == [1, 2, 3, 4, 5]
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in got][3] == ("2", "30", 400)


def test_movielens_directory_without_known_files_lists_what_it_expects(tmp_path):
    write(tmp_path / "u.data", U_DATA)          # u.item missing
    with pytest.raises(DataError) as info:
        load(DataConfig(input=str(tmp_path)))
    assert info.value.path == str(tmp_path)
    for name in ("u.item", "ratings.dat", "movies.dat", PARQUET_DATA):
        assert name in str(info.value)


def test_movielens_json_file_is_not_u_data_even_under_drop(tmp_path):
    ml100k_raw(tmp_path, data='{"user": 196, "item": 242, "rating": 3, "timestamp": 881250949}\n')
    with pytest.raises(DataError) as info:
        load(DataConfig(input=str(tmp_path), on_bad_rows="drop"))
    assert (info.value.path, info.value.line) == (str(tmp_path / "u.data"), 1)
    assert "expected 4 fields" in str(info.value)


@pytest.mark.parametrize("stamp, words", [("soon", "not a number"), ("-978300760", "negative")])
def test_movielens_bad_timestamp_names_file_line_field(ray_session, tmp_path, stamp, words):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n")
    write(tmp_path / "ratings.dat", f"1::1::5::978300760\n2::1::4::978300761\n3::1::3::{stamp}\n")
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(input=str(tmp_path))))
    err = failure(info)
    assert (err.path, err.line, err.field) == (str(tmp_path / "ratings.dat"), 3, "timestamp")
    assert words in str(err)
    got = rows(load(DataConfig(input=str(tmp_path), on_bad_rows="drop")))
    assert [r["drop_reason"] is None for r in got] == [True, True, False]
    assert words in got[2]["drop_reason"] and "line 3" in got[2]["drop_reason"]
    assert got[2]["timestamp"] is None and got[2]["user_id"] == "3"


def test_movielens_unparsable_line_becomes_a_dropped_row(ray_session, tmp_path):
    ml100k_raw(tmp_path, data="196\t242\t3\t881250949\n186 302 3 891717742\n22\t377\t1\t878887116\n")
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(input=str(tmp_path))))
    assert failure(info).line == 2
    got = rows(load(DataConfig(input=str(tmp_path), on_bad_rows="drop")))
    assert [r["source_line"] for r in got] == [1, 2, 3]
    assert got[1]["user_id"] is None and "expected 4 fields" in got[1]["drop_reason"]


def test_movielens_non_utf8_ratings_names_line(ray_session, tmp_path):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n")
    (tmp_path / "ratings.dat").write_bytes(b"1::1::5::978300760\n2::1\xe9::4::978300761\n")
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(input=str(tmp_path), on_bad_rows="drop")))
    err = failure(info)
    assert (err.path, err.line) == (str(tmp_path / "ratings.dat"), 2) and "utf-8" in str(err)


def test_movielens_empty_ratings_file(tmp_path):
    ml100k_raw(tmp_path, data="")
    with pytest.raises(DataError, match="file is empty"):
        load(DataConfig(input=str(tmp_path)))


def test_movielens_bad_genre_flags_name_the_item_line(tmp_path):
    write(tmp_path / "u.item", U_ITEM.replace("|0|1|1|0|", "|0|x|1|0|"), "latin-1")
    write(tmp_path / "u.data", U_DATA)
    with pytest.raises(DataError) as info:
        load(DataConfig(input=str(tmp_path)))
    assert (info.value.path, info.value.line) == (str(tmp_path / "u.item"), 2)
