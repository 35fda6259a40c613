"""Values -> plain JSON/YAML data (dict, list, str, number, bool, None), with a clear error otherwise."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def json_data(value: Any, where: str) -> Any:
    """``value`` as JSON data: tuples become lists, numpy / torch values Python numbers or lists, paths
    strings; anything else raises ValueError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_data(v, where) for v in value]
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"{where} is a {type(value).__name__}, which JSON cannot hold; store numbers, "
                     "strings, lists or dicts there")


__all__ = ["json_data"]
