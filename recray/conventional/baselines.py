"""Random and MostPop: per-item scores from nothing but the catalog and the train split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recray.generate.seeding import keyed_rng


class MostPop:
    """The same list for everyone: catalog items by their count among train-split targets
    (catalog.train_count, counted by `recray prepare` over the whole train split)."""

    def __init__(self, catalog: pa.Table):
        self.counts = catalog.column("train_count").to_numpy().astype(float)

    def scores(self, samples: pa.Table) -> np.ndarray:
        return np.broadcast_to(self.counts, (samples.num_rows, self.counts.size))


class Random:
    """Uniform scores, seeded per sample id: a sample's list does not depend on which other
    samples are scored with it (expected HR@K = K / catalog size)."""

    def __init__(self, catalog: pa.Table, seed: int):
        self.n_items, self.seed = catalog.num_rows, seed

    def scores(self, samples: pa.Table) -> np.ndarray:
        return np.stack([keyed_rng(self.seed, f"random-row:{sid}").random(self.n_items)
                         for sid in samples.column("sample_id").to_pylist()])
