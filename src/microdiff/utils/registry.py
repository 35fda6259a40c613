"""Name -> object registries with one clear error for unknown names (CLI and configs use them)."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ValueError that names the unknown ``what`` and lists the choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown {what} {name!r}; {hint}choose one of {', '.join(registry)}") from None


def check_options(factory: Callable, options: Mapping[str, Any], where: str) -> None:
    """Every key of ``options`` is a keyword ``factory`` takes, else a ValueError naming the key, the
    closest name (did you mean) and the keywords there are."""
    params = [n for n, p in inspect.signature(factory).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in params:
            close = difflib.get_close_matches(str(key), params, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"{where}.{key}: not an option of {getattr(factory, '__name__', factory)}; {hint}"
                             f"its options are {', '.join(params) or 'none'}")
