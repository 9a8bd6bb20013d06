"""Per-iteration metrics to TensorBoard and MLflow, so a run can be watched in the tools
people already use. metrics.jsonl (recray.loop) stays the source of truth; these are views.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from recray.config import Config


def metric_tag(split: str, key: str) -> str:
    """`test/HR@5` → `test/HR_5`: neither TensorBoard tags nor MLflow keys allow '@'."""
    return re.sub(r"[^\w./-]", "_", f"{split}/{key}")


def mlflow_uri(cfg: Config, run_root: Path) -> str:
    """The configured URI, else one SQLite store beside the run directories, so every run of
    a runs folder shows up in one `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`."""
    return cfg.tracking.mlflow_uri or f"sqlite:///{run_root.resolve().parent / 'mlflow.db'}"


def track(cfg: Config, run_root: Path, metrics: dict, step: int, split: str) -> None:
    scalars = {metric_tag(split, k): float(v) for k, v in metrics.items()
               if isinstance(v, (int, float))}
    if cfg.tracking.tensorboard:
        from tensorboardX import SummaryWriter
        with SummaryWriter(str(run_root / "tensorboard")) as writer:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
    if cfg.tracking.mlflow:
        _mlflow_log(cfg, run_root, scalars, step)


def _mlflow_log(cfg: Config, run_root: Path, scalars: dict, step: int) -> None:
    """One MLflow run per recray run; its id is kept in the run directory so --resume
    appends to the same MLflow run instead of starting a second one."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from recray.runlog import adopt_logger
    adopt_logger("mlflow")      # its database set-up lines belong in the run log only

    client = MlflowClient(mlflow_uri(cfg, run_root))
    id_file = run_root / "mlflow_run_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment
                         else client.create_experiment(cfg.tracking.experiment))
        run_id = client.create_run(experiment_id, run_name=run_root.name).info.run_id
        client.log_batch(run_id, params=_params(cfg))
        id_file.write_text(run_id)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])


def _params(cfg: Config) -> list:
    from mlflow.entities import Param

    def flat(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(value)[:6000]   # MLflow's param value limit
    return [Param(k, v) for k, v in flat(cfg.model_dump(mode="json"))]
