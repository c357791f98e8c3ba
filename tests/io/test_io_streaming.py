"""Volumes larger than the converter's memory are written slab by slab, voxel for voxel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from voxflow.io import convert
from voxflow.io._convert import _plan_case
from voxflow.io._sources import load_source
from voxflow.testing import run_with_memory_cap

_SHAPE = (176, 1024, 1024)  # int16: 369 MB


def _pattern(z0: int, z1: int, shape: tuple[int, int, int]) -> np.ndarray:
    yx = np.arange(shape[1])[:, None] * 3 + np.arange(shape[2])[None, :]
    return ((np.arange(z0, z1)[:, None, None] * 7 + yx) % 30011 - 15000).astype("<i2")


def _write_mha(path: Path, shape: tuple[int, int, int], slab: int = 16) -> None:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 1.5 -2 3\n"
        f"ElementSpacing = 0.5 0.5 1.25\nDimSize = {shape[2]} {shape[1]} {shape[0]}\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode())
        for z in range(0, shape[0], slab):
            f.write(_pattern(z, min(shape[0], z + slab), shape).tobytes())


@pytest.mark.parametrize("fmt", [".mha", ".nrrd", ".nii", ".tif", "dicom"])
def test_slab_path_is_voxel_exact(tmp_path: Path, fmt: str, image_factory, dicom_writer) -> None:
    shape = (13, 20, 24)
    vol = _pattern(0, shape[0], shape)
    if fmt == "dicom":
        dicom_writer(tmp_path / "vol", vol, series_uid="1.2.5")
        src = tmp_path / "vol"
    elif fmt == ".tif":
        src = tmp_path / "vol.tif"
        tifffile.imwrite(src, vol)
    else:
        src = tmp_path / f"vol{fmt}"
        sitk.WriteImage(image_factory(vol), str(src))
    budget = 4 * 3 * 2 * 20 * 24 * 2  # a few rows per slab
    case = load_source(src).cases[0]
    plan = _plan_case(case, 1, (2, 8, 8), budget)
    assert plan.slab_z < shape[0]
    assert plan.slab_z % 2 == 0
    store = convert(src, tmp_path / "ds.zarr", chunks_zyx=(2, 8, 8), max_memory_bytes=budget, progress=False)
    np.testing.assert_array_equal(store.image(store.case_ids()[0])[0].compute(), vol)


@pytest.mark.slow  # ~30 s: writes, converts and compares a 369 MB volume
def test_volume_larger_than_memory_cap_converts_exactly(tmp_path: Path) -> None:
    src, dst = tmp_path / "big.mha", tmp_path / "big.zarr"
    _write_mha(src, _SHAPE)
    volume_bytes = int(np.prod(_SHAPE)) * 2
    cap = 340 * 10**6  # address-space cap (RLIMIT_DATA) below the 369 MB volume
    code = (
        "import dask, zarr\n"
        "dask.config.set(num_workers=2); zarr.config.set({'threading.max_workers': 2})\n"
        "from voxflow.io import convert\n"
        f"convert({str(src)!r}, {str(dst)!r}, max_memory_bytes=64_000_000, chunks_zyx=(8, 256, 256), progress=False)\n"
    )
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    peak, _ = run_with_memory_cap(code, cap_bytes=cap, env=env, timeout=300)
    assert cap < volume_bytes
    assert peak < volume_bytes
    import zarr

    arr = zarr.open_array(str(dst / "cases/big/image"), mode="r")
    assert arr.shape == (1, *_SHAPE)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(src))
    for z0 in range(0, _SHAPE[0], 44):
        expected = _pattern(z0, z0 + 44, _SHAPE)
        np.testing.assert_array_equal(arr[0, z0 : z0 + 44], expected)
    reader.SetExtractIndex((0, 0, 100))
    reader.SetExtractSize((_SHAPE[2], _SHAPE[1], 3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reader.Execute()), _pattern(100, 103, _SHAPE))
