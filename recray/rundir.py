"""A run directory: manifest, atomic stages, resume, one writer at a time.

    run = RunDir.create(Path("runs/x"), cfg)          # or RunDir.resume(path, cfg, force=False)
    if not run.done("it1/negatives"):
        with run.stage("it1/negatives") as tmp:        # write into tmp; renamed when the block ends
            ...
    run.path("it1/negatives")                          # the finished stage

A stage is complete iff its final directory exists: the stage's record
(`.stage.json`) is written inside the temp dir and the rename publishes both at once,
so no crash can leave a finished-looking stage that is not. The record also lists every
file of the stage (size, blake2b) and a sequence number: `resume` checks each finished
stage against its list and moves a corrupt one, with every stage finished after it, to
`quarantine/` to be redone (docs/reliability.md). The manifest's `stages` map is a
summary for people, rebuilt from those records.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from recray.errors import RecrayError

MARKER = "recray-run/1"
STAGE_RECORD = ".stage.json"
QUARANTINE = "quarantine"
# A write failed for want of space: the disk (ENOSPC), a quota (EDQUOT), a file size limit
# (EFBIG, RLIMIT_FSIZE: what the tests use). Each means "free space, then resume".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
log = logging.getLogger(__name__)
# A stage done sooner shows one line, not two: a started/done pair for instant work (the
# loop's sample draw, MostPop's evaluation) is noise in a run's ~100 lines of output.
START_LINE_AFTER_S = 2.0
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


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def _files(folder: Path) -> dict[str, Path]:
    """Every file of a stage folder but its record, by relative path."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p != folder / STAGE_RECORD}


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _inventory(folder: Path) -> dict[str, dict]:
    """What a stage's record lists: relative path -> size and blake2b of every file."""
    return {rel: {"size": p.stat().st_size, "blake2b": _digest(p)}
            for rel, p in _files(folder).items()}


def _damage(folder: Path, record: dict | None) -> list[str]:
    """How a finished stage's files differ from its record (empty: they match)."""
    if record is None:
        return [f"{STAGE_RECORD}: unreadable"]
    if "files" not in record:
        return []           # recorded before records listed files: accepted as it is
    want, have = record["files"], _files(folder)
    problems = [f"{rel}: missing" for rel in sorted(want.keys() - have.keys())]
    problems += [f"{rel}: not in the stage record" for rel in sorted(have.keys() - want.keys())]
    for rel in sorted(want.keys() & have.keys()):
        size = have[rel].stat().st_size
        if size != want[rel]["size"]:
            problems.append(f"{rel}: size {size} != {want[rel]['size']}")
        elif _digest(have[rel]) != want[rel]["blake2b"]:
            problems.append(f"{rel}: content differs (blake2b)")
    return problems


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _summary(record: dict | None) -> dict:
    """A record as the manifest shows it: the file list stays in the stage's own record."""
    return {k: v for k, v in (record or {}).items() if k != "files"}


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
        self._outcome = ""          # the stage in flight's outcome(), for its done line

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
        self._check_not_nested(stage)
        final = self.path(stage)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)     # a previous attempt's leftovers
        tmp.mkdir(parents=True)
        start = time.time()
        self._outcome = ""
        show_start = self._start_line(stage)
        try:
            yield tmp
            record = {"seconds": round(time.time() - start, 1),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      # orders stages on resume: a corrupt one is redone with all after it
                      "seq": 1 + max((r.get("seq", 0) for r in self.manifest["stages"].values()),
                                     default=0),
                      "files": _inventory(tmp)}
            (tmp / STAGE_RECORD).write_text(json.dumps(record))
            if final.exists():                      # unrecorded: an attempt that died mid-rename
                shutil.rmtree(final)
            tmp.rename(final)
        except OSError as e:
            if not _no_space(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space the half stage took
            raise RecrayError(f"stage {stage} could not be written ({e}); it is not marked "
                              f"done: free disk space, then resume with `recray run --resume "
                              f"{self.root}`") from e
        finally:
            show_start.cancel()
        self.manifest["stages"][stage] = _summary(record)
        self._save()
        log.info("stage %s done in %.1f s%s", stage, record["seconds"],
                 f": {self._outcome}" if self._outcome else "")

    @staticmethod
    def _start_line(stage: str) -> threading.Timer:
        """The stage's start line, stamped now and shown once it has run START_LINE_AFTER_S
        (cancel the timer to keep it back): work that ends sooner shows its done line only."""
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, "stage %s started", (stage,), None)
        timer = threading.Timer(START_LINE_AFTER_S, log.handle, (record,))
        timer.daemon = True
        if log.isEnabledFor(logging.INFO):
            timer.start()
        return timer

    def outcome(self, text: str) -> None:
        """What the stage in flight made, in a few words: its done line ends with it."""
        self._outcome = text

    def _check_not_nested(self, stage: str) -> None:
        """Stages are disjoint folders: moving one (quarantine) or replacing one must never
        take another's files with it."""
        for other in self.manifest["stages"]:
            if other != stage and (other.startswith(stage + "/") or stage.startswith(other + "/")):
                raise RecrayError(f"stage {stage} would nest with stage {other} in {self.root}: "
                                  f"stages must be disjoint folders")

    def _recover(self) -> None:
        """Sweep half-written temp dirs; quarantine corrupt stages and those after them;
        rebuild the stage summary from the stage records."""
        for tmp in sorted(self._outside_quarantine("*.tmp"), reverse=True):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
        records = self._records()
        start = time.time()
        damaged = {stage: problems for stage, record in records.items()
                   if (problems := _damage(self.path(stage), record))}
        if time.time() - start > 1:
            log.info("verified %d finished stages in %.1f s", len(records), time.time() - start)
        if damaged:
            self._quarantine(records, damaged)
            records = self._records()
        self.manifest["stages"] = {stage: _summary(r) for stage, r in records.items()}

    def _outside_quarantine(self, pattern: str) -> list[Path]:
        quarantine = self.root / QUARANTINE
        return [p for p in self.root.rglob(pattern) if quarantine not in p.parents]

    def _records(self) -> dict[str, dict | None]:
        """Finished stages -> their records (None: unreadable)."""
        return {rec.parent.relative_to(self.root).as_posix(): _read_record(rec)
                for rec in sorted(self._outside_quarantine(STAGE_RECORD))}

    def _quarantine(self, records: dict[str, dict | None], damaged: dict[str, list[str]]) -> None:
        """Move the damaged stages and every stage finished after the first of them (they
        may have been computed from it) to quarantine/, where nothing is lost; the run then
        redoes them. A record without a sequence number (unreadable, or written before
        records had one) counts as the earliest."""
        seq = {stage: (r or {}).get("seq", 0) for stage, r in records.items()}
        first = min(damaged, key=lambda s: seq[s])
        moved = sorted((s for s in records if s in damaged or seq[s] > seq[first]),
                       key=lambda s: (seq[s], s))
        stamp = time.strftime("%Y%m%dT%H%M%S")
        where = {stage: self._move_aside(stage, stamp) for stage in moved}
        for stage, problems in sorted(damaged.items(), key=lambda kv: seq[kv[0]]):
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                               if len(problems) > 3 else "")
            later = [s for s in moved if s != stage and seq[s] > seq[stage]]
            redone = (f"it and the {len(later)} stage(s) finished after it ({', '.join(later)})"
                      if later else "it")
            log.warning("stage %s is corrupt (%s): moved to %s; %s will be redone%s", stage, shown,
                        where[stage], redone,
                        "" if seq[stage] else " (its record gives no order: taken as the earliest)")
        self.manifest.setdefault("quarantined", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "moved": where,
             "corrupt": {stage: problems for stage, problems in damaged.items()}})

    def _move_aside(self, stage: str, stamp: str) -> str:
        name = f"{stage.replace('/', '__')}-{stamp}"
        target, n = self.root / QUARANTINE / name, 1
        while target.exists():                      # a second resume within the same second
            target, n = self.root / QUARANTINE / f"{name}-{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        self.path(stage).rename(target)
        return target.relative_to(self.root).as_posix()

    def _save(self) -> None:
        tmp = self.root / "manifest.json.tmp"
        try:
            tmp.write_text(json.dumps(self.manifest, indent=1))
        except OSError as e:
            if not _no_space(e):
                raise
            raise RecrayError(f"{self.root / 'manifest.json'} could not be written ({e}): "
                              f"free disk space, then resume with `recray run --resume "
                              f"{self.root}`") from e
        os.replace(tmp, self.root / "manifest.json")


def row_metrics(row: dict) -> dict:
    """An evaluation stage's row.json without what names the row: its metrics."""
    return {k: v for k, v in row.items()
            if k not in ("method", "iteration", "split", "reused_from")}
