"""Seeds keyed by sample id: a sample's random choices do not depend on batching or order."""

from __future__ import annotations

import hashlib

import numpy as np


def keyed_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def keyed_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(keyed_seed(seed, key))
