"""How the ``microdiff eval`` commands end on bad input: one line on stderr, exit status 2 (see
utils/errors.py; here a RuntimeError or TypeError from a feature model also counts as bad input, e.g.
weights of the wrong shape)."""

from __future__ import annotations

from ..utils.errors import USER_ERRORS as _BASE, debug_enabled, first_line, report_error

USER_ERRORS = (*_BASE, RuntimeError, TypeError)


def run_reporting(command: str, fn, args) -> int:
    """``fn(args)``, with bad input (USER_ERRORS) ending as one line on stderr and exit status 2
    (``--debug`` / MICRODIFF_DEBUG=1: the traceback instead)."""
    if getattr(args, "debug", False) or debug_enabled():
        return fn(args)
    try:
        return fn(args)
    except USER_ERRORS as err:
        return report_error(command, first_line(err))


__all__ = ["USER_ERRORS", "first_line", "report_error", "run_reporting"]
