"""Evaluation of a recommender that scores every item: the same prediction files and
metrics as an LLM's evaluation (recray.evaluate.evaluate), with no generation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from recray.evaluate.evaluate import read_prepared, score_items, write_evaluation


class Recommender(Protocol):
    def scores(self, samples: pa.Table) -> np.ndarray: ...   # (samples x catalog items)


def evaluate_recommender(data_dir: Path, split: str, recommender: Recommender, output: Path,
                         limit: int | None = None, about: dict | None = None) -> dict:
    """`about`: what the row is, beside its metrics (e.g. the data it was trained on)."""
    samples, catalog, groups = read_prepared(data_dir, split, limit)
    start = time.time()
    predictions, metrics = score_items(samples, recommender.scores(samples), catalog, groups)
    metrics["split"] = split
    metrics["seconds_score"] = round(time.time() - start, 1)
    metrics.update(about or {})
    write_evaluation(output, predictions, metrics)
    return metrics
