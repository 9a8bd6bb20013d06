"""Training data in, on Ray Data, checked on the driver before any worker starts.

    SFT:  prepared dir (DIR/train/*.parquet) | Parquet file/dir | ray.data.Dataset
          columns sample_id, prompt, completion (+ history_item_ids, target_item_id for RW;
          + token_groups for GDRT)
    DPO:  negatives Parquet | ray.data.Dataset
          columns sample_id, prompt, chosen, rejected (list<string>)

Samples longer than train.max_length lose history titles from the left (oldest first)
until prompt + answer + EOS fit; the answer is never cut. Every such sample is counted,
and one that cannot fit even with a single title is a DataError.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from recray.errors import DataError

log = logging.getLogger(__name__)

SFT_COLUMNS = ("sample_id", "prompt", "completion")
DPO_COLUMNS = ("sample_id", "prompt", "chosen", "rejected")
RW_COLUMNS = ("history_item_ids", "target_item_id")
_LIST_START = ' before: "'


# ---------------------------------------------------------------- reading + checks

def _as_dataset(data, what: str) -> tuple[ray.data.Dataset, str]:
    if isinstance(data, ray.data.Dataset):
        return data, f"the {what} dataset"
    path = Path(data)
    if path.is_dir() and (path / "train").is_dir():
        path = path / "train"              # a prepared dataset: train on its train split
    if not path.exists():
        raise DataError(f"{what} data does not exist", path=str(path))
    if path.is_dir() and not list(path.rglob("*.parquet")):
        raise DataError(f"{what} data holds no *.parquet files", path=str(path))
    return ray.data.read_parquet(str(path)), str(path)


def _check(ds: ray.data.Dataset, where: str, needed: tuple[str, ...], what: str) -> None:
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(f"{what} data lacks column(s) {', '.join(missing)} "
                        f"(has: {', '.join(names) or 'none'})", path=where)
    if ds.count() == 0:
        raise DataError(f"{what} data is empty (0 rows)", path=where)


def read_sft(data, reweight: bool = False) -> tuple[ray.data.Dataset, str]:
    """The SFT columns (+ RW's); a `token_groups` column (GDRT's, recray.train.token_groups)
    or a `weight` column (UFO-like's judger, recray.judge) is kept when the data has one."""
    ds, where = _as_dataset(data, "SFT")
    needed = SFT_COLUMNS + (RW_COLUMNS if reweight else ())
    _check(ds, where, needed, "SFT")
    extras = [c for c in ("token_groups", "weight") if c in ds.schema().names]
    return ds.select_columns(list(needed) + extras), where


def read_negatives(data, max_negatives: int | None = None) -> tuple[ray.data.Dataset, str]:
    """The DPO columns, and a per-prompt `weight` (UFO-like's pair weights) when present."""
    ds, where = _as_dataset(data, "DPO")
    _check(ds, where, DPO_COLUMNS, "DPO")
    extras = ["weight"] if "weight" in ds.schema().names else []
    ds = ds.select_columns(list(DPO_COLUMNS) + extras).map_batches(
        _clean_negatives, fn_kwargs={"max_negatives": max_negatives}, batch_format="pandas")
    return ds, where


def _clean_negatives(batch: pd.DataFrame, max_negatives: int | None) -> pd.DataFrame:
    """At most max_negatives rejected answers; a `problem` per row, raised on the driver
    (an exception raised inside a Ray Data task reaches the driver only as text)."""
    rejected, problems = [], []
    for chosen, rej in zip(batch["chosen"], batch["rejected"]):
        rej = [] if rej is None else [str(r) for r in rej]
        problems.append("no rejected answer" if not rej else
                        f"a rejected answer equals the chosen one {chosen!r}" if chosen in rej else "")
        rejected.append(rej[:max_negatives] if max_negatives else rej)
    return batch.assign(rejected=rejected, problem=problems)


# ---------------------------------------------------------------- max_length

def drop_oldest_title(prompt: str) -> str | None:
    """The prompt with its first (oldest) history title removed; None when one is left or
    the prompt does not have the template's history list."""
    start = prompt.rfind(_LIST_START)
    if start < 0:
        return None
    head_end = start + len(_LIST_START) - 1          # keep ' before: '
    line_end = prompt.find("\n", start)
    sep = prompt.find('", "', start)
    if sep < 0 or (line_end >= 0 and sep > line_end):
        return None
    return prompt[:head_end] + prompt[sep + 3:]


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _length(tok, prompt: str, answers: list[str]) -> int:
    """Tokens of prompt + longest answer + EOS, tokenised as TRL does (jointly)."""
    ids = tok([prompt + a for a in answers], add_special_tokens=True)["input_ids"]
    return max(len(x) for x in ids) + 1


def _fit_batch(batch: pd.DataFrame, tokenizer: str, max_length: int, answer_cols: list[str]) -> pd.DataFrame:
    tok = _tokenizer(tokenizer)
    prompts, dropped, lengths = [], [], []
    for i, prompt in enumerate(batch["prompt"]):
        answers = []
        for col in answer_cols:
            value = batch[col].iloc[i]
            answers.extend([value] if isinstance(value, str) else list(value))
        answers = answers or [""]
        n, cut = _length(tok, prompt, answers), 0
        while n > max_length:
            shorter = drop_oldest_title(prompt)
            if shorter is None:
                break
            prompt, cut = shorter, cut + 1
            n = _length(tok, prompt, answers)
        prompts.append(prompt)
        dropped.append(cut)
        lengths.append(n)
    return batch.assign(prompt=prompts, titles_dropped=np.asarray(dropped, np.int64),
                        n_tokens=np.asarray(lengths, np.int64))


def fit_to_length(ds: ray.data.Dataset, tokenizer: str, max_length: int, kind: str,
                  where: str) -> tuple[ray.data.Dataset, dict]:
    """Cut history titles until every sample fits; a materialized dataset and the counts."""
    answer_cols = ["completion"] if kind == "sft" else ["chosen", "rejected"]
    fitted = ds.map_batches(_fit_batch, batch_format="pandas", fn_kwargs={
        "tokenizer": tokenizer, "max_length": max_length, "answer_cols": answer_cols}).materialize()
    checked = ["sample_id", "titles_dropped", "n_tokens"] + (["problem"] if kind == "dpo" else [])
    counts = fitted.select_columns(checked).to_pandas()
    if kind == "dpo" and (counts["problem"] != "").any():
        bad = counts[counts["problem"] != ""]
        raise DataError(f"{len(bad)} sample(s) unusable, e.g. sample {bad.iloc[0]['sample_id']}: "
                        f"{bad.iloc[0]['problem']}", path=where, field="rejected")
    too_long = counts[counts["n_tokens"] > max_length]
    if len(too_long):
        first = too_long.iloc[0]
        raise DataError(
            f"{len(too_long)} sample(s) do not fit train.max_length={max_length} tokens even "
            f"with one history title left, e.g. sample {first['sample_id']} needs "
            f"{first['n_tokens']} tokens: raise train.max_length", path=where)
    stats = {"samples": int(len(counts)),
             "truncated": int((counts["titles_dropped"] > 0).sum()),
             "titles_dropped": int(counts["titles_dropped"].sum()),
             "max_tokens": int(counts["n_tokens"].max()),
             "mean_tokens": float(counts["n_tokens"].mean())}
    if stats["truncated"]:
        log.warning("%d of %d samples were longer than train.max_length=%d: dropped %d oldest "
                    "history titles in all", stats["truncated"], stats["samples"], max_length,
                    stats["titles_dropped"])
    # No lazy step after materialize(): with every CPU held by a train worker, Ray Data
    # would wait forever for a CPU to run it on.
    return fitted, stats


# ---------------------------------------------------------------- RW weights

def add_rw_weights(ds: ray.data.Dataset, prepared: str | Path) -> tuple[ray.data.Dataset, dict]:
    """IFairLRS RW: a `weight` column from the prepared dataset's catalog and groups."""
    from recray.train.reweight import group_weights, sample_weights

    prepared = Path(prepared)
    for name in ("catalog.parquet", "groups.json"):
        if not (prepared / name).exists():
            raise DataError(f"train.reweight needs {name} of the prepared dataset",
                            path=str(prepared / name))
    groups = json.loads((prepared / "groups.json").read_text())["groups"]
    catalog = pd.read_parquet(prepared / "catalog.parquet", columns=["item_id", "categories"])
    item_groups = {i: list(c) for i, c in zip(catalog["item_id"], catalog["categories"])}
    rows = ds.select_columns(["sample_id", *RW_COLUMNS]).to_pandas()
    histories = [list(h) for h in rows["history_item_ids"]]
    targets = list(rows["target_item_id"])
    weights = dict(zip(rows["sample_id"], sample_weights(histories, targets, item_groups, groups)))
    weighted = ds.map_batches(
        lambda b: b.assign(weight=[weights[s] for s in b["sample_id"]]).drop(columns=list(RW_COLUMNS)),
        batch_format="pandas").materialize()
    w = np.fromiter(weights.values(), dtype=float)
    return weighted, {"group_weights": group_weights(histories, targets, item_groups, groups),
                      "weight_min": float(w.min()), "weight_max": float(w.max())}
