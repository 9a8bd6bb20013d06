"""The main job: prepare (if missing) → self-play loop → report, in one run directory.

    recray run -c configs/ml100k.yaml --name demo          # CLI
    python jobs/sprec.py -c configs/ml100k.yaml             # under `ray job submit`
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from recray.config import Config, given_tree
from recray.loop import OnIteration
from recray.rundir import RunDir

log = logging.getLogger(__name__)


def run_job(cfg: Config, run_dir: Path, resume: bool = False, force: bool = False,
            prepared: Path | None = None, on_iteration: OnIteration | None = None) -> RunDir:
    """`prepared`: a dataset prepared already for cfg.data (a sweep prepares it once for all
    its trials) instead of the run's own `prepared` stage; `on_iteration`: see run_loop."""
    from recray.data.loaders import load
    from recray.data.prepare import prepare, prepared_line, summary_table
    from recray.evaluate.report import report
    from recray.loop import run_loop
    from recray.runlog import file_only, to_file
    from recray.runtime import init_ray

    config = cfg.model_dump(mode="json")
    seeds = {"data": cfg.data.seed, "loop": cfg.loop.seed, "train": cfg.train.seed,
             "decoding": cfg.generate.decoding.seed}
    if resume and Path(run_dir).is_dir():        # resume's checks (e.g. corrupt stages) go in it too
        to_file(Path(run_dir) / "run.log")
    run = RunDir.resume(run_dir, config, force) if resume else RunDir.create(run_dir, config, seeds)
    run.record("config_given", given_tree(cfg))     # what best.yaml and loop.init_from rebuild
    to_file(run.root / "run.log")
    start = time.time()
    try:
        init_ray(cfg.ray)
        if prepared is None:
            if not run.done("prepared"):
                with run.stage("prepared") as out:
                    stats = prepare(load(cfg.data), cfg.data, out, overwrite=True)
                    file_only(summary_table(stats))
                    run.outcome(prepared_line(stats))
            prepared = run.path("prepared")
        run_loop(cfg, run, prepared, on_iteration)
        path = report([run.root], run.root / "report")
        log.info("run %s finished in %.0f s; report: %s", run.root, time.time() - start, path)
    finally:
        run.release()
    return run
