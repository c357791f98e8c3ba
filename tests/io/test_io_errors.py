"""Each bad input gives a clear error naming case and file, and leaves the case not complete."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from voxflow.errors import ConversionError
from voxflow.io import convert
from voxflow.store import Store
from voxflow.synthetic import make_dataset

BAD = "synct_001"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "raw", kind="ct", n_cases=3, shape_zyx=(6, 12, 10))


def _rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], **geometry: tuple[float, ...]) -> None:
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
    new.CopyInformation(img) if new.GetSize() == img.GetSize() else None
    if "spacing" in geometry:
        new.SetSpacing(geometry["spacing"])
    sitk.WriteImage(new, str(path))


def _assert_bad_case_fails(raw: Path, tmp_path: Path, *needles: str) -> None:
    with pytest.raises(ConversionError) as info:
        convert(raw, tmp_path / "ds.zarr", progress=False)
    msg = str(info.value)
    assert BAD in msg
    for needle in needles:
        assert needle in msg, msg
    store = Store.open(tmp_path / "ds.zarr")
    assert store.case_ids() == ["synct_000", "synct_002"]  # the good cases are written and complete
    assert not store.is_complete(BAD)


def test_label_spacing_mismatch(raw: Path, tmp_path: Path) -> None:
    _rewrite(raw / f"labelsTr/{BAD}.nii.gz", lambda a: a, spacing=(0.8, 0.8, 3.0))
    _assert_bad_case_fails(raw, tmp_path, "spacing", f"{BAD}.nii.gz")


def test_label_shape_mismatch(raw: Path, tmp_path: Path) -> None:
    _rewrite(raw / f"labelsTr/{BAD}.nii.gz", lambda a: a[:, :-1])
    _assert_bad_case_fails(raw, tmp_path, "shape", f"{BAD}.nii.gz")


def test_small_header_noise_is_tolerated(raw: Path, tmp_path: Path) -> None:
    _rewrite(raw / f"labelsTr/{BAD}.nii.gz", lambda a: a, spacing=(0.8000001, 0.8, 2.5))
    assert BAD in convert(raw, tmp_path / "ds.zarr", progress=False).case_ids()


def test_undeclared_label_values(raw: Path, tmp_path: Path) -> None:
    _rewrite(raw / f"labelsTr/{BAD}.nii.gz", lambda a: np.where(a == 2, 5, a).astype(a.dtype))
    _assert_bad_case_fails(raw, tmp_path, "undeclared value(s) [5]", f"{BAD}.nii.gz")


def test_non_integer_label_values(raw: Path, tmp_path: Path) -> None:
    _rewrite(raw / f"labelsTr/{BAD}.nii.gz", lambda a: a.astype(np.float32) * 0.5)
    _assert_bad_case_fails(raw, tmp_path, "must be integers", "0.5")


def test_missing_channel_file(tmp_path: Path) -> None:
    raw = make_dataset(tmp_path / "raw", kind="mr", n_cases=2, shape_zyx=(5, 8, 8))
    (raw / "imagesTr/synmr_001_0001.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"synmr_001_0001\.nii\.gz.*missing for case 'synmr_001'"):
        convert(raw, tmp_path / "ds.zarr", progress=False)
    assert Store.open(tmp_path / "ds.zarr").case_ids() == ["synmr_000"]


def test_nan_in_image(tmp_path: Path) -> None:
    # NRRD: SimpleITK's NIfTI reader silently turns NaN into 0, so NaN can only be seen in other formats
    raw = make_dataset(tmp_path / "raw", kind="mr", n_cases=2, shape_zyx=(5, 8, 8), file_ending=".nrrd")
    path = raw / "imagesTr/synmr_001_0000.nrrd"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.nan
    arr[0, 0, 0] = np.inf
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, str(path))
    with pytest.raises(ConversionError, match=r"2 NaN/Inf voxels in '.*synmr_001_0000\.nrrd' for case 'synmr_001'"):
        convert(raw, tmp_path / "ds.zarr", progress=False)
    assert Store.open(tmp_path / "ds.zarr").case_ids() == ["synmr_000"]


def test_unreadable_file(raw: Path, tmp_path: Path) -> None:
    (raw / f"imagesTr/{BAD}_0000.nii.gz").write_bytes(b"this is not an image" * 10)
    _assert_bad_case_fails(raw, tmp_path, "could not read", f"{BAD}_0000.nii.gz")


def test_truncated_file(raw: Path, tmp_path: Path) -> None:
    path = raw / f"labelsTr/{BAD}.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(raw / f"labelsTr/{BAD}.nii"))  # uncompressed, then cut
    data = (raw / f"labelsTr/{BAD}.nii").read_bytes()
    path.unlink()
    meta = json.loads((raw / "dataset.json").read_text())
    for p in raw.glob("*/*.nii.gz"):
        if p.name != f"{BAD}.nii.gz":
            sitk.WriteImage(sitk.ReadImage(str(p)), str(p.with_suffix("")))
            p.unlink()
    (raw / f"labelsTr/{BAD}.nii").write_bytes(data[: len(data) // 2])
    meta["file_ending"] = ".nii"
    (raw / "dataset.json").write_text(json.dumps(meta))
    _assert_bad_case_fails(raw, tmp_path, f"{BAD}.nii", "truncated")


def test_duplicate_case_ids(tmp_path: Path, image_factory) -> None:
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir()
    vol = np.zeros((3, 4, 5), np.uint8)
    for name in ("a.nii.gz", "a.nrrd"):
        sitk.WriteImage(image_factory(vol), str(tmp_path / "src/images" / name))
    sitk.WriteImage(image_factory(vol), str(tmp_path / "src/labels/a.nii.gz"))
    with pytest.raises(ConversionError, match=r"unique.*'a.nii.gz' and 'a.nrrd'"):
        convert(tmp_path / "src", tmp_path / "ds.zarr", progress=False)
    assert not (tmp_path / "ds.zarr").exists()


def test_dicom_series_with_mixed_slice_sizes(tmp_path: Path, dicom_writer) -> None:
    a = np.zeros((3, 8, 10), np.int16)
    b = np.zeros((2, 8, 12), np.int16)
    dicom_writer(tmp_path / "dcm", a, series_uid="1.2.9.1")
    dicom_writer(tmp_path / "dcm", b, series_uid="1.2.9.1", origin_xyz=(-50.0, -60.0, 40.0), start_index=50)
    with pytest.raises(ConversionError, match=r"same size.*\(8, 10\), \(8, 12\).*1\.2\.9\.1"):
        convert(tmp_path / "dcm", tmp_path / "ds.zarr", progress=False)


def test_dicom_series_with_a_missing_slice(tmp_path: Path, dicom_writer) -> None:
    paths = dicom_writer(tmp_path / "dcm", np.zeros((5, 8, 10), np.int16), series_uid="1.2.9.2", shuffle=False)
    paths[2].unlink()
    with pytest.raises(ConversionError, match="evenly spaced"):
        convert(tmp_path / "dcm", tmp_path / "ds.zarr", progress=False)


def test_gzip_volume_too_large_for_memory_says_why(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"gzip-compressed.*cannot be read in parts.*--max-memory"):
        convert(raw, tmp_path / "ds.zarr", max_memory_bytes=1000, progress=False)
