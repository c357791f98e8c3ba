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


def test_landmark_blobs_differ_only_by_the_plate_they_lie_next_to(tmp_path: Path) -> None:
    """kind="landmark": the near (1) and far (2) blobs have the same intensity and size; the bright
    plate sits at either y end, the dark one at the other; every near voxel is 0.14-0.32 of the y
    extent from the bright plate, every far voxel as far from the dark one (a patch centred on a blob
    tells the classes apart only if it spans more than 0.28 of the y extent)."""
    out = make_dataset(tmp_path / "lm", kind="landmark", n_cases=6, shape_zyx=(24, 64, 32), seed=2)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "near": 1, "far": 2}
    sides = set()
    for i in range(6):
        img, _ = _read(out / "imagesTr" / f"synlandmark_{i:03d}_0000.nii.gz")
        lab, _ = _read(out / "labelsTr" / f"synlandmark_{i:03d}.nii.gz")
        assert img.dtype == np.float32
        near, far = img[lab == 1], img[lab == 2]
        se = 15.0 * np.sqrt(1 / near.size + 1 / far.size)  # noise sd 15: standard error of the difference
        assert abs(near.mean() - far.mean()) < 4 * se
        assert abs(near.std() - far.std()) < 4 * se / np.sqrt(2)
        assert 0.7 < near.size / far.size < 1.4
        bright = np.nonzero((img > 325).mean((0, 2)) > 0.9)[0]  # plates 400 and 20, blobs 250, background 100
        dark = np.nonzero((img < 60).mean((0, 2)) > 0.9)[0]
        assert bright.size in (3, 4)
        assert dark.size == bright.size
        side = 0 if bright[0] == 0 else 63
        assert {bright[0], bright[-1], dark[0], dark[-1]} >= {0, 63}
        sides.add(side)
        for value, plate_side in ((1, side), (2, 63 - side)):
            rows = np.nonzero((lab == value).any((0, 2)))[0]
            d = (np.abs(rows - plate_side) - bright.size) / 64  # y rows between a voxel and its plate
            assert d.min() >= 0.14, (value, d.min())
            assert d.max() <= 0.32, (value, d.max())
    assert sides == {0, 63}
