"""The canonical tables every loader produces, and the one conversion into them.

Interactions carry their provenance (`source_file`, `source_line`, 1-based) so that
any later check can name the exact line of the raw file it came from.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recray.errors import DataError

INTERACTIONS = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("timestamp", pa.int64()),
    ("rating", pa.float64()),
    ("source_file", pa.string()),
    ("source_line", pa.int64()),
    # Non-null only under data.on_bad_rows=drop: why this raw line is unusable.
    # Preparation counts these by reason and filters them out.
    ("drop_reason", pa.string()),
])

CATALOG = pa.schema([
    ("item_id", pa.string()),
    ("title", pa.string()),
    ("categories", pa.list_(pa.string())),
])


def _as_int_timestamp(value, path: str, line: int, field: str) -> int:
    if isinstance(value, bool) or value is None:
        raise DataError(f"timestamp {value!r} is not a number", path, line, field)
    if isinstance(value, (int, np.integer)):
        ts = int(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise DataError(f"timestamp {value!r} is not a number", path, line, field) from None
        if math.isnan(number) or math.isinf(number) or number != int(number):
            raise DataError(f"timestamp {value!r} is not a whole number of seconds", path, line, field)
        ts = int(number)
    if ts < 0:
        raise DataError(f"timestamp {value!r} is negative", path, line, field)
    return ts


def _as_rating(value, path: str, line: int, field: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        rating = float(value)
    except (TypeError, ValueError):
        raise DataError(f"rating {value!r} is not a number", path, line, field) from None
    return None if math.isnan(rating) else rating


def interactions_table(user_ids: Sequence, item_ids: Sequence, timestamps: Sequence,
                       ratings: Sequence | None, path: str, lines: Sequence[int],
                       timestamp_field: str = "timestamp",
                       rating_field: str = "rating", on_bad_rows: str = "error") -> pa.Table:
    """Build a canonical interactions table from raw parsed values.

    A missing id, a non-numeric, fractional or negative timestamp, or a non-numeric
    rating raises DataError naming `path`, the line and the raw field name; with
    on_bad_rows="drop" the row is kept with its `drop_reason` set instead.
    """
    n = len(user_ids)
    if not (len(item_ids) == len(timestamps) == len(lines) == n):
        raise ValueError("interactions_table: columns differ in length")
    users, items, stamps, rates, reasons = [], [], [], [], []
    for i in range(n):
        line = int(lines[i])
        try:
            for value, field in ((user_ids[i], "user_id"), (item_ids[i], "item_id")):
                if value is None or str(value).strip() == "":
                    raise DataError("missing id", path, line, field)
            stamp = _as_int_timestamp(timestamps[i], path, line, timestamp_field)
            rate = None if ratings is None else _as_rating(ratings[i], path, line, rating_field)
            reason = None
        except DataError as err:
            if on_bad_rows != "drop":
                raise
            stamp, rate, reason = None, None, str(err)
        users.append(None if user_ids[i] is None else str(user_ids[i]).strip())
        items.append(None if item_ids[i] is None else str(item_ids[i]).strip())
        stamps.append(stamp)
        rates.append(rate)
        reasons.append(reason)
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "item_id": pa.array(items, pa.string()),
        "timestamp": pa.array(stamps, pa.int64()),
        "rating": pa.array(rates, pa.float64()),
        "source_file": pa.array([str(path)] * n, pa.string()),
        "source_line": pa.array([int(x) for x in lines], pa.int64()),
        "drop_reason": pa.array(reasons, pa.string()),
    }, schema=INTERACTIONS)


def catalog_table(item_ids: Sequence, titles: Sequence, categories: Sequence[Sequence[str]]) -> pa.Table:
    """Build a canonical catalog. Titles are kept as given (None/empty included):
    preparation drops items with empty titles and counts them, so nothing is lost silently."""
    def clean_title(t):
        if t is None or (isinstance(t, float) and math.isnan(t)):
            return None
        return str(t).strip()
    return pa.table({
        "item_id": pa.array([str(i).strip() for i in item_ids], pa.string()),
        "title": pa.array([clean_title(t) for t in titles], pa.string()),
        "categories": pa.array([[str(c) for c in (cs or [])] for cs in categories],
                               pa.list_(pa.string())),
    }, schema=CATALOG)


def interactions_from_arrow(user_ids: pa.Array, item_ids: pa.Array, timestamps: pa.Array,
                            ratings: pa.Array | None, path: str, first_line: int,
                            timestamp_field: str = "timestamp", rating_field: str = "rating",
                            on_bad_rows: str = "error") -> pa.Table:
    """interactions_table for Arrow columns (line numbers first_line, first_line + 1, ...):
    vectorised when every row is clean, the common case; otherwise row by row, which
    names the first bad row exactly (or, under drop, gives each its reason)."""
    n = len(user_ids)
    columns = _clean_columns(user_ids, item_ids, timestamps, ratings)
    if columns is None:
        return interactions_table(
            user_ids.to_pylist(), item_ids.to_pylist(), _unix_seconds_list(timestamps),
            None if ratings is None else ratings.to_pylist(), path,
            range(first_line, first_line + n), timestamp_field, rating_field, on_bad_rows)
    return pa.table({
        **columns,
        "source_file": pa.array([str(path)] * n, pa.string()),
        "source_line": pa.array(np.arange(first_line, first_line + n, dtype=np.int64)),
        "drop_reason": pa.nulls(n, pa.string()),
    }, schema=INTERACTIONS)


# what str.strip() strips, so both paths agree on which ids are padded
_PY_WHITESPACE = "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def _clean_ids(column: pa.Array) -> pa.Array | None:
    """String or integer ids as strings, or None when one is missing, empty or padded
    (the row-by-row path strips and reports those)."""
    if pa.types.is_integer(column.type):
        return None if column.null_count else column.cast(pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    column = column.cast(pa.string())
    if column.null_count or not pc.all(pc.equal(column, pc.utf8_trim(column, _PY_WHITESPACE))).as_py() \
            or not pc.all(pc.greater(pc.utf8_length(column), 0)).as_py():
        return None
    return column


def _in_units(column: pa.Array) -> tuple[pa.Array, int]:
    """Dates and timestamps as int64 counts of their unit (time-zone-naive ones read as
    UTC), with units per second; other types as they are, with 1."""
    if pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("s"))
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()), {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[column.type.unit]
    return column, 1


def _clean_seconds(column: pa.Array) -> np.ndarray | None:
    """Whole non-negative seconds from integer, date or timestamp columns, else None."""
    column, per_second = _in_units(column)
    if not pa.types.is_integer(column.type) or column.null_count:
        return None
    seconds = column.to_numpy().astype(np.int64) // per_second
    return None if len(seconds) and seconds.min() < 0 else seconds


def _clean_columns(user_ids, item_ids, timestamps, ratings) -> dict | None:
    users, items, seconds = _clean_ids(user_ids), _clean_ids(item_ids), _clean_seconds(timestamps)
    if users is None or items is None or seconds is None:
        return None
    if ratings is None:
        rates = pa.nulls(len(users), pa.float64())
    elif pa.types.is_integer(ratings.type) or pa.types.is_floating(ratings.type):
        rates = ratings.cast(pa.float64())
        rates = pc.if_else(pc.is_nan(rates), pa.scalar(None, pa.float64()), rates)
    else:
        return None
    return {"user_id": users, "item_id": items, "timestamp": pa.array(seconds, pa.int64()),
            "rating": rates}


def _unix_seconds_list(column: pa.Array) -> list:
    """Arrow dates and timestamps as unix seconds; other types pass through as Python
    values for interactions_table to check."""
    counts, per_second = _in_units(column)
    if per_second == 1:
        return counts.to_pylist()
    # floor, not truncation: a time before 1970 must stay negative to be caught
    return [None if v is None else v // per_second for v in counts.to_pylist()]
