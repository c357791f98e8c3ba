"""Shared type aliases. Axis order is numpy's: (z, y, x), channels first."""

from __future__ import annotations

from os import PathLike
from typing import Union

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Chunks = tuple[int, ...]
PathLikeStr = Union[str, "PathLike[str]"]
