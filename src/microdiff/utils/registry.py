"""Name -> object registries with one clear error for unknown names (CLI and configs use them)."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ValueError that names the unknown ``what`` and lists the choices."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}") from None
