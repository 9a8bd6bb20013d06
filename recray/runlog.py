"""What a run shows: recray's own lines and the warnings a user can act on go to the
console; everything (every library's INFO, every Ray worker's output) goes to the run's
log file, named on the first line of the output.

    setup_console(verbose)          # cli: before anything logs
    to_file(run.root / "run.log")   # once the run directory exists
    route_ray_output()              # after ray.init: Ray's loggers and worker lines too
    for batch in progress(batches, total=n, what="generate", unit="prompts"): ...
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Warnings that ask nothing of the user: token auth is on by design.
IGNORED_WARNINGS = ("Token authentication is enabled for this Ray cluster",)
# A Ray worker's line reaches the console when recray logged it or it reports an error.
# (A recray logger's name is "recray.<module>"; a path such as ~/.cache/recray/ is not one.)
WORKER_LINE_SHOWN = re.compile(r"\brecray\.[a-z_.]+ |\bERROR\b|\bCRITICAL\b|Traceback|Error:")
# ... except errors that ask nothing of the user: the GCS failing to kill an actor whose
# process had already exited, its socket closed (main jobs of 2026-12-06, actor NIL_ID, and
# 2026-12-07, a named actor id; the RpcError made it look like one). A kill that fails
# for any other reason is still shown.
WORKER_LINE_HIDDEN = re.compile(r"Failed to kill actor \S+, return status: .*Socket closed")

_state = {"verbose": False, "file": None}
_file_lock = threading.Lock()


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"]:
            return True
        if record.name.startswith("recray"):
            return record.levelno >= logging.INFO
        return (record.levelno >= logging.WARNING
                and not any(w in record.getMessage() for w in IGNORED_WARNINGS))


def setup_console(verbose: bool) -> None:
    """Root logger → stderr through the console filter."""
    import os
    _state["verbose"] = verbose
    if not verbose:     # Hugging Face's download/loading bars; read when transformers loads
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ConsoleFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def to_file(path: Path) -> None:
    """Append every log record, every Ray worker line and all console output to `path`."""
    path = Path(path)
    if _state["file"] is not None:
        if Path(_state["file"].name).resolve() == path.resolve():
            return
        _state["file"].close()
    stream = open(path, "a", buffering=1, encoding="utf-8")
    _state["file"] = stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "recray_run_log", False)]
    handler.recray_run_log = True
    root.addHandler(handler)
    if not isinstance(sys.stdout, _Tee):
        sys.stdout = _Tee(sys.stdout)
    log.info("full log: %s", path)


def _write_file(text: str) -> None:
    stream = _state["file"]
    if stream is not None and not stream.closed:
        with _file_lock:
            stream.write(text)


class _Tee:
    """stdout that is also written to the run log (printed tables, the report)."""

    def __init__(self, console):
        self.console = console

    def write(self, text: str) -> int:
        _write_file(text)
        return self.console.write(text)

    def __getattr__(self, name):
        return getattr(self.console, name)


def adopt_logger(name: str) -> None:
    """A library logger that prints on its own handlers passes through the root instead
    (the console filter and the run log)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = True


def file_only(text: str) -> None:
    """Detail a person may want later but need not read now (e.g. a stats table)."""
    _write_file(text if text.endswith("\n") else text + "\n")


def route_ray_output() -> None:
    """Ray's and Ray Data's loggers print to the console themselves: send them through the
    root logger instead (so through the console filter, and to the file). Ray also prints
    every worker's stdout/stderr on the driver: keep recray's lines and errors (and the
    raylet's, which reports memory kills) on the console, and all of them in the file.
    Ray 2.60 has no public hook for the latter: its driver-side dispatcher is replaced."""
    import ray.data  # noqa: F401 - configures its loggers on import: reroute after it
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name in ("ray", "ray.data"):
        adopt_logger(name)
    if _state["verbose"] or ray_worker.global_worker.mode != ray_worker.SCRIPT_MODE:
        return

    def on_lines(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        _write_file("".join(f"({who} pid={data.get('pid')}) {line}\n" for line in data["lines"]))
        system = data.get("pid") in ("raylet", "autoscaler")
        shown = [line for line in data["lines"] if (system or WORKER_LINE_SHOWN.search(line))
                 and not WORKER_LINE_HIDDEN.search(line)]
        if shown:
            ray_worker.print_to_stdstream({**data, "lines": shown}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("recray_print_logs")
    dispatcher.add_handler("recray_print_logs", on_lines)


def progress(items: Iterable, total: int, what: str, unit: str,
             size=lambda item: 1, every_s: float = 30.0) -> Iterator:
    """Yield `items`, showing done/total, rate and ETA: a tqdm bar on a terminal, else a log
    line at most every `every_s` seconds and at the end. `size(item)`: units in an item."""
    if sys.stderr.isatty() and not _state["verbose"]:
        from tqdm import tqdm
        with tqdm(total=total, desc=what, unit=f" {unit}", leave=False) as bar:
            for item in items:
                yield item
                bar.update(size(item))
        return
    done, start = 0, time.time()
    last = start
    for item in items:
        yield item
        done += size(item)
        now = time.time()
        if now - last >= every_s and done < total:
            last = now
            rate = done / (now - start)
            log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, ETA %s", what, done, total, unit,
                     100 * done / max(total, 1), rate, unit, _duration((total - done) / rate))
    elapsed = time.time() - start
    end = "%s: %d %s in %s (%.2f %s/s)" % (what, done, unit, _duration(elapsed),
                                          done / max(elapsed, 1e-9), unit)
    # A line closes the ones shown on the way; work shorter than one interval is told by
    # its caller's own end line (a stage's), so its rate goes to the log file only.
    if last > start:
        log.info(end)
    else:
        file_only(end)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
