"""Export predicted label maps to image files with the original geometry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxflow.store import Store

__all__ = ["export_labels"]

log = logging.getLogger(__name__)


def _export_sitk(store: Store, out_dir: Path, case_ids: Sequence[str], file_ending: str) -> list[Path]:
    import SimpleITK as sitk

    paths = []
    for cid in case_ids:
        geom = store.geometry(cid)
        arr = np.asarray(store.zarr_array(cid, "label")[...])
        img = sitk.GetImageFromArray(arr[0] if geom.is_2d else arr)
        geom.apply_to_sitk(img)
        path = out_dir / f"{cid}{file_ending}"
        sitk.WriteImage(img, str(path), useCompression=True)
        paths.append(path)
    return paths


def export_labels(store: Store, out_dir: Path, case_ids: Sequence[str], *, file_ending: str) -> None:
    """Write ``<case><file_ending>`` per case (``voxflow.io.export_store`` when available)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from voxflow.io import export_store
    except ImportError:
        _export_sitk(store, out_dir, case_ids, file_ending)
        return
    export_store(store, out_dir, case_ids=list(case_ids), file_ending=file_ending, array="label")
