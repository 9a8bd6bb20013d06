"""Goodreads (Wan & McAuley, UCSD Book Graph), one genre subset or the whole set:
`goodreads_interactions_<genre>.json`, `goodreads_books_<genre>.json` and, if
present, `goodreads_book_genres_initial.json`; JSON lines, optionally gzipped.
See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.loaders.readers import (CatalogEntry, LineFormatError, Row, build_catalog,
                                         catalog_records, glob_first, json_object, lines_dataset,
                                         locate, text_lines)
from recray.errors import DataError

INTERACTION_FILES = ("goodreads_interactions*.json",)
BOOK_FILES = ("goodreads_books*.json",)
GENRE_FILES = ("goodreads_book_genres_initial.json",)
# The first non-empty one is the interaction's time: shelving a book is the
# interaction; the others stand in where it is missing.
DATE_FIELDS = ("date_added", "date_updated", "read_at")
DATE_FORMAT = "%a %b %d %H:%M:%S %z %Y"          # Mon Aug 21 11:20:23 -0700 2017
# Shelves that say what a reader did with a book, not what the book is.
NON_GENRE_SHELVES = frozenset({
    "to-read", "currently-reading", "read", "favorites", "favourites", "owned", "books-i-own",
    "owned-books", "i-own", "my-books", "my-library", "library", "books", "default", "wish-list",
    "wishlist", "to-buy", "kindle", "ebook", "ebooks", "e-book", "e-books", "audiobook", "audiobooks",
    "audio", "re-read", "did-not-finish", "dnf", "abandoned", "on-hold", "to-read-owned",
})
TOP_SHELVES = 5


def date_seconds(value, path: str, line: int, field: str) -> int:
    try:
        return int(datetime.strptime(str(value).strip(), DATE_FORMAT).timestamp())
    except ValueError:
        raise DataError(f"date {value!r} is not like 'Mon Aug 21 11:20:23 -0700 2017'",
                        path, line, field) from None


def _interaction_row(text: str, path: str, line: int) -> Row:
    record = json_object(text, path, line)
    field = next((f for f in DATE_FIELDS if record.get(f)), None)
    if field is None:
        raise DataError(f"no date: {', '.join(DATE_FIELDS)} are all empty", path, line, DATE_FIELDS[0])
    rating = record.get("rating")
    # Goodreads writes 0 for "shelved but not rated": no rating, not the lowest one.
    return (record.get("user_id"), record.get("book_id"), date_seconds(record[field], path, line, field),
            None if rating in (0, "0") else rating)


def _count(value, path: str, line: int, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LineFormatError(f"{what} count {value!r} is not a number", path, line) from None


def top_shelves(shelves, path: str, line: int) -> list[str]:
    """The TOP_SHELVES most used shelves that name a genre (ties: file order)."""
    if not isinstance(shelves, list):
        return []
    named = [(s["name"].strip(), _count(s.get("count"), path, line, "popular_shelves"))
             for s in shelves if isinstance(s, dict) and isinstance(s.get("name"), str)]
    ranked = sorted((pair for pair in named if pair[0] and pair[0].lower() not in NON_GENRE_SHELVES),
                    key=lambda pair: -pair[1])
    return list(dict.fromkeys(name for name, _ in ranked))[:TOP_SHELVES]


def _book_entry(text: str, path: str, line: int) -> CatalogEntry:
    book = json_object(text, path, line)
    return book.get("book_id"), book.get("title"), top_shelves(book.get("popular_shelves"), path, line)


def _genre_entry(text: str, path: str, line: int) -> tuple[str | None, list[str]]:
    record = json_object(text, path, line)
    genres = record.get("genres") or {}
    if not isinstance(genres, dict):
        raise LineFormatError("'genres' must map genre names to counts", path, line)
    ranked = sorted(genres.items(), key=lambda kv: (-_count(kv[1], path, line, "genres"), kv[0]))
    book = record.get("book_id")
    return None if book is None else str(book).strip(), [name for name, _ in ranked]


def _genres(files: list[Path], books: set[str], on_bad_rows: str, dropped: Counter) -> dict[str, list[str]]:
    """Genres of the catalog's books, most voted first; the file covers the whole
    Book Graph, so other books are skipped (they are not dropped data)."""
    genres: dict[str, list[str]] = {}
    for path in files:
        for book, names in catalog_records(str(path), _genre_entry, on_bad_rows, dropped):
            if book in books:
                genres.setdefault(book, names)
    return genres


def load(cfg: DataConfig) -> Source:
    logs, metas = locate(cfg, INTERACTION_FILES, BOOK_FILES)
    dropped: Counter = Counter()
    books = [entry for meta in metas for entry in catalog_records(meta, _book_entry, cfg.on_bad_rows, dropped)]
    genre_files = glob_first(Path(metas[0]).parent, GENRE_FILES)
    if genre_files:
        genres = _genres(genre_files, {str(b).strip() for b, _, _ in books if b is not None},
                         cfg.on_bad_rows, dropped)
        # One vocabulary for all books: a book the genres file lacks gets none, not shelves.
        books = [(b, title, genres.get(str(b).strip(), []) if b is not None else []) for b, title, _ in books]
    catalog = build_catalog(books, dropped)
    interactions = lines_dataset(logs, text_lines, _interaction_row, cfg.on_bad_rows,
                                 timestamp_field=DATE_FIELDS[0])
    return Source(interactions, catalog, logs + metas + [str(p) for p in genre_files], dict(dropped))
