"""The one exception type for a user's mistake.

A :class:`UsageError` is raised for what the user asked for and can fix: a config value outside its allowed
range, an input file that is missing or is not what it should be, a folder another process is using. Its
message is one line that names the key or file, the value, what is allowed and what to do. The apps print
exactly that line on stderr and exit with status 2 (see :mod:`biasamp.apps`).

It is deliberately *not* a ``ValueError``: an error raised by numpy, pandas, torch or by a bug in biasamp
keeps its traceback and exit status 1, instead of being shown as "bad input".
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the user's input; the message is one line, shown as is."""


def one_line(message: str) -> str:
    """The first non-empty line of ``message`` (a usage message must never spill over several lines)."""
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "")


def reason(err: BaseException) -> str:
    """A caught exception as a few words for a usage message: its first line, or its type's name."""
    return one_line(str(err)) or type(err).__name__
