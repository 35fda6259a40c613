"""How the ``microdiff eval`` commands end on bad input: one line on stderr, exit status 2."""

from __future__ import annotations

import sys

# what bad input (files, options, missing models) raises; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError, ImportError, KeyError)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a KeyError's without its quotes), or its type name."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def report_error(command: str, message: str) -> int:
    print(f"microdiff {command}: error: {message}", file=sys.stderr)
    return 2


def run_reporting(command: str, fn, args) -> int:
    """``fn(args)``, with bad input (USER_ERRORS) ending as one line on stderr and exit status 2."""
    try:
        return fn(args)
    except USER_ERRORS as err:
        return report_error(command, first_line(err))


__all__ = ["USER_ERRORS", "first_line", "report_error", "run_reporting"]
