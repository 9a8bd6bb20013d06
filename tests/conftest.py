"""Shared fixtures. One local Ray instance serves the whole test session: worker start-up
is the slow part of Ray on 2 cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def ml100k_prepared(ray_session, tmp_path_factory):
    """The embedded MovieLens-100k prepared with the default config, once per session."""
    from recray.config import DataConfig
    from recray.data.loaders import load
    from recray.data.prepare import prepare
    out = tmp_path_factory.mktemp("prepared") / "ml100k"
    stats = prepare(load(DataConfig()), DataConfig(), out)
    return out, stats
