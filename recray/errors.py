"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class RecrayError(Exception):
    """Base class: the message alone tells the user what to fix."""


class ConfigError(RecrayError):
    """A config key is unknown, mistyped or out of range; the message names the key."""


class DataError(RecrayError):
    """Input data is unusable; the message names the file, line/row and field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
