"""Range checks of single values, each raising a one-line UserError that names the field.

The caller says what the field is called where the user wrote it (``--steps``, ``steps``,
``pipeline.yaml: defaults.sigma_max``), so the same check serves the CLI, the Python API and files.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import UserError


def whole(value: Any, field: str, minimum: int | None = 1) -> int:
    """An integer (not a bool, not 2.5) at least ``minimum``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok:
        raise UserError(f"{field}={value!r}: must be a whole number" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise UserError(f"{field}={value}: must be at least {minimum}")
    return int(value)


def finite(value: Any, field: str, minimum: float | None = None, positive: bool = False) -> float:
    """A finite float (nan and inf refused: they make black images without any error), at least
    ``minimum`` or (``positive``) above 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{field}={value!r}: must be a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise UserError(f"{field}={value}: must be a finite number")
    if positive and not number > 0:
        raise UserError(f"{field}={value}: must be greater than 0")
    if minimum is not None and number < minimum:
        raise UserError(f"{field}={value}: must be at least {minimum:g}")
    return number


__all__ = ["whole", "finite"]
