"""MovieLens (GroupLens): the 100k raw files, the 1M/10M `.dat` files, and the
100k Parquet pair embedded by `recray fetch`. `data.input` is the directory; the
variant is told by which files it holds. See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.loaders.readers import (LineFormatError, Row, build_catalog, catalog_records,
                                         existing, lines_dataset, open_parquet, parquet_dataset,
                                         require_columns, text_lines)
from recray.errors import DataError

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
PARQUET_DATA = "MovieLens100k_data.parquet.brotli"
PARQUET_ITEMS = "MovieLens100k_items.parquet.brotli"
# ML-10M marks a movie without genres this way; it is the absence of a category, not one.
NO_GENRES = "(no genres listed)"


def _split(text: str, sep: str, path: str, line: int) -> Row:
    fields = text.split(sep)
    if len(fields) != 4:
        raise LineFormatError(f"expected 4 fields user{sep}item{sep}rating{sep}timestamp separated by "
                              f"{sep!r}, found {len(fields)}", path, line)
    user, item, rating, stamp = fields
    return user, item, stamp, rating


def _udata_row(text: str, path: str, line: int) -> Row:
    return _split(text, "\t", path, line)


def _ratings_dat_row(text: str, path: str, line: int) -> Row:
    return _split(text, "::", path, line)


def _uitem_entry(text: str, path: str, line: int) -> tuple[str, str, list[str]]:
    fields = text.split("|")
    if len(fields) != 5 + len(GENRES_100K):
        raise LineFormatError(f"expected {5 + len(GENRES_100K)} '|'-separated fields "
                              f"(id|title|release date|video release date|IMDb URL|19 genre flags), "
                              f"found {len(fields)}", path, line)
    flags = [f.strip() for f in fields[5:]]
    if any(f not in ("0", "1") for f in flags):
        raise LineFormatError("genre flags must be 0 or 1", path, line)
    return fields[0], fields[1], [g for g, f in zip(GENRES_100K, flags) if f == "1"]


def _movies_dat_entry(text: str, path: str, line: int) -> tuple[str, str, list[str]]:
    parts = text.split("::")
    if len(parts) < 3:
        raise LineFormatError("expected 'id::title::Genre1|Genre2'", path, line)
    # A title may hold '::'-free colons; genres are always the last field.
    genres = parts[-1].strip()
    return parts[0], "::".join(parts[1:-1]), [] if genres == NO_GENRES else [g for g in genres.split("|") if g]


def _movies_dat_encoding(path: str) -> str:
    """ML-10M's movies.dat is UTF-8, ML-1M's is latin-1: the first that decodes the whole file."""
    try:
        Path(path).read_bytes().decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def _load_text(cfg: DataConfig, ratings: str, movies: str, ratings_row, movies_entry,
               ratings_encoding: str, movies_encoding: str) -> Source:
    dropped: Counter = Counter()
    catalog = build_catalog(catalog_records(movies, movies_entry, cfg.on_bad_rows, dropped,
                                            encoding=movies_encoding), dropped)
    interactions = lines_dataset([ratings], partial(text_lines, encoding=ratings_encoding), ratings_row,
                                 cfg.on_bad_rows, timestamp_field="timestamp")
    return Source(interactions, catalog, [ratings, movies], dict(dropped))


def _load_parquet(cfg: DataConfig, data: str, items: str) -> Source:
    interactions = parquet_dataset([data], {"user_id": "user_id", "item_id": "movie_id",
                                            "timestamp": "timestamp", "rating": "rating"}, cfg.on_bad_rows)
    require_columns(items, open_parquet(items).schema_arrow.names, ("movie_id", "movie_title", *GENRES_100K))
    table = pq.read_table(items, columns=["movie_id", "movie_title", *GENRES_100K])
    flags = [table.column(g).to_pylist() for g in GENRES_100K]
    categories = [[g for g, f in zip(GENRES_100K, row) if f == 1] for row in zip(*flags)]
    dropped: Counter = Counter()
    catalog = build_catalog(zip(table.column("movie_id").to_pylist(), table.column("movie_title").to_pylist(),
                                categories), dropped)
    return Source(interactions, catalog, [data, items], dict(dropped))


def load(cfg: DataConfig) -> Source:
    if cfg.input is None:
        from recray.assets import movielens100k_dir
        directory = movielens100k_dir()
    else:
        directory = existing(cfg.input, "data.input")
    if not directory.is_dir():
        raise DataError("format movielens expects a directory (the unpacked ml-100k, ml-1m or ml-10M100K)",
                        str(directory))

    def has(*names: str) -> bool:
        return all((directory / n).is_file() for n in names)

    def at(name: str) -> str:
        return str(directory / name)

    if has("u.data", "u.item"):
        # The 100k files predate UTF-8 in GroupLens's releases: latin-1 by definition.
        return _load_text(cfg, at("u.data"), at("u.item"), _udata_row, _uitem_entry, "latin-1", "latin-1")
    if has("ratings.dat", "movies.dat"):
        return _load_text(cfg, at("ratings.dat"), at("movies.dat"), _ratings_dat_row, _movies_dat_entry,
                          "utf-8", _movies_dat_encoding(at("movies.dat")))
    if has(PARQUET_DATA, PARQUET_ITEMS):
        return _load_parquet(cfg, at(PARQUET_DATA), at(PARQUET_ITEMS))
    raise DataError(f"no MovieLens files: expected u.data + u.item (ML-100k), ratings.dat + movies.dat "
                    f"(ML-1M/10M) or {PARQUET_DATA} + {PARQUET_ITEMS} (embedded ML-100k)", str(directory))
