"""Name -> object registries with one clear error for unknown names (CLI and configs use them)."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping, TypeVar

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


def check_options(factory: Callable, options: Mapping[str, Any], where: str) -> None:
    """Every key of ``options`` is a keyword ``factory`` takes, else a UserError naming the key, the
    keywords there are and the closest one."""
    params = [n for n, p in inspect.signature(factory).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in params:
            raise UserError(f"{where}.{key}: not an option of {getattr(factory, '__name__', factory)}; its options "
                            f"are {', '.join(params) or 'none'}{did_you_mean(key, params)}")


__all__ = ["did_you_mean", "lookup", "check_options"]
