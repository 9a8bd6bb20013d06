"""One loader per raw format, all producing the canonical tables of recray.data.schema.

    source = load(cfg.data)      # Source(interactions=<ray.data.Dataset>, catalog=<pa.Table>, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import ray.data

from recray.config import DataConfig
from recray.errors import ConfigError


@dataclass
class Source:
    interactions: ray.data.Dataset   # schema: recray.data.schema.INTERACTIONS
    catalog: pa.Table                # schema: recray.data.schema.CATALOG
    files: list[str]                 # the raw files read, for stats.json
    # Counts the loader itself dropped, by reason (e.g. catalog lines without an id);
    # preparation adds them to stats.json.
    dropped: dict[str, int] = field(default_factory=dict)


def load(cfg: DataConfig) -> Source:
    """Read `cfg.input` in the format `cfg.format` (docs/formats.md). Interactions are
    lazy: a bad line past the first of a file surfaces when the dataset is consumed."""
    # Loader modules import Source from here, so they are imported on use.
    from recray.data.loaders import amazon2014, goodreads, movielens, steam, table
    if cfg.input is None and cfg.format != "movielens":
        raise ConfigError(f"data.input: format {cfg.format} needs the path of its files "
                          f"(only movielens has an embedded default)")
    loaders = {"movielens": movielens, "amazon2014": amazon2014, "steam": steam,
               "goodreads": goodreads, "table": table}
    return loaders[cfg.format].load(cfg)
