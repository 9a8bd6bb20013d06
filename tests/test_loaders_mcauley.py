"""The McAuley-lab formats (Amazon 2014, Steam, Goodreads) on small files written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from recray.config import DataConfig
from recray.data.loaders import Source, load
from recray.data.schema import CATALOG, INTERACTIONS
from recray.errors import DataError
from recray.runtime import unwrap


def rows(source: Source) -> list[dict]:
    assert source.interactions.schema().base_schema == INTERACTIONS
    assert source.catalog.schema == CATALOG
    return sorted(source.interactions.take_all(), key=lambda r: (r["source_file"], r["source_line"]))


def failure(excinfo) -> DataError:
    err = unwrap(excinfo.value)
    assert isinstance(err, DataError)
    return err


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def json_lines(path: Path, records: list[dict]) -> Path:
    return write(path, [json.dumps(r) for r in records])


# ---------------------------------------------------------------- Amazon 2014

REVIEWS = [
    {"reviewerID": "A2X3GTEMWYJRVX", "asin": "5555991584", "reviewerName": "Leon",
     "helpful": [0, 0], "reviewText": "Great.", "overall": 5.0, "summary": "Wow",
     "unixReviewTime": 1402358400, "reviewTime": "06 10, 2014"},
    {"reviewerID": "A2X3GTEMWYJRVX", "asin": "B00000016W", "overall": 4.0, "unixReviewTime": 1402444800},
    {"reviewerID": "A1JG7QTY1PSRYJ", "asin": "5555991584", "overall": 3.0, "unixReviewTime": 1358121600},
]
META = [
    "{'asin': '5555991584', 'title': 'Memory of Trees', 'price': 9.49, 'salesRank': {'Music': 3},"
    " 'categories': [['CDs & Vinyl', 'Pop'], ['CDs & Vinyl', 'New Age', 'Celtic New Age']]}",
    "{'asin': 'B00000016W', 'related': {'also_bought': ['B0000']},"
    " 'categories': [['CDs & Vinyl', 'Rock', 'Classic Rock'], ['CDs & Vinyl', 'Rock']]}",
    "{'asin': 'B0000001P4', 'title': \"Don't Look Back\", 'categories': [['CDs & Vinyl', 'Rock']]}",
]


def amazon(directory: Path, reviews: list[str] | None = None, meta: list[str] = META) -> Path:
    write(directory / "reviews_CDs_and_Vinyl_5.json", reviews or [json.dumps(r) for r in REVIEWS])
    with gzip.open(directory / "meta_CDs_and_Vinyl.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")
    return directory


def test_amazon_reviews_and_literal_metadata(ray_session, tmp_path):
    write(amazon(tmp_path) / "ratings_CDs_and_Vinyl.csv", ["A2X3GTEMWYJRVX,5555991584,5.0,1402358400"])
    source = load(DataConfig(format="amazon2014", input=str(tmp_path)))
    # The 5-core reviews are preferred: the ratings CSV of the same category is not read too.
    assert source.files == [str(tmp_path / "reviews_CDs_and_Vinyl_5.json"),
                            str(tmp_path / "meta_CDs_and_Vinyl.json.gz")]
    assert source.catalog.to_pylist() == [
        {"item_id": "5555991584", "title": "Memory of Trees",
         "categories": ["CDs & Vinyl", "Pop", "New Age", "Celtic New Age"]},
        {"item_id": "B00000016W", "title": None, "categories": ["CDs & Vinyl", "Rock", "Classic Rock"]},
        {"item_id": "B0000001P4", "title": "Don't Look Back", "categories": ["CDs & Vinyl", "Rock"]}]
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["rating"], r["source_line"]) for r in rows(source)] == [
        ("A2X3GTEMWYJRVX", "5555991584", 1402358400, 5.0, 1), ("A2X3GTEMWYJRVX", "B00000016W", 1402444800, 4.0, 2),
        ("A1JG7QTY1PSRYJ", "5555991584", 1358121600, 3.0, 3)]


def test_amazon_ratings_csv_as_an_explicit_file(ray_session, tmp_path):
    ratings = write(tmp_path / "ratings_CDs_and_Vinyl.csv", [
        "A2X3GTEMWYJRVX,5555991584,5.0,1402358400", "A1JG7QTY1PSRYJ,B00000016W,2.0,1358121600",
        "AZZZ,B0000001P4,4.0,1358121601"])
    meta = write(tmp_path / "elsewhere.json", META)
    source = load(DataConfig(format="amazon2014", input=str(ratings), catalog=str(meta)))
    assert source.files == [str(ratings), str(meta)]
    assert [(r["item_id"], r["rating"], r["source_line"]) for r in rows(source)] == [
        ("5555991584", 5.0, 1), ("B00000016W", 2.0, 2), ("B0000001P4", 4.0, 3)]


def test_amazon_missing_asin_is_named_and_marked_under_drop(ray_session, tmp_path):
    bad = dict(REVIEWS[2])
    del bad["asin"]
    amazon(tmp_path, [json.dumps(r) for r in (*REVIEWS[:2], bad)])
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(format="amazon2014", input=str(tmp_path))))
    err = failure(info)
    assert (err.line, err.field) == (3, "item_id") and "missing id" in str(err)
    got = rows(load(DataConfig(format="amazon2014", input=str(tmp_path), on_bad_rows="drop")))
    assert [r["drop_reason"] is not None for r in got] == [False, False, True]


def test_amazon_unparsable_metadata_literal(tmp_path):
    amazon(tmp_path, meta=[META[0], "{'asin': 'B00000016W', 'title': 'Broken", META[2]])
    meta = str(tmp_path / "meta_CDs_and_Vinyl.json.gz")
    with pytest.raises(DataError) as info:
        load(DataConfig(format="amazon2014", input=str(tmp_path)))
    assert (info.value.path, info.value.line) == (meta, 2) and "Python dict literal" in str(info.value)
    source = load(DataConfig(format="amazon2014", input=str(tmp_path), on_bad_rows="drop"))
    assert source.dropped == {"catalog: line unparsable": 1}
    assert source.catalog.column("item_id").to_pylist() == ["5555991584", "B0000001P4"]


def test_amazon_file_in_another_format(tmp_path):
    # The ratings CSV saved under the reviews name: not JSON on line 1, an error even under drop.
    amazon(tmp_path, ["A2X3GTEMWYJRVX,5555991584,5.0,1402358400"])
    with pytest.raises(DataError) as info:
        load(DataConfig(format="amazon2014", input=str(tmp_path), on_bad_rows="drop"))
    assert info.value.line == 1 and "JSON object" in str(info.value)


def test_amazon_needs_metadata(tmp_path):
    write(tmp_path / "reviews_CDs_and_Vinyl_5.json", [json.dumps(REVIEWS[0])])
    with pytest.raises(DataError, match="meta_"):
        load(DataConfig(format="amazon2014", input=str(tmp_path)))


# ---------------------------------------------------------------- Steam

STEAM_REVIEWS = [
    "{u'username': u'Chaos Syren', u'hours': 0.1, u'products': 41, u'product_id': u'725280',"
    " u'page_order': 0, u'date': u'2017-12-17', u'text': u'This would not be acceptable.',"
    " u'early_access': False, u'page': 1}",
    "{u'username': u'Ariman1', u'hours': 13.2, u'product_id': u'328100', u'date': u'2017-08-02',"
    " u'text': u'Addictive', u'early_access': False}",
    "{u'user_id': u'76561198007483075', u'product_id': u'35140', u'date': u'2018-01-04',"
    " u'text': u'ok', u'early_access': False}",
]
STEAM_GAMES = [
    "{u'publisher': u'Kotoshiro', u'genres': [u'Action', u'Casual', u'Indie'], u'app_name': u'Lost Summoner"
    " Kitty', u'title': u'Lost Summoner Kitty', u'tags': [u'Strategy', u'Action'], u'price': 4.99,"
    " u'id': u'725280', u'early_access': False}",
    "{u'tags': [u'Free to Play', u'Strategy'], u'title': u'Gunspell - Steam Edition', u'id': u'328100'}",
    "{u'app_name': u'Batman: Arkham Asylum GOTY', u'genres': [u'Action'], u'id': u'35140', u'price': 19.99}",
    "{u'app_name': u'Soundtrack without id', u'genres': [u'Audio']}",
]


def steam(directory: Path, reviews: list[str] = STEAM_REVIEWS) -> Path:
    write(directory / "steam_reviews.json", reviews)
    write(directory / "steam_games.json", STEAM_GAMES)
    return directory


def test_steam_reviews_and_games(ray_session, tmp_path):
    source = load(DataConfig(format="steam", input=str(steam(tmp_path)), noun="game"))
    assert source.catalog.to_pylist() == [
        {"item_id": "725280", "title": "Lost Summoner Kitty", "categories": ["Action", "Casual", "Indie"]},
        {"item_id": "328100", "title": "Gunspell - Steam Edition", "categories": ["Free to Play", "Strategy"]},
        {"item_id": "35140", "title": "Batman: Arkham Asylum GOTY", "categories": ["Action"]}]
    assert source.dropped == {"catalog: no item id": 1}
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["rating"]) for r in rows(source)] == [
        ("Chaos Syren", "725280", 1513468800, None), ("Ariman1", "328100", 1501632000, None),
        ("76561198007483075", "35140", 1515024000, None)]


def test_steam_bad_date(ray_session, tmp_path):
    steam(tmp_path, [*STEAM_REVIEWS[:2], STEAM_REVIEWS[2].replace("2018-01-04", "Jan 4, 2018")])
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(format="steam", input=str(tmp_path))))
    err = failure(info)
    assert (err.path, err.line, err.field) == (str(tmp_path / "steam_reviews.json"), 3, "date")
    got = rows(load(DataConfig(format="steam", input=str(tmp_path), on_bad_rows="drop")))
    assert "YYYY-MM-DD" in got[2]["drop_reason"] and got[2]["source_line"] == 3


def test_steam_unparsable_literal(ray_session, tmp_path):
    steam(tmp_path, [STEAM_REVIEWS[0], "{u'username': u'x', u'product_id': u'1', u'date':", STEAM_REVIEWS[1]])
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(format="steam", input=str(tmp_path))))
    assert failure(info).line == 2
    got = rows(load(DataConfig(format="steam", input=str(tmp_path), on_bad_rows="drop")))
    assert [r["source_line"] for r in got if r["drop_reason"]] == [2]


# ---------------------------------------------------------------- Goodreads

INTERACTIONS_GR = [
    {"user_id": "8842281e1d1347389f2ab93d60773d4d", "book_id": "24375664", "review_id": "5cd416f3",
     "is_read": True, "rating": 5, "review_text_incomplete": "",
     "date_added": "Mon Aug 28 13:51:31 -0700 2017", "date_updated": "Thu Aug 31 13:17:30 -0700 2017",
     "read_at": "Sat Aug 26 12:05:52 -0700 2017", "started_at": "Tue Aug 15 13:24:57 -0700 2017"},
    {"user_id": "8842281e1d1347389f2ab93d60773d4d", "book_id": "18245960", "is_read": False, "rating": 0,
     "date_added": "", "date_updated": "Sun Jul 30 07:44:10 -0700 2017", "read_at": ""},
    {"user_id": "72fb0d0087d28c832f15776b0d936598", "book_id": "24375664", "is_read": True, "rating": 3,
     "date_added": "Wed Mar 22 11:37:04 +0000 2017", "date_updated": "", "read_at": ""},
]
BOOKS_GR = [
    {"book_id": "24375664", "title": "The Hunger Games (The Hunger Games, #1)",
     "popular_shelves": [{"count": "100", "name": "to-read"}, {"count": "40", "name": "young-adult"},
                         {"count": "55", "name": "favorites"}, {"count": "50", "name": "dystopia"},
                         {"count": "7", "name": "currently-reading"}]},
    {"book_id": "18245960", "title": "The Three Body Problem",
     "popular_shelves": [{"count": "9", "name": "sci-fi"}, {"count": "12", "name": "science-fiction"}]},
    {"book_id": "1", "title": "", "popular_shelves": []},
]


def goodreads(directory: Path, interactions: list[dict] = INTERACTIONS_GR) -> Path:
    json_lines(directory / "goodreads_interactions_young_adult.json", interactions)
    json_lines(directory / "goodreads_books_young_adult.json", BOOKS_GR)
    return directory


def test_goodreads_interactions_and_shelves(ray_session, tmp_path):
    source = load(DataConfig(format="goodreads", input=str(goodreads(tmp_path)), noun="book"))
    assert source.catalog.to_pylist() == [
        {"item_id": "24375664", "title": "The Hunger Games (The Hunger Games, #1)",
         "categories": ["dystopia", "young-adult"]},
        {"item_id": "18245960", "title": "The Three Body Problem", "categories": ["science-fiction", "sci-fi"]},
        {"item_id": "1", "title": "", "categories": []}]
    # date_added, else date_updated; a rating of 0 means "not rated"; offsets become UTC.
    assert [(r["item_id"], r["timestamp"], r["rating"]) for r in rows(source)] == [
        ("24375664", 1503953491, 5.0), ("18245960", 1501425850, None), ("24375664", 1490182624, 3.0)]


def test_goodreads_genres_file_wins_over_shelves(ray_session, tmp_path):
    json_lines(goodreads(tmp_path) / "goodreads_book_genres_initial.json", [
        {"book_id": "24375664", "genres": {"young-adult": 120, "fantasy, paranormal": 300, "fiction": 120}},
        {"book_id": "999", "genres": {"poetry": 3}},
        {"book_id": "1", "genres": {}}])
    source = load(DataConfig(format="goodreads", input=str(tmp_path)))
    assert str(tmp_path / "goodreads_book_genres_initial.json") in source.files
    assert source.catalog.column("categories").to_pylist() == [
        ["fantasy, paranormal", "fiction", "young-adult"], [], []]


def test_goodreads_unparsable_date_names_file_line_field(ray_session, tmp_path):
    bad = dict(INTERACTIONS_GR[2], date_added="2017-03-22")
    goodreads(tmp_path, [*INTERACTIONS_GR[:2], bad])
    with pytest.raises(DataError) as info:
        rows(load(DataConfig(format="goodreads", input=str(tmp_path))))
    err = failure(info)
    assert (Path(err.path).name, err.line, err.field) == ("goodreads_interactions_young_adult.json", 3, "date_added")
    got = rows(load(DataConfig(format="goodreads", input=str(tmp_path), on_bad_rows="drop")))
    assert [r["drop_reason"] is not None for r in got] == [False, False, True]


def test_goodreads_non_utf8_metadata_names_line(tmp_path):
    goodreads(tmp_path)
    books = tmp_path / "goodreads_books_young_adult.json"
    books.write_bytes(books.read_bytes().replace(b"Three Body", b"Thr\xe9e Body"))
    with pytest.raises(DataError) as info:
        load(DataConfig(format="goodreads", input=str(tmp_path)))
    assert (info.value.path, info.value.line) == (str(books), 2)


def test_goodreads_empty_interactions(tmp_path):
    write(goodreads(tmp_path) / "goodreads_interactions_young_adult.json", [])
    with pytest.raises(DataError, match="file is empty"):
        load(DataConfig(format="goodreads", input=str(tmp_path)))
