"""Any interaction log in Parquet or CSV, its columns named by `data.columns`.

`data.input` is a .parquet/.csv(.gz) file or a directory of them; `data.catalog`
the item file(s) (item id, title, optional categories, same column names). Without
a catalog the titles and categories come from the log itself, first seen per item.
See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import ray.data

from recray.config import DataConfig, TableColumns
from recray.data.loaders import Source
from recray.data.loaders.readers import (CatalogEntry, LineFormatError, Row, build_catalog,
                                         csv_header, csv_with_header, existing, header_dict,
                                         lines_dataset, open_parquet, parquet_dataset,
                                         require_columns, unique)
from recray.data.schema import catalog_table
from recray.errors import DataError


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError("expected a .parquet or .csv file, or a directory of them", str(path))


def table_files(path: Path) -> tuple[list[str], str]:
    """The files of a table input and their kind, "parquet" or "csv"."""
    if not path.is_dir():
        return [str(path)], _kind(path)
    parquet = sorted(path.glob("*.parquet"))
    csvs = sorted(path.glob("*.csv")) + sorted(path.glob("*.csv.gz"))
    if parquet and csvs:
        raise DataError("holds both Parquet and CSV files: point the config at one kind", str(path))
    if not parquet and not csvs:
        raise DataError("no *.parquet or *.csv files here", str(path))
    return [str(p) for p in parquet or csvs], "parquet" if parquet else "csv"


def _csv_row(record: tuple, path: str, line: int, columns: dict[str, str | None]) -> Row:
    row = header_dict(record, path, line)
    rating = columns["rating"]
    return row[columns["user_id"]], row[columns["item_id"]], row[columns["timestamp"]], \
        row[rating] if rating else None


def _interactions(files: list[str], kind: str, cols: TableColumns, on_bad_rows: str) -> ray.data.Dataset:
    columns = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp,
               "rating": cols.rating}
    if kind == "parquet":
        return parquet_dataset(files, columns, on_bad_rows)
    for path in files:
        require_columns(path, csv_header(path), columns.values())
    return lines_dataset(files, csv_with_header, partial(_csv_row, columns=columns), on_bad_rows,
                         timestamp_field=cols.timestamp, rating_field=cols.rating or "rating")


def _categories(value, sep: str) -> list[str]:
    """A list column as is; a string cell split on `sep`; nothing else is a category."""
    if isinstance(value, str):
        value = value.split(sep)
    return unique(value) if isinstance(value, list) else []


def _item_columns(cols: TableColumns) -> list[str]:
    return [c for c in (cols.item_id, cols.title, cols.categories) if c is not None]


def _parquet_entries(path: str, cols: TableColumns) -> Iterator[CatalogEntry]:
    parquet = open_parquet(path)
    require_columns(path, parquet.schema_arrow.names, _item_columns(cols))
    for part in parquet.iter_batches(columns=unique(_item_columns(cols))):
        cats = part.column(cols.categories).to_pylist() if cols.categories else repeat(None)
        for item, title, value in zip(part.column(cols.item_id).to_pylist(),
                                      part.column(cols.title).to_pylist(), cats):
            yield item, title, _categories(value, cols.categories_sep)


def _csv_entries(path: str, cols: TableColumns, on_bad_rows: str,
                 dropped: Counter | None) -> Iterator[CatalogEntry]:
    """`dropped` is None when the file is the interaction log: its malformed rows are
    already marked by the interactions pass and must not be counted twice."""
    require_columns(path, csv_header(path), _item_columns(cols))
    seen = 0
    for line, record in csv_with_header(path):
        try:
            row = header_dict(record, path, line)
        except LineFormatError:
            if on_bad_rows != "drop" or seen == 0:
                raise
            if dropped is not None:
                dropped["catalog: line unparsable"] += 1
        else:
            yield (row[cols.item_id], row[cols.title],
                   _categories(row[cols.categories] if cols.categories else None, cols.categories_sep))
        seen += 1
    if seen == 0:
        raise DataError("file is empty", path)


def _entries(path: str, kind: str, cols: TableColumns, on_bad_rows: str,
             dropped: Counter | None) -> Iterator[CatalogEntry]:
    return _parquet_entries(path, cols) if kind == "parquet" else _csv_entries(path, cols, on_bad_rows, dropped)


def _first_per_item(entries: Iterable[CatalogEntry]) -> pa.Table:
    """One catalog row per item of a log, its first title winning. Items repeat in a
    log by nature, so repeats are not drops; rows without an item id are marked by
    the interactions pass."""
    chosen: dict[str, tuple] = {}
    for item, title, cats in entries:
        key = None if item is None else str(item).strip()
        if key and key not in chosen:
            chosen[key] = (title, cats)
    return catalog_table(list(chosen), [t for t, _ in chosen.values()], [c for _, c in chosen.values()])


def load(cfg: DataConfig) -> Source:
    files, kind = table_files(existing(cfg.input, "data.input"))
    interactions = _interactions(files, kind, cfg.columns, cfg.on_bad_rows)
    dropped: Counter = Counter()
    if cfg.catalog is None:
        catalog_files: list[str] = []
        catalog = _first_per_item(entry for path in files
                                  for entry in _entries(path, kind, cfg.columns, cfg.on_bad_rows, None))
    else:
        catalog_files, catalog_kind = table_files(existing(cfg.catalog, "data.catalog"))
        catalog = build_catalog((entry for path in catalog_files
                                 for entry in _entries(path, catalog_kind, cfg.columns, cfg.on_bad_rows, dropped)),
                                dropped)
    return Source(interactions, catalog, files + catalog_files, dict(dropped))
