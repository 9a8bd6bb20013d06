"""Amazon product reviews 2014 (McAuley et al.), one category, e.g. CDs_and_Vinyl.

Interactions: `reviews_<Cat>_5.json` (5-core), else `reviews_<Cat>.json`, else
`ratings_<Cat>.csv`; metadata: `meta_<Cat>.json` (Python-literal lines). Any of
them may be gzip-compressed. See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from recray.config import DataConfig
from recray.data.loaders import Source
from recray.data.loaders.readers import (CatalogEntry, LineFormatError, Row, build_catalog,
                                         catalog_records, csv_records, json_object, lines_dataset,
                                         literal_dict, locate, text_lines, unique)

INTERACTION_FILES = ("reviews_*_5.json", "reviews_*.json", "ratings_*.csv")
META_FILES = ("meta_*.json",)


def _review_row(text: str, path: str, line: int) -> Row:
    review = json_object(text, path, line)
    return review.get("reviewerID"), review.get("asin"), review.get("unixReviewTime"), review.get("overall")


def _ratings_row(fields: list[str], path: str, line: int) -> Row:
    if len(fields) != 4:
        raise LineFormatError(f"expected 4 comma-separated fields user,item,rating,timestamp, "
                              f"found {len(fields)}", path, line)
    user, item, rating, stamp = fields
    return user, item, stamp, rating


def categories(paths, path: str, line: int) -> list[str]:
    """Every node of every category path, once, in first-seen order: group selection
    tells parents from children by co-occurrence, so the nesting need not be kept."""
    if paths is None:
        return []
    if not isinstance(paths, list):
        raise LineFormatError("'categories' must be a list of category paths", path, line)
    return unique(node for p in paths for node in (p if isinstance(p, list) else [p]))


def _meta_entry(text: str, path: str, line: int) -> CatalogEntry:
    meta = literal_dict(text, path, line)
    return meta.get("asin"), meta.get("title"), categories(meta.get("categories"), path, line)


def load(cfg: DataConfig) -> Source:
    logs, metas = locate(cfg, INTERACTION_FILES, META_FILES)
    dropped: Counter = Counter()
    catalog = build_catalog((entry for meta in metas
                             for entry in catalog_records(meta, _meta_entry, cfg.on_bad_rows, dropped)),
                            dropped)
    # glob_first returns files of one kind only, so the first one tells the kind.
    if Path(logs[0]).name.endswith((".csv", ".csv.gz")):
        interactions = lines_dataset(logs, csv_records, _ratings_row, cfg.on_bad_rows,
                                     timestamp_field="timestamp")
    else:
        interactions = lines_dataset(logs, text_lines, _review_row, cfg.on_bad_rows,
                                     timestamp_field="unixReviewTime", rating_field="overall")
    return Source(interactions, catalog, logs + metas, dict(dropped))
