"""Regenerate tests/schemas/kuberay-<tag>/ from a local KubeRay git directory (not run by the tests).

    python tests/schemas/vendor_kuberay.py /path/to/kuberay/.git v1.7.0

For the RayCluster and RayJob CRDs at that tag it writes the `ray.io/v1` version's
`openAPIV3Schema`, unchanged, as compact JSON with sorted keys, gzip-compressed with a zero
timestamp (so the same tag always gives the same bytes), and copies the tag's LICENSE.
README.md (source, tag, commit) is written by hand; the commit is printed here for it.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {"raycluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
        "rayjob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"}
VERSION = "v1"


def show(git_dir: str, tag: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{tag}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def main(git_dir: str, tag: str) -> None:
    out = Path(__file__).resolve().parent / f"kuberay-{tag}"
    out.mkdir(exist_ok=True)
    for name, path in CRDS.items():
        crd = yaml.safe_load(show(git_dir, tag, path))
        (version,) = (v for v in crd["spec"]["versions"] if v["name"] == VERSION)
        schema = version["schema"]["openAPIV3Schema"]
        data = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
        (out / f"{name}.{VERSION}.schema.json.gz").write_bytes(gzip.compress(data, 9, mtime=0))
    (out / "LICENSE").write_text(show(git_dir, tag, "LICENSE"))
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", f"{tag}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    print(f"{tag} = {commit} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
