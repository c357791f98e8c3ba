"""Gaussian importance map for sliding-window inference (tile centres count more than borders)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["gaussian_importance_map"]


def gaussian_importance_map(
    patch_size_vox: Sequence[int],
    *,
    sigma_scale: float = 1.0 / 8,
    min_value: float = 1e-3,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Separable Gaussian weight over a tile, shape ``patch_size_vox`` (z, y, x).

    ``g(i) = prod_a exp(-(i_a - c_a)^2 / (2 sigma_a^2))`` with centre ``c_a = (p_a - 1) / 2`` and
    ``sigma_a = sigma_scale * p_a`` voxels; ``w = max(g / max(g), min_value)``. The peak is 1, the map
    is symmetric under flips, and no voxel has zero weight (``min_value > 0``): corners of the
    volume, covered by one tile only, still get a well-defined weighted average.
    """
    if not 0.0 < min_value <= 1.0:
        raise ValueError(f"min_value must be in (0, 1]; got {min_value!r}")
    w = np.ones((), dtype=np.float64)
    for p in patch_size_vox:
        p = int(p)
        sigma = max(sigma_scale * p, 1e-6)
        i = np.arange(p, dtype=np.float64)
        g = np.exp(-((i - (p - 1) / 2.0) ** 2) / (2.0 * sigma**2))
        w = np.multiply.outer(w, g)
    w = w / w.max()
    return np.maximum(w, min_value).astype(dtype)
