"""Steam (Kang & McAuley, SASRec): `steam_reviews.json` (version 2 reviews) and
`steam_games.json`, both one Python dict literal per line, optionally gzipped.
See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.loaders.readers import (CatalogEntry, Row, build_catalog, catalog_records,
                                         lines_dataset, literal_dict, locate, text_lines, unique)
from recray.errors import DataError

REVIEW_FILES = ("steam_reviews*.json",)
GAME_FILES = ("steam_games*.json",)


def day_seconds(value, path: str, line: int, field: str) -> int:
    """'YYYY-MM-DD' as unix seconds at 00:00 UTC."""
    try:
        day = datetime.strptime(str(value).strip(), "%Y-%m-%d")
    except ValueError:
        raise DataError(f"date {value!r} is not of the form YYYY-MM-DD", path, line, field) from None
    return int(day.replace(tzinfo=timezone.utc).timestamp())


def _review_row(text: str, path: str, line: int) -> Row:
    review = literal_dict(text, path, line)
    # `username` is what every v2 review has and what SASRec's Steam split keys users
    # by; a minority also carry a numeric `user_id`, used only when there is no username.
    user = review.get("username") or review.get("user_id")
    return user, review.get("product_id"), day_seconds(review.get("date"), path, line, "date"), None


def _names(value) -> list[str]:
    if isinstance(value, str):
        return unique([value])
    return unique(value) if isinstance(value, list) else []


def _game_entry(text: str, path: str, line: int) -> CatalogEntry:
    game = literal_dict(text, path, line)
    return (game.get("id"), game.get("app_name") or game.get("title"),
            _names(game.get("genres")) or _names(game.get("tags")))


def load(cfg: DataConfig) -> Source:
    logs, metas = locate(cfg, REVIEW_FILES, GAME_FILES)
    dropped: Counter = Counter()
    catalog = build_catalog((entry for meta in metas
                             for entry in catalog_records(meta, _game_entry, cfg.on_bad_rows, dropped)),
                            dropped)
    interactions = lines_dataset(logs, text_lines, _review_row, cfg.on_bad_rows, timestamp_field="date")
    return Source(interactions, catalog, logs + metas, dict(dropped))
