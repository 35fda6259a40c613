"""Ambient: learning from corrupted data (noisy, blurred, compressed, partially observed images).

``corruptions`` holds the operators that make (and describe) the corrupted data; ambient losses and
quality annotation build on the metadata they write (``corruption``, ``sigma_tn``, masks).
"""

from .corruptions import (CORRUPTIONS, Corrupted, additive_noise, apply_corruption, gaussian_blur, jpeg,
                          parse_corruption, pixel_mask)

__all__ = ["CORRUPTIONS", "Corrupted", "additive_noise", "apply_corruption", "gaussian_blur", "jpeg",
           "parse_corruption", "pixel_mask"]
