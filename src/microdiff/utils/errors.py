"""How every ``microdiff`` command ends on bad input: one line on stderr naming the file or field and
the fix, exit status 2. A traceback appears only with ``--debug`` (or ``MICRODIFF_DEBUG=1``).

Library code raises :class:`UserError` (or a ``ValueError`` / ``OSError`` with a one-line message);
``microdiff.cli.main`` turns it into that line. Anything else is a bug: it is reported in one line too,
as an internal error with the hint to rerun with ``--debug``, exit status 1.
"""

from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """A mistake in the user's input; the message is one line naming the file or field and the fix."""


# what bad input (files, options, missing models) raises in library code
USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def debug_enabled() -> bool:
    return os.environ.get("MICRODIFF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a KeyError's without its quotes), or its type name."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    lines = text.strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        # raised in a DataLoader worker: torch re-raises it with the worker's traceback as the message;
        # the original "Type: message" is its last line
        original = lines[-1].strip()
        name, sep, message = original.partition(": ")
        return message if sep and name.split(".")[-1] == type(err).__name__ else original
    return lines[0] if lines else type(err).__name__


def report_error(command: str, message: str) -> int:
    print(f"microdiff {command}: error: {message}", file=sys.stderr)
    return 2


def run_command(command: str, fn, args) -> int:
    """``fn(args)`` with every exception ending as one line on stderr: bad input (USER_ERRORS) exit 2,
    Ctrl-C exit 130, anything else exit 1 as an internal error. ``--debug``: the traceback instead."""
    if getattr(args, "debug", False) or debug_enabled():
        return fn(args)
    try:
        return fn(args)
    except KeyboardInterrupt:
        print(f"microdiff {command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        return report_error(command, first_line(err))
    except Exception as err:  # noqa: BLE001 - a bug: still one line, with the way to see more
        print(f"microdiff {command}: internal error: {type(err).__name__}: {first_line(err)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


__all__ = ["UserError", "USER_ERRORS", "debug_enabled", "first_line", "report_error", "run_command"]
