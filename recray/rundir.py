"""A run directory: manifest, atomic stages, resume, one writer at a time.

    run = RunDir.create(Path("runs/x"), cfg)          # or RunDir.resume(path, cfg, force=False)
    if not run.done("it1/negatives"):
        with run.stage("it1/negatives") as tmp:        # write into tmp; renamed when the block ends
            ...
    run.path("it1/negatives")                          # the finished stage

A stage is complete iff its final directory exists: the stage's record
(`.stage.json`) is written inside the temp dir and the rename publishes both at once,
so no crash can leave a finished-looking stage that is not. The manifest's `stages`
map is a summary for people, rebuilt from those records.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from recray.errors import RecrayError

MARKER = "recray-run/1"
STAGE_RECORD = ".stage.json"
log = logging.getLogger(__name__)
PACKAGES = ("recray", "torch", "ray", "transformers", "trl", "peft", "deepspeed", "pyarrow")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as `key: old -> new` lines."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest

    # ------------------------------------------------------------ open / create

    @classmethod
    def create(cls, root: Path, config: dict, seeds: dict) -> "RunDir":
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise RecrayError(f"{root} already exists: pick a new run name, or continue it "
                              f"with --resume {root}")
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root, {"format": MARKER, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "config": config, "seeds": seeds, "versions": _versions(),
                         "git_commit": _git_commit(), "stages": {}})
        run._lock()
        run._save()
        return run

    @classmethod
    def resume(cls, root: Path, config: dict, force: bool = False) -> "RunDir":
        root = Path(root)
        manifest_path = root / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("format") != MARKER:
            raise RecrayError(f"{root} is not a recray run directory (no valid manifest.json)")
        diff = config_diff(manifest["config"], config)
        if diff and not force:
            raise RecrayError(f"the config differs from the one {root} was started with:\n  "
                              + "\n  ".join(diff) + "\nresume with the same config, or pass --force")
        run = cls(root, manifest)
        run._lock()
        if diff:
            run.manifest.setdefault("forced_changes", []).append(
                {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "diff": diff})
            run.manifest["config"] = config
        run._recover()
        run._save()
        return run

    def _lock(self) -> None:
        """One process writes a run: a lock file holding the owner's pid, taken atomically."""
        lock = self.root / ".lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid) and pid != os.getpid():
                raise RecrayError(f"{self.root} is being written by process {pid}") from None
            lock.unlink(missing_ok=True)          # left by a process that died
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def record(self, key: str, value) -> None:
        """Keep `value` in the manifest under `key` (e.g. the generation engine used)."""
        self.manifest[key] = value
        self._save()

    def release(self) -> None:
        (self.root / ".lock").unlink(missing_ok=True)

    # ------------------------------------------------------------ stages

    def path(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.path(stage) / STAGE_RECORD).exists()

    @contextmanager
    def stage(self, stage: str):
        """Yield a temp dir for `stage`; on success it becomes `path(stage)` and is recorded."""
        final = self.path(stage)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)     # a previous attempt's leftovers
        tmp.mkdir(parents=True)
        start = time.time()
        log.info("stage %s started", stage)
        yield tmp
        record = {"seconds": round(time.time() - start, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / STAGE_RECORD).write_text(json.dumps(record))
        if final.exists():                          # unrecorded: an attempt that died mid-rename
            shutil.rmtree(final)
        tmp.rename(final)
        self.manifest["stages"][stage] = record
        self._save()
        log.info("stage %s done in %.1f s", stage, record["seconds"])

    def _recover(self) -> None:
        """Sweep half-written temp dirs; rebuild the stage summary from the stage records."""
        for tmp in sorted(self.root.rglob("*.tmp"), reverse=True):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
        self.manifest["stages"] = {
            str(rec.parent.relative_to(self.root)): json.loads(rec.read_text())
            for rec in sorted(self.root.rglob(STAGE_RECORD))}

    def _save(self) -> None:
        tmp = self.root / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.root / "manifest.json")
