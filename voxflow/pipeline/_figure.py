"""A PNG of a few slices: image, ground truth and prediction side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxflow._types import PathLikeStr

__all__ = ["pick_slices", "save_comparison_png"]


def pick_slices(label: np.ndarray, n: int = 3) -> list[int]:
    """``n`` z indices spread over the slices holding foreground (the middle ones if none do)."""
    per_slice = (label > 0).reshape(label.shape[0], -1).sum(1)
    zs = np.flatnonzero(per_slice)
    if zs.size == 0:
        zs = np.arange(label.shape[0])
    picks = np.unique(zs[np.linspace(0, zs.size - 1, n + 2).round().astype(int)[1:-1]])
    return [int(z) for z in picks]


def save_comparison_png(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: PathLikeStr, *, n_slices: int = 3
) -> Path:
    """Write one row per (case id, image (Z,Y,X), ground truth (Z,Y,X), prediction (Z,Y,X)).

    Each row shows ``n_slices`` axial slices as image | ground truth overlay | prediction overlay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows) * n_slices
    fig, axes = plt.subplots(n_rows, 3, figsize=(9, 3 * n_rows), squeeze=False)
    r = 0
    for case_id, image, gt, pred in rows:
        zs = pick_slices(gt, n_slices)
        zs = (zs + zs[-1:] * n_slices)[:n_slices]
        lo, hi = np.percentile(image, [1, 99])
        k = max(int(max(gt.max(), pred.max())), 1)
        for z in zs:
            for col, (title, overlay) in enumerate((("image", None), ("ground truth", gt), ("prediction", pred))):
                ax = axes[r, col]
                ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
                if overlay is not None:
                    ax.imshow(np.ma.masked_equal(overlay[z], 0), cmap="autumn", alpha=0.5, vmin=1, vmax=k)
                ax.set_title(f"{case_id} z={z}: {title}", fontsize=8)
                ax.axis("off")
            r += 1
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
