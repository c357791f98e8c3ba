from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from voxflow.errors import VoxflowError
from voxflow.synthetic import large_volume_slab, make_dataset, synthetic_volume, write_large_volume


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


@pytest.mark.parametrize(
    ("kind", "n_channels", "dtype"), [("ct", 1, np.int16), ("mr", 2, np.float32), ("2d", 1, np.int16)]
)
def test_make_dataset_writes_nnunet_layout(tmp_path: Path, kind: str, n_channels: int, dtype: type) -> None:
    out = make_dataset(tmp_path / kind, kind=kind, n_cases=2, shape_zyx=(12, 20, 24), n_test_cases=1)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert len(meta["channel_names"]) == n_channels
    assert meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"syn{kind}_000.nii.gz", f"syn{kind}_001.nii.gz"]
    assert [p.name for p in (out / "labelsTs").iterdir()] == [f"syn{kind}_002.nii.gz"]
    assert len(list((out / "imagesTr").iterdir())) == 2 * n_channels
    img, sitk_img = _read(out / "imagesTr" / f"syn{kind}_000_0000.nii.gz")
    lab, sitk_lab = _read(out / "labelsTr" / f"syn{kind}_000.nii.gz")
    assert img.dtype == dtype
    expected_shape = (20, 24) if kind == "2d" else (12, 20, 24)
    assert img.shape == lab.shape == expected_shape
    assert sitk_img.GetSpacing() == sitk_lab.GetSpacing()
    # every class present, and classes are separable by mean intensity (learnable)
    assert set(np.unique(lab)) == {0, 1, 2}
    means = [img[lab == v].mean() for v in (0, 1, 2)]
    assert len({round(m / 20) for m in means}) == 3


def test_ct_is_hu_and_anisotropic(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "ct", kind="ct", n_cases=1, shape_zyx=(10, 32, 32))
    img, sitk_img = _read(out / "imagesTr" / "synct_000_0000.nii.gz")
    assert img.min() >= -1024
    assert img.max() > 300
    sx, sy, sz = sitk_img.GetSpacing()
    assert sz > 2 * sx


def test_datasets_are_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", kind="mr", n_cases=1, shape_zyx=(8, 16, 16), seed=3)
    b = make_dataset(tmp_path / "b", kind="mr", n_cases=3, shape_zyx=(8, 16, 16), seed=3)
    c = make_dataset(tmp_path / "c", kind="mr", n_cases=1, shape_zyx=(8, 16, 16), seed=4)
    name = "imagesTr/synmr_000_0001.nii.gz"
    np.testing.assert_array_equal(_read(a / name)[0], _read(b / name)[0])
    assert not np.array_equal(_read(a / name)[0], _read(c / name)[0])


def test_synthetic_volume_rejects_bad_kind() -> None:
    with pytest.raises(VoxflowError, match="'ct'"):
        synthetic_volume("cT", (4, 4, 4))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_large_volume_is_written_slab_by_slab_exactly(tmp_path: Path, suffix: str) -> None:
    shape = (23, 30, 34)
    path = write_large_volume(
        tmp_path / f"big{suffix}",
        shape,
        spacing_zyx=(1.5, 0.7, 0.6),
        slab_z=5,
        label_path=tmp_path / f"big_label{suffix}",
    )
    img, sitk_img = _read(path)
    lab, _ = _read(tmp_path / f"big_label{suffix}")
    expected, expected_label = large_volume_slab(shape, 0, shape[0])
    np.testing.assert_array_equal(img, expected)
    np.testing.assert_array_equal(lab, expected_label)
    np.testing.assert_allclose(sitk_img.GetSpacing(), (0.6, 0.7, 1.5))
    assert set(np.unique(lab)) == {0, 1, 2}
