"""Machinery the format loaders share.

Interactions are read file-parallel and streaming: one Ray Data row per raw file
(or per Parquet row group), expanded by a generator UDF into canonical tables of
at most CHUNK_ROWS rows, so no file ever sits in memory whole and every row keeps
its exact 1-based `source_line`. Before any task starts, the driver parses the
first record of every file, so an empty file or a file in another format fails
`load()` at once instead of halfway through preparation.

Metadata (catalog) files are small next to the logs; they are parsed in the driver.

A format supplies two functions:
    records(path)              -> (line, record) pairs, the line a record starts on
    parse(record, path, line)  -> (user_id, item_id, timestamp, rating), raw values
`parse` raises LineFormatError when the record is not in the declared format and a
plain DataError for a bad value it checks itself (e.g. a date string).
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
from collections import Counter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from recray.config import DataConfig
from recray.data.schema import INTERACTIONS, catalog_table, interactions_from_arrow, interactions_table
from recray.errors import DataError

CHUNK_ROWS = 65_536

Row = tuple[Any, Any, Any, Any]                       # user_id, item_id, timestamp, rating
Records = Callable[[str], Iterator[tuple[int, Any]]]
Parse = Callable[[Any, str, int], Row]
CatalogEntry = tuple[Any, Any, Sequence[str]]         # item_id, title, categories


class LineFormatError(DataError):
    """A line that is not in the declared format, as opposed to a bad value in a
    well-formed line. On the first record of a file it means the whole file is in
    another format, so it is raised even under on_bad_rows=drop."""


# ---------------------------------------------------------------- files

def existing(path: str | Path, what: str) -> Path:
    found = Path(path).expanduser()
    if not found.exists():
        raise DataError(f"{what} does not exist", str(found))
    return found


def glob_first(directory: Path, patterns: Sequence[str]) -> list[Path]:
    """The files of the first pattern that matches anything; each pattern also
    matches its gzip-compressed form. Earlier patterns are preferred alternatives,
    so two copies of one log (e.g. 5-core and full reviews) are never both read."""
    for pattern in patterns:
        found = sorted(directory.glob(pattern)) + sorted(directory.glob(pattern + ".gz"))
        if found:
            return found
    return []


def locate(cfg: DataConfig, interactions: Sequence[str], catalog: Sequence[str]) -> tuple[list[str], list[str]]:
    """Interaction and metadata files. `cfg.input` is a directory holding both, or one
    interactions file; the metadata is `cfg.catalog` (file or directory) if set, else
    found beside the interactions."""
    source = existing(cfg.input, "data.input")
    where = source if source.is_dir() else source.parent
    logs = glob_first(source, interactions) if source.is_dir() else [source]
    if not logs:
        raise DataError(f"no interactions file: expected one of {', '.join(interactions)} "
                        f"(optionally .gz)", str(source))
    if cfg.catalog is not None:
        meta_path = existing(cfg.catalog, "data.catalog")
        metas = glob_first(meta_path, catalog) if meta_path.is_dir() else [meta_path]
        where = meta_path
    else:
        metas = glob_first(where, catalog)
    if not metas:
        raise DataError(f"no metadata file: expected one of {', '.join(catalog)} (optionally .gz) "
                        f"here, or set data.catalog", str(where))
    return [str(p) for p in logs], [str(p) for p in metas]


def _open_bytes(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def decoded_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Every line with its 1-based number, line ending kept. Bytes are decoded line
    by line so an undecodable byte is reported with its line."""
    try:
        with _open_bytes(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as err:
                    raise DataError(f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not "
                                    f"valid {encoding}", path, number) from None
                yield number, text
    except (gzip.BadGzipFile, EOFError) as err:
        raise DataError(f"not a readable gzip file ({err})", path) from None


def text_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Non-blank lines without their line ending. Blank lines (a trailing newline,
    a spacer) hold no record, so skipping them loses nothing."""
    for number, text in decoded_lines(path, encoding):
        text = text.rstrip("\r\n")
        if text.strip():
            yield number, text


def csv_records(path: str) -> Iterator[tuple[int, list[str]]]:
    """Comma-separated records (UTF-8) with the line each starts on; a quoted field
    may span lines, which is why line numbers are tracked here and not counted."""
    consumed = 0

    def counted() -> Iterator[str]:
        nonlocal consumed
        for consumed, text in decoded_lines(path):
            yield text

    start = 1
    reader = csv.reader(counted())
    try:
        for fields in reader:
            if fields:                       # [] is a blank line
                if start == 1 and fields[0].startswith("\ufeff"):
                    fields[0] = fields[0][1:]     # a UTF-8 byte order mark is no part of the data
                yield start, fields
            start = consumed + 1
    except csv.Error as err:
        raise LineFormatError(f"not valid CSV ({err})", path, start) from None


def csv_with_header(path: str) -> Iterator[tuple[int, tuple[tuple[str, ...], list[str]]]]:
    """Data records of a CSV file with a header row, each paired with the header."""
    records = csv_records(path)
    for _, names in records:
        header = tuple(name.strip() for name in names)
        break
    else:
        return
    for line, fields in records:
        yield line, (header, fields)


def csv_header(path: str) -> tuple[str, ...]:
    for _, names in csv_records(path):
        return tuple(name.strip() for name in names)
    raise DataError("file is empty", path)


def header_dict(record: tuple[tuple[str, ...], list[str]], path: str, line: int) -> dict[str, str]:
    header, fields = record
    if len(fields) != len(header):
        raise LineFormatError(f"expected {len(header)} comma-separated fields as in the header, "
                              f"found {len(fields)}", path, line)
    return dict(zip(header, fields))


def require_columns(path: str, present: Sequence[str], wanted: Iterable[str | None]) -> None:
    for name in wanted:
        if name is not None and name not in present:
            raise DataError(f"no column '{name}' (columns present: {', '.join(present)})", path, field=name)


# ---------------------------------------------------------------- one record per line

def json_object(text: str, path: str, line: int) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise LineFormatError(f"expected one JSON object per line ({err})", path, line) from None
    if not isinstance(value, dict):
        raise LineFormatError(f"expected one JSON object per line, found a {type(value).__name__}",
                              path, line)
    return value


def literal_dict(text: str, path: str, line: int) -> dict:
    """A line holding a Python dict literal (the McAuley-lab dumps); strict JSON lines,
    as some redistributions have them, are accepted too. Never `eval`."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = json.loads(text)
        except ValueError:
            raise LineFormatError("expected one Python dict literal (or JSON object) per line, "
                                  "and this line parses as neither", path, line) from None
    if not isinstance(value, dict):
        raise LineFormatError(f"expected one Python dict literal per line, found a {type(value).__name__}",
                              path, line)
    return value


# ---------------------------------------------------------------- interactions

def _unparsed_rows(path: str, lines: list[int], reasons: list[str]) -> pa.Table:
    """Rows for records that could not be split into fields (on_bad_rows=drop)."""
    n = len(lines)
    return pa.table({
        "user_id": pa.nulls(n, pa.string()), "item_id": pa.nulls(n, pa.string()),
        "timestamp": pa.nulls(n, pa.int64()), "rating": pa.nulls(n, pa.float64()),
        "source_file": pa.array([path] * n, pa.string()), "source_line": pa.array(lines, pa.int64()),
        "drop_reason": pa.array(reasons, pa.string()),
    }, schema=INTERACTIONS)


def file_chunks(path: str, records: Records, parse: Parse, on_bad_rows: str,
                timestamp_field: str, rating_field: str = "rating",
                chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Canonical interactions of one file, at most `chunk_rows` rows at a time."""
    good: list[list] = [[], [], [], [], []]          # users, items, stamps, ratings, lines
    bad_lines: list[int] = []
    bad_reasons: list[str] = []
    seen = 0

    def flush() -> pa.Table:
        table = interactions_table(*good[:4], path, good[4], timestamp_field=timestamp_field,
                                   rating_field=rating_field, on_bad_rows=on_bad_rows)
        if bad_lines:
            table = pa.concat_tables([table, _unparsed_rows(path, bad_lines, bad_reasons)]).sort_by("source_line")
        for column in good:
            column.clear()
        bad_lines.clear()
        bad_reasons.clear()
        return table

    for line, record in records(path):
        try:
            row = parse(record, path, line)
        except DataError as err:
            if on_bad_rows != "drop" or (seen == 0 and isinstance(err, LineFormatError)):
                raise
            bad_lines.append(line)
            bad_reasons.append(str(err))
        else:
            for column, value in zip(good, (*row, line)):
                column.append(value)
        seen += 1
        if len(good[4]) + len(bad_lines) >= chunk_rows:
            yield flush()
    if seen == 0:
        raise DataError("file is empty", path)
    if good[4] or bad_lines:
        yield flush()


def check_first_record(path: str, records: Records, parse: Parse) -> None:
    """Fail in the driver when a file is empty or its first record is not in the format."""
    for line, record in records(path):
        try:
            parse(record, path, line)
        except LineFormatError:
            raise
        except DataError:
            pass            # a bad value is a per-row problem: the full pass reports or drops it
        return
    raise DataError("file is empty", path)


def _read_file(batch: pa.Table, **kwargs) -> Iterator[pa.Table]:
    yield from file_chunks(batch["path"][0].as_py(), **kwargs)


def lines_dataset(files: Sequence[str], records: Records, parse: Parse, on_bad_rows: str,
                  timestamp_field: str, rating_field: str = "rating") -> ray.data.Dataset:
    """Interactions of text files, one Ray task per file."""
    for path in files:
        check_first_record(path, records, parse)
    return ray.data.from_items([{"path": p} for p in files], override_num_blocks=len(files)).map_batches(
        _read_file, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"records": records, "parse": parse, "on_bad_rows": on_bad_rows,
                   "timestamp_field": timestamp_field, "rating_field": rating_field})


# ---------------------------------------------------------------- Parquet

def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a Parquet file ({err})", path) from None


def _read_row_group(batch: pa.Table, columns: dict[str, str | None], on_bad_rows: str) -> Iterator[pa.Table]:
    path = batch["path"][0].as_py()
    first = batch["first_row"][0].as_py()
    wanted = list(dict.fromkeys(c for c in columns.values() if c is not None))
    parquet = pq.ParquetFile(path)
    for part in parquet.iter_batches(batch_size=CHUNK_ROWS, row_groups=[batch["row_group"][0].as_py()],
                                     columns=wanted):
        n = part.num_rows
        rating = columns["rating"]
        yield interactions_from_arrow(
            part.column(columns["user_id"]), part.column(columns["item_id"]),
            part.column(columns["timestamp"]), part.column(rating) if rating else None,
            path, first + 1, timestamp_field=columns["timestamp"],
            rating_field=rating or "rating", on_bad_rows=on_bad_rows)
        first += n


def parquet_dataset(files: Sequence[str], columns: dict[str, str | None], on_bad_rows: str) -> ray.data.Dataset:
    """Interactions of Parquet files, one Ray task per row group. `columns` maps the
    canonical user_id, item_id, timestamp, rating (None: absent) to file columns.

    ray.data.read_parquet cannot say which row of its file a row was, so row groups
    are read with pyarrow here: the row numbers (`source_line`) are exact."""
    groups = []
    for path in files:
        meta = open_parquet(path).metadata
        require_columns(path, meta.schema.to_arrow_schema().names, columns.values())
        first = 0
        for group in range(meta.num_row_groups):
            groups.append({"path": path, "row_group": group, "first_row": first})
            first += meta.row_group(group).num_rows
        if first == 0:
            raise DataError("file is empty", path)
    return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        _read_row_group, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"columns": columns, "on_bad_rows": on_bad_rows})


# ---------------------------------------------------------------- catalog

def catalog_records(path: str, parse_line: Callable[[str, str, int], Any], on_bad_rows: str,
                    dropped: Counter, encoding: str = "utf-8") -> Iterator[Any]:
    """Parsed records of a metadata file. Under drop an unparsable line is counted in
    `dropped` instead of raising, except the first, which means the file is not in the format."""
    seen = 0
    for line, text in text_lines(path, encoding):
        try:
            record = parse_line(text, path, line)
        except LineFormatError:
            if on_bad_rows != "drop" or seen == 0:
                raise
            dropped["catalog: line unparsable"] += 1
        else:
            yield record
        seen += 1
    if seen == 0:
        raise DataError("file is empty", path)


def build_catalog(entries: Iterable[CatalogEntry], dropped: Counter) -> pa.Table:
    """One row per item id, its first entry winning. Entries without an id (no
    interaction can name them) and repeated ids are counted in `dropped`, not kept."""
    ids, titles, categories, seen = [], [], [], set()
    for item, title, cats in entries:
        key = None if item is None else str(item).strip()
        if not key:
            dropped["catalog: no item id"] += 1
        elif key in seen:
            dropped["catalog: repeated item id"] += 1
        else:
            seen.add(key)
            ids.append(key)
            titles.append(title)
            categories.append(cats)
    return catalog_table(ids, titles, categories)


def unique(values: Iterable[Any]) -> list[str]:
    """Non-empty strings, de-duplicated in first-seen order."""
    return list(dict.fromkeys(s for s in (str(v).strip() for v in values if v is not None) if s))
