"""The one exception a user sees, and the bounded text that goes into its message.

Every check in fika raises `FikaError` with one line per problem (the key, the value given, what is allowed).
The command line prints each line as `fika COMMAND: error: LINE` and exits with code 2; the Python API
(`fika.train`, `fika.search.run`, ...) raises it as is, so a notebook gets the same line.
"""

from __future__ import annotations

import reprlib
from typing import Any


class FikaError(Exception):
    """A user-facing error: one line per problem. The CLI prints each line and exits with code 2."""


class ConfigError(FikaError):
    """A config, spec or override that fails validation: unknown key, wrong type or a value out of range."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type's name when it has none), at most `limit` characters: what a
    one-line error quotes of a library's exception."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


def error_text(err: BaseException, limit: int = 500) -> str:
    """`Type: message` of an exception, bounded: how a failed trial records what failed it."""
    return f"{type(err).__name__}: {str(err)[:limit]}"


_SHORT = reprlib.Repr()  # bounded: 2 levels, 6 items per list or mapping, 60 characters per string
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = 60


def shorten(value: Any) -> str:
    """A value as a bounded one-line repr for error messages: a YAML alias bomb must not print megabytes."""
    return _SHORT.repr(value).replace("\n", "\\n")
