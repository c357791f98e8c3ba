from __future__ import annotations

import math
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk

from voxflow.evaluate import evaluate, open_segmentations
from voxflow.geometry import Geometry
from voxflow.postprocess import label_components
from voxflow.store import DatasetMeta, Store

CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004")  # 003 is stored as float32


def test_real_labels_against_themselves_and_eroded(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "hippocampus-dev" / "labels"
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for cid in CASES:
        shutil.copy(src / f"{cid}.nii.gz", tmp_path / "gt" / f"{cid}.nii.gz")
        img = sitk.ReadImage(str(src / f"{cid}.nii.gz"))
        arr = sitk.GetArrayFromImage(img).astype(np.uint8)
        eroded = np.where(ndi.binary_erosion(arr == 1), 1, np.where(arr == 1, 0, arr)).astype(np.uint8)
        out = sitk.GetImageFromArray(eroded)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(tmp_path / "pred" / f"{cid}.nii.gz"))
    same = evaluate(tmp_path / "gt", tmp_path / "gt", labels=[1, 2, "1+2"])
    for key in ("1", "2", "1+2"):
        assert same.mean[key]["dice"] == 1.0
        assert same.mean[key]["hd95_mm"] == 0.0
        assert same.mean[key]["nsd"] == 1.0
    eroded = evaluate(tmp_path / "pred", tmp_path / "gt", labels=[1, 2])
    assert eroded.mean["2"]["dice"] == 1.0
    assert 0.3 < eroded.mean["1"]["dice"] < 1.0
    assert eroded.mean["1"]["hd95_mm"] == pytest.approx(1.0, abs=0.5)  # 1 mm isotropic, one erosion


def test_real_label_components_match_scipy(shared_data: Path) -> None:
    segs = open_segmentations(shared_data / "hippocampus-dev" / "labels", chunks=(7, 11, 9))
    for cid in CASES:
        arr = segs[cid].array
        for conn in (1, 3):
            lab, n = label_components(arr == 1, connectivity=conn)
            ref, n_ref = ndi.label(arr.compute() == 1, ndi.generate_binary_structure(3, conn))
            assert n == n_ref
            np.testing.assert_array_equal(
                np.sort(np.bincount(lab.compute().ravel())[1:]), np.sort(np.bincount(ref.ravel())[1:])
            )


def test_2d_images_and_declared_regions_in_a_store(tmp_path: Path) -> None:
    meta = DatasetMeta(
        channel_names=("T2",), labels={"background": 0, "a": 1, "b": 2, "whole": (1, 2)}, kind="prediction"
    )
    geom = Geometry(shape_zyx=(1, 30, 40), spacing_zyx=(1.0, 0.5, 0.25), source_ndim=2)
    ref = np.zeros((1, 30, 40), np.uint8)
    ref[0, 5:20, 10:30] = 1
    ref[0, 8:12, 15:20] = 2
    pred = np.roll(ref, 2, axis=1)  # 2 rows = 1.0 mm in y
    stores = {}
    for name, arr in (("p", pred), ("g", ref)):
        st = Store.create(tmp_path / f"{name}.zarr", meta)
        st.begin_case("img", geometry=geom)
        st.create_array("img", "label", shape=arr.shape, dtype=np.uint8, chunks=(1, 7, 9))[...] = arr
        st.mark_complete("img")
        stores[name] = st
    summary = evaluate(stores["p"], stores["g"])
    assert summary.labels == ("1", "2", "1+2")
    m = summary.metric_per_case[0].metrics["1+2"]
    assert m["hd_mm"] == pytest.approx(1.0)  # distances in-plane: a 2D image has no z neighbours
    assert m["volume_ref_mm3"] == pytest.approx((ref > 0).sum() * 0.125)
    assert not math.isnan(m["nsd"])
    lab, n = label_components(da.from_array(ref[0] > 0, chunks=(7, 9)), connectivity=2)
    assert n == 1
