"""Weighted prompts: the one grammar of ``microdiff sample``'s text prompts and CLIP image prompts.

    PROMPT  := TEXT [ ":" WEIGHT ]
    WEIGHT  := a plain signed decimal: [+-] digits [. digits]  (0.5, -1, +2.25, .5)

A trailing ``:WEIGHT`` is a weight only when all of these hold; otherwise the whole prompt is text
with weight 1:
  - WEIGHT follows the colon directly (no space) and ends the prompt;
  - the character before the colon is not a digit, so times and ratios stay text
    ("a clock showing 10:30", "ratio 16:9", "3:2 photo");
  - the colon is not escaped: ``\\:`` is a literal colon anywhere in a prompt (the backslash goes).
Text before a weight is stripped of trailing spaces, so ``"photo 2 :0.5"`` is "photo 2" with weight
0.5 (a space is how a weight follows text that ends in a digit) and ``"example.com\\:8080"`` keeps
the port as text. "time: 5" is text (a space after the colon). Refused with one line, because they
cannot be what was meant: a weight with no text before it (``":0.5"``), and a suffix that is a
number in another spelling (``":nan"``, ``":inf"``, ``":1e3"``): weights must be finite plain decimals.

A mix whose weights are all 0 is refused (``check_mix``): guidance is D_null + cfg * sum_i w_i (D_i -
D_null), so it would be an unconditional image that looks like an answer to the prompts. Weights that
sum to 0 but are not all 0 ("a:1" "b:-1": towards a, away from b) and only negative weights (push away
from the empty caption) are meaningful and kept.
"""

from __future__ import annotations

import math
import re

from .utils.errors import UserError

WEIGHT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_ESCAPED = "\\:"
_PLACEHOLDER = "\0"


def parse_weighted(prompt: str, what: str = "prompt") -> tuple[str, float]:
    """``"a red circle:1.5"`` -> ("a red circle", 1.5); see the module docstring for the grammar."""
    raw = str(prompt)
    text = raw.replace(_ESCAPED, _PLACEHOLDER)
    head, sep, tail = text.rpartition(":")
    if sep and tail and not tail[0].isspace() and not (head and head[-1].isdigit()):
        if WEIGHT.fullmatch(tail):
            weight = float(tail)
            if not math.isfinite(weight):
                raise UserError(f"{what} {raw!r}: the weight {tail} is too large to be a number; use a finite one")
            if not head.strip():
                raise UserError(f"{what} {raw!r}: a weight needs text before it; write TEXT:WEIGHT, or "
                                f"{_ESCAPED}{tail} if the colon is part of the text")
            return _unescape(head.rstrip()), weight
        if tail.strip() == tail and _is_float(tail):
            raise UserError(f"{what} {raw!r}: the weight {tail!r} is not a finite plain decimal like 0.5 or -1; "
                            f"write one, or {_ESCAPED}{tail} if the colon is part of the text")
    return _unescape(text), 1.0


def check_mix(weights: list[float], image_weights: list[float] = ()) -> None:
    """Refuse a prompt mix with nothing to guide towards: every text weight 0 and no image prompt (CLIP
    guidance) with a non-zero weight."""
    if weights and not any(weights) and not any(image_weights):
        raise UserError(f"prompt weights: all {len(weights)} are 0, so nothing guides the images (they would be "
                        "unconditional samples); give a prompt a non-zero weight (negative weights push away)")


def format_weighted(prompts: list[tuple[str, float]]) -> str:
    """A readable one-line form of weighted prompts, for logs and PNG text (not parsed back)."""
    return " | ".join(f"{text}:{weight:g}" for text, weight in prompts)


def _unescape(text: str) -> str:
    return text.replace(_PLACEHOLDER, ":")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["parse_weighted", "check_mix", "format_weighted", "WEIGHT"]
