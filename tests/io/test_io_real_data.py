"""Conversion of the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from voxflow.geometry import Geometry
from voxflow.io import convert, detect_source


def _series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_grid(a: Geometry, b: Geometry) -> None:
    assert a.shape_zyx == b.shape_zyx
    np.testing.assert_allclose(a.spacing_zyx, b.spacing_zyx, rtol=1e-5)
    np.testing.assert_allclose(a.origin_zyx, b.origin_zyx, atol=1e-4)
    np.testing.assert_allclose(a.direction_zyx, b.direction_zyx, atol=1e-4)


def test_hippocampus_images_and_labels(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "hippocampus-dev"
    assert detect_source(src) == "image-label-folders"
    store = convert(src, tmp_path / "hippo.zarr", progress=False)
    ids = store.case_ids()
    assert len(ids) == 24
    assert store.meta.labels == {"background": 0, "label_1": 1, "label_2": 2}
    dtypes = {str(store.zarr_array(c, "image").dtype) for c in ids}
    assert dtypes == {"float32", "uint8"}  # source dtypes kept per case
    for cid in ids[:4] + ids[-2:]:
        img = sitk.ReadImage(str(src / "images" / f"{cid}.nii.gz"))
        lab = sitk.ReadImage(str(src / "labels" / f"{cid}.nii.gz"))
        np.testing.assert_array_equal(store.image(cid)[0].compute(), sitk.GetArrayFromImage(img))
        np.testing.assert_array_equal(store.label(cid).compute(), sitk.GetArrayFromImage(lab).astype(np.uint8))
        assert store.label(cid).dtype == np.uint8
        _assert_same_grid(store.geometry(cid), Geometry.from_sitk(img))


def test_ct_j2k_series_has_all_20_slices(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "dicom-ct-j2k"
    store = convert(src, tmp_path / "ct.zarr", progress=False)
    (cid,) = store.case_ids()
    geom = store.geometry(cid)
    assert geom.shape_zyx == (20, 512, 512)  # one SOPInstanceUID for all: still 20 slices
    assert geom.spacing_zyx == pytest.approx((2.0, 0.9765625, 0.9765625))  # positions, not SliceThickness=3
    ref = _series(src / "example_ct_dicom")
    _assert_same_grid(geom, Geometry.from_sitk(ref))
    np.testing.assert_array_equal(store.image(cid)[0].compute(), sitk.GetArrayFromImage(ref))
    assert store.image(cid).dtype == np.int16


def test_tcia_mr_series_with_masks(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "dicom-mr-tcia"
    store = convert(src, tmp_path / "mr.zarr", progress=False)
    ids = store.case_ids()
    assert len(ids) == 3  # three T1post series; the two mask series became their labels
    assert store.meta.labels == {"background": 0, "foreground": 1}
    labelled = [c for c in ids if store.label(c) is not None]
    assert len(labelled) == 2
    for cid in labelled:
        prov = store.case_attrs(cid)["provenance"]
        image_dir = Path(prov["image"][0]).parent
        mask_dir = Path(prov["label"][0]).parent
        assert "T1post" in image_dir.name
        assert "Mask" in mask_dir.name
        assert image_dir.parent == mask_dir.parent
        ref_img, ref_mask = _series(image_dir), _series(mask_dir)
        geom = store.geometry(cid)
        _assert_same_grid(geom, Geometry.from_sitk(ref_img))
        assert geom.spacing_zyx[0] == pytest.approx(6.5, abs=1e-4)  # SliceThickness says 5
        assert not np.allclose(geom.direction_zyx, np.eye(3), atol=1e-3)  # oblique kept
        np.testing.assert_array_equal(store.image(cid)[0].compute(), sitk.GetArrayFromImage(ref_img))
        np.testing.assert_array_equal(store.label(cid).compute(), sitk.GetArrayFromImage(ref_mask) > 0)
        assert store.label(cid).compute().any()
    (unlabelled,) = set(ids) - set(labelled)
    assert store.geometry(unlabelled).shape_zyx == (22, 512, 512)
