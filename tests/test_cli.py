"""The `recray` command as a user meets it: clean errors, nothing half-written."""

from __future__ import annotations

import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "recray.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_bad_timestamp_names_file_line_field_and_leaves_nothing(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp,title\n"
                   "u1,i1,100,Heat (1995)\n"
                   "u1,i2,-5,Casino (1995)\n")
    out = tmp_path / "out"
    done = run("prepare", "--format", "table", "--input", str(log), "--output", str(out),
               "data.columns.categories=null")
    assert done.returncode == 2, done.stderr
    assert "log.csv, line 3, field 'timestamp'" in done.stderr
    assert "negative" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_unknown_config_key_is_named(tmp_path):
    done = run("prepare", "--output", str(tmp_path / "o"), "data.min_interaction=3")
    assert done.returncode == 2
    assert "data.min_interaction: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_the_subcommands():
    done = run("--help")
    for command in ("fetch", "prepare", "evaluate", "report"):
        assert command in done.stdout
