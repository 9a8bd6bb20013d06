"""The canonical tables every loader produces, and the one conversion into them.

Interactions carry their provenance (`source_file`, `source_line`, 1-based) so that
any later check can name the exact line of the raw file it came from.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyarrow as pa

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
