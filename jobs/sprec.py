"""`ray job submit` entrypoint: the whole SPRec pipeline on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/sprec.py -c configs/ml100k.yaml [key=value ...]

It joins the job's cluster with a plain ray.init() (RAY_ADDRESS is set by Ray) and
runs exactly what `recray run` runs.
"""

import sys
from pathlib import Path

# The job's working dir is the repo; make its package importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
