"""Connecting to Ray: the same code runs on a laptop-sized local instance and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

from recray.config import RayConfig
from recray.errors import RecrayError

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by ray.address or RAY_ADDRESS, else start a local instance.

    A local instance runs its dashboard bound to 127.0.0.1 only: Ray Train's placement-group
    cleaner needs the State API it serves (without it the cleaner logs a warning every
    second and cannot clean up after a dead controller). Inside `ray job submit` the job's
    RAY_ADDRESS is set, so this joins that cluster and passes no resources (an existing
    cluster refuses them).
    """
    from recray.runlog import route_ray_output
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    route_ray_output()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
    else:
        # address="local" never attaches to a stale /tmp/ray/ray_current_cluster. The
        # instance's address is chosen here and given to its workers: Ray Train's cleaner
        # queries the State API without one and, with two Ray instances on the machine,
        # cannot tell which is its own.
        gcs = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        os.environ["RAY_GCS_SERVER_PORT"] = gcs.rsplit(":", 1)[1]
        try:
            ray.init(address="local", num_cpus=cfg.num_cpus, dashboard_host="127.0.0.1",
                     include_dashboard=True, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_ADDRESS": gcs}})
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"]
    route_ray_output()          # ray.init adds its own printer of worker lines: replace it


def native_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There
    bf16 matmuls run at about twice fp32's rate (measured: docs/training.md), so `auto`
    precision picks bf16; elsewhere bf16 is emulated and slower than fp32."""
    import torch
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def hide_ray_data_error_logs() -> None:
    """Ray Data logs a failed task's traceback before re-raising the error. The CLI shows
    the error itself: one line for a RecrayError, the full traceback for anything else,
    so these console records only repeat it (Ray Data's log file keeps them)."""
    for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
        logging.getLogger(name).addFilter(lambda record: record.levelno < logging.ERROR)


def unwrap(exc: BaseException) -> RecrayError | None:
    """The RecrayError behind an exception that crossed Ray task/actor boundaries."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, RecrayError):
            return cause
        if isinstance(e, RecrayError) and not isinstance(e, ray.exceptions.RayError):
            return e
        stack.extend([cause if isinstance(cause, BaseException) else None,
                      e.__cause__, e.__context__])
    return None
