from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from voxflow.io import convert, detect_source, to_xarray
from voxflow.store import Store
from voxflow.synthetic import make_dataset
from voxflow.testing import raise_if_computes


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("kind", ["ct", "mr", "2d"])
def test_nnunet_dataset_converts_voxel_exact(tmp_path: Path, kind: str) -> None:
    src = make_dataset(tmp_path / "raw", kind=kind, n_cases=3, shape_zyx=(11, 20, 18), n_test_cases=1)
    store = convert(src, tmp_path / "ds.zarr", chunks_zyx=(4, 7, 5), progress=False)
    assert detect_source(src) == "nnunet-v2"
    meta = json.loads((src / "dataset.json").read_text())
    assert store.meta.channel_names == tuple(meta["channel_names"].values())
    assert store.meta.labels == meta["labels"]
    assert store.case_ids() == [f"syn{kind}_000", f"syn{kind}_001", f"syn{kind}_002"]  # imagesTs not mixed in
    for cid in store.case_ids():
        image = store.image(cid).compute()
        for c in range(image.shape[0]):
            src_img = _arr(src / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
            np.testing.assert_array_equal(image[c].reshape(src_img.shape), src_img)
            assert image.dtype == src_img.dtype
        label = store.label(cid)
        assert label is not None
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label.compute().reshape(-1), _arr(src / "labelsTr" / f"{cid}.nii.gz").ravel())
        ref = sitk.ReadImage(str(src / "labelsTr" / f"{cid}.nii.gz"))
        geom = store.geometry(cid)
        assert geom.sitk_spacing() == ref.GetSpacing()
        assert geom.sitk_origin() == ref.GetOrigin()
        assert geom.is_2d == (kind == "2d")
        prov = store.case_attrs(cid)["provenance"]
        assert prov["label"] == [str(src / "labelsTr" / f"{cid}.nii.gz")]
        assert len(prov["image"]) == len(meta["channel_names"])
    test = convert(src, tmp_path / "ts.zarr", split="test", progress=False)
    assert test.case_ids() == [f"syn{kind}_003"]
    assert test.case_attrs(f"syn{kind}_003")["split"] == "test"


def test_rerun_skips_complete_and_redoes_incomplete(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", n_cases=3, shape_zyx=(6, 12, 10))
    dst = tmp_path / "ds.zarr"
    store = convert(src, dst, progress=False)
    expected = store.image("synct_001").compute()
    rw = Store.open(dst, mode="r+")
    rw.update_case_attrs("synct_001", complete=False)
    rw.group["cases/synct_001/image"][:] = 0
    stamp = (dst / "cases/synct_000/zarr.json").stat().st_mtime_ns
    assert Store.open(dst).incomplete_case_ids() == ["synct_001"]
    store = convert(src, dst, progress=False)
    assert store.case_ids() == ["synct_000", "synct_001", "synct_002"]
    np.testing.assert_array_equal(store.image("synct_001").compute(), expected)
    assert (dst / "cases/synct_000/zarr.json").stat().st_mtime_ns == stamp  # complete case untouched
    convert(src, dst, overwrite=True, progress=False)
    assert (dst / "cases/synct_000/zarr.json").stat().st_mtime_ns != stamp


def test_msd_4d_images_become_channels(tmp_path: Path, image_factory) -> None:
    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, 5, 8, 9)).astype(np.float32)
    img4 = sitk.JoinSeries([image_factory(vol[0]), image_factory(vol[1])])
    sitk.WriteImage(img4, str(root / "imagesTr" / "brain_001.nii.gz"))
    lab = (vol[0] > 0.5).astype(np.uint8)
    sitk.WriteImage(image_factory(lab), str(root / "labelsTr" / "brain_001.nii.gz"))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Task01",
                "modality": {"0": "FLAIR", "1": "T1w"},
                "labels": {"0": "background", "1": "tumour"},
                "training": [{"image": "./imagesTr/brain_001.nii.gz", "label": "./labelsTr/brain_001.nii.gz"}],
                "test": [],
            }
        )
    )
    store = convert(root, tmp_path / "ds.zarr", progress=False)
    assert detect_source(root) == "msd"
    assert store.meta.channel_names == ("FLAIR", "T1w")
    assert store.meta.labels == {"background": 0, "tumour": 1}
    np.testing.assert_array_equal(store.image("brain_001").compute(), vol)
    np.testing.assert_array_equal(store.label("brain_001").compute(), lab)
    assert store.geometry("brain_001").spacing_zyx == pytest.approx((2.5, 0.8, 0.7))


def test_image_label_folders_with_float_labels(tmp_path: Path, image_factory) -> None:
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir()
    rng = np.random.default_rng(1)
    for i, dtype in enumerate([np.float32, np.uint8]):
        img = (rng.uniform(0, 200, size=(4, 6, 7))).astype(dtype)
        lab = rng.integers(0, 3, size=(4, 6, 7)).astype(np.float32)  # float label file, integer values
        sitk.WriteImage(image_factory(img), str(tmp_path / f"src/images/case_{i}.nrrd"))
        sitk.WriteImage(image_factory(lab), str(tmp_path / f"src/labels/case_{i}.nrrd"))
    store = convert(tmp_path / "src", tmp_path / "ds.zarr", progress=False)
    assert store.meta.labels == {"background": 0, "label_1": 1, "label_2": 2}
    assert store.zarr_array("case_0", "image").dtype == np.float32
    assert store.zarr_array("case_1", "image").dtype == np.uint8
    assert store.label("case_1").dtype == np.uint8
    np.testing.assert_array_equal(store.label("case_0").compute(), _arr(tmp_path / "src/labels/case_0.nrrd"))


def test_single_file_tiff_stack_and_slice_folder(tmp_path: Path, image_factory) -> None:
    vol = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    sitk.WriteImage(image_factory(vol), str(tmp_path / "one.mha"))
    store = convert(tmp_path / "one.mha", tmp_path / "a.zarr", progress=False)
    assert store.case_ids() == ["one"]
    assert store.label("one") is None
    np.testing.assert_array_equal(store.image("one")[0].compute(), vol)

    tifffile.imwrite(tmp_path / "stack.tif", vol)
    store = convert(tmp_path / "stack.tif", tmp_path / "b.zarr", chunks_zyx=(2, 4, 4), progress=False)
    np.testing.assert_array_equal(store.image("stack")[0].compute(), vol)

    (tmp_path / "slices").mkdir()
    for z in range(vol.shape[0]):  # natural order: slice_2 before slice_10
        sitk.WriteImage(sitk.GetImageFromArray(vol[z]), str(tmp_path / "slices" / f"slice_{z * 4}.png"))
    store = convert(tmp_path / "slices", tmp_path / "c.zarr", progress=False)
    assert detect_source(tmp_path / "slices") == "image-folder"
    np.testing.assert_array_equal(store.image("slices")[0].compute(), vol)


def test_dicom_series_in_one_folder_are_told_apart_and_masks_pair(
    tmp_path: Path, dicom_writer, oblique_xyz: tuple[float, ...]
) -> None:
    rng = np.random.default_rng(2)
    t1 = rng.integers(0, 1000, size=(6, 10, 12)).astype(np.int16)
    t2 = rng.integers(0, 1000, size=(4, 9, 12)).astype(np.int16)
    mask = (t1 > 700).astype(np.int16)
    study = tmp_path / "dicom/patient/study"
    dicom_writer(study / "mixed", t1, series_uid="1.2.3.1", description="T1post", direction=oblique_xyz)
    dicom_writer(
        study / "mixed", t2, series_uid="1.2.3.2", description="T2", spacing_xyz=(0.9, 0.9, 4.0), start_index=100
    )
    dicom_writer(study / "seg", mask, series_uid="1.2.3.3", description="MaskTumor", direction=oblique_xyz)
    store = convert(tmp_path / "dicom", tmp_path / "ds.zarr", progress=False)
    assert store.meta.labels == {"background": 0, "foreground": 1}
    ids = store.case_ids()
    assert ids == ["patient_study_mixed_1.2.3.1", "patient_study_mixed_1.2.3.2"]  # same SeriesNumber: UIDs
    by_shape = {store.geometry(c).shape_zyx: c for c in ids}
    c1, c2 = by_shape[(6, 10, 12)], by_shape[(4, 9, 12)]
    np.testing.assert_array_equal(store.image(c1)[0].compute(), t1)
    np.testing.assert_array_equal(store.label(c1).compute(), mask)
    assert store.label(c2) is None
    assert store.geometry(c2).spacing_zyx == pytest.approx((4.0, 0.9, 0.9))
    assert np.allclose(store.geometry(c1).direction_zyx, np.asarray(oblique_xyz).reshape(3, 3)[::-1, ::-1], atol=1e-3)


def test_to_xarray_is_lazy(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="mr", n_cases=1, shape_zyx=(5, 8, 9))
    store = convert(src, tmp_path / "ds.zarr", progress=False)
    with raise_if_computes():
        xa = to_xarray(store, "synmr_000")
    assert xa.dims == ("c", "z", "y", "x")
    assert list(xa.c.values) == ["T1", "T2"]
    np.testing.assert_array_equal(xa.values, store.image("synmr_000").compute())


@pytest.mark.slow  # starts a 2-process LocalCluster (~5-10 s)
def test_convert_on_local_cluster_matches_threads(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="mr", n_cases=3, shape_zyx=(10, 20, 20))
    cluster = convert(
        src, tmp_path / "a.zarr", scheduler="local:2", chunks_zyx=(2, 8, 8), max_memory_bytes=5_000_000, progress=False
    )
    threads = convert(src, tmp_path / "b.zarr", progress=False)
    assert cluster.case_ids() == threads.case_ids()
    for cid in cluster.case_ids():
        np.testing.assert_array_equal(cluster.image(cid).compute(), threads.image(cid).compute())
        np.testing.assert_array_equal(cluster.label(cid).compute(), threads.label(cid).compute())


def test_test_images_folder_with_training_names(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="mr", n_cases=1, shape_zyx=(4, 6, 8), n_test_cases=2)
    assert detect_source(src / "imagesTs") == "image-folder"
    store = convert(
        src / "imagesTs",
        tmp_path / "ts.zarr",
        channel_names=("T1", "T2"),
        labels={"background": 0, "edema": 1, "tumor": 2},
        progress=False,
    )
    assert store.case_ids() == ["synmr_001", "synmr_002"]
    assert store.meta.channel_names == ("T1", "T2")
    assert store.image("synmr_002").shape == (2, 4, 6, 8)
    assert store.label("synmr_002") is None


def test_folder_of_2d_nnunet_cases_is_not_a_stack(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "raw", kind="2d", n_cases=1, shape_zyx=(1, 10, 12), n_test_cases=2)
    store = convert(src / "imagesTs", tmp_path / "ts.zarr", progress=False)
    assert store.case_ids() == ["syn2d_001", "syn2d_002"]
    assert store.geometry("syn2d_001").is_2d
    assert store.image("syn2d_001").shape == (1, 1, 10, 12)
