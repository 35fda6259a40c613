"""Name -> object registries with one clear error for unknown names (CLI and configs use them)."""

from __future__ import annotations

import difflib
from typing import Mapping, TypeVar

from .errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a UserError (a ValueError) that names the unknown ``what``, lists the
    choices and suggests the closest one."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}"
                        f"{did_you_mean(name, registry)}") from None


__all__ = ["did_you_mean", "lookup"]
