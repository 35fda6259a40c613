"""argparse ``type=`` functions that range-check a value where it is read, so a bad flag ends as argparse's
one usage line naming the flag (``argument --steps: must be an integer >= 1, got 0``)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def float_above(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = finite_float(text)
        if value <= low:
            raise argparse.ArgumentTypeError(f"must be a number > {low:g}, got {value:g}")
        return value

    parse.__name__ = f"number > {low:g}"
    return parse


def float_at_least(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a number >= {low:g}, got {value:g}")
        return value

    parse.__name__ = f"number >= {low:g}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = float_above(0.0)
non_negative_float = float_at_least(0.0)

class Parser(argparse.ArgumentParser):
    """argparse with a usage mistake in one line (``microdiff sample: error: argument --steps: ...; see
    microdiff sample --help``) instead of the usage block followed by the message. Subparsers made from
    it are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


__all__ = ["Parser", "int_at_least", "finite_float", "float_above", "float_at_least", "positive_int", "non_negative_int",
           "positive_float", "non_negative_float"]
