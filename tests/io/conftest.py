"""Helpers for the io tests: write small DICOM series and images with a given geometry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

OBLIQUE_XYZ = (0.98, 0.0, 0.199, 0.0, 1.0, 0.0, -0.199, 0.0, 0.98)


def sitk_image(
    arr: np.ndarray,
    spacing_xyz: Sequence[float] = (0.7, 0.8, 2.5),
    origin_xyz: Sequence[float] = (-10.0, 5.5, 30.25),
    direction: Sequence[float] | None = None,
) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(spacing_xyz)[: img.GetDimension()])
    img.SetOrigin(tuple(origin_xyz)[: img.GetDimension()])
    if direction is not None:
        d = np.asarray(direction, float).reshape(3, 3)
        img.SetDirection(tuple(d.ravel()) if img.GetDimension() == 3 else tuple(d[:2, :2].ravel()))
    return img


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    *,
    series_uid: str,
    description: str = "T1",
    spacing_xyz: Sequence[float] = (0.8, 0.8, 3.0),
    origin_xyz: Sequence[float] = (-50.0, -60.0, 10.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    thickness: float = 5.0,
    start_index: int = 0,
    shuffle: bool = True,
) -> list[Path]:
    """One file per slice, with position/orientation tags computed from the 3D geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk_image(volume.astype(np.int16), spacing_xyz, origin_xyz, direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    order = np.random.default_rng(0).permutation(volume.shape[0]) if shuffle else range(volume.shape[0])
    paths = []
    for k, z in enumerate(order):
        sl = img[:, :, int(z)]
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.3.4",
            "0020|000e": series_uid,
            "0008|103e": description,
            "0020|0011": "7",
            "0020|0013": str(int(z) + 1),
            "0018|0050": str(thickness),
            "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, int(z))))),
            "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))),
            "0028|0030": f"{spacing_xyz[1]}\\{spacing_xyz[0]}",
            "0008|0018": f"{series_uid}.{int(z) + 1}",
            "0020|0052": "1.2.3.4.5",
        }
        for key, val in tags.items():
            sl.SetMetaData(key, val)
        path = folder / f"IM{start_index + k:05d}"
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


@pytest.fixture
def dicom_writer() -> Callable[..., list[Path]]:
    return write_dicom_series


@pytest.fixture
def oblique_xyz() -> tuple[float, ...]:
    return OBLIQUE_XYZ


@pytest.fixture
def image_factory() -> Callable[..., sitk.Image]:
    return sitk_image
