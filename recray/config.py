"""Typed configuration: one YAML file plus dotted command-line overrides.

    cfg = load_config("configs/ml100k.yaml", ["data.min_interactions=5"])

Unknown keys and wrong types raise ConfigError naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recray.errors import ConfigError

Format = Literal["movielens", "amazon2014", "steam", "goodreads", "table"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TableColumns(Strict):
    """Column names of a generic Parquet/CSV log (format: table)."""
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None
    title: str = "title"
    categories: str | None = "categories"
    categories_sep: str = "|"      # CSV only: how a categories cell lists several


class DataConfig(Strict):
    format: Format = "movielens"
    input: str | None = None            # None: the embedded MovieLens-100k (recray fetch)
    catalog: str | None = None          # format table: the item file (else `input` holds titles)
    columns: TableColumns = Field(default_factory=TableColumns)
    noun: str = "movie"                 # "movie", "book", "game", "album": goes into the prompt
    min_interactions: int = Field(10, ge=1)
    history_len: int = Field(10, ge=1)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_train: int = Field(4096, ge=1)
    n_valid: int = Field(512, ge=1)
    n_test: int = Field(1000, ge=1)
    n_groups: int = Field(10, ge=1)
    exclude_categories: list[str] = ["unknown"]   # never a fairness group (MovieLens "unknown")
    seed: int = 0
    on_bad_rows: Literal["error", "drop"] = "error"   # drop: count and report instead of stopping

    @model_validator(mode="after")
    def _split_sums_to_one(self):
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ValueError("data.split must be three positive fractions summing to 1")
        return self


class RayConfig(Strict):
    address: str | None = None          # None: RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = None         # local instance only


class Config(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return parsed


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
