"""DICOM SEG out/in and modality-named channels on small synthetic DICOM series (no shared data).

Errors that must name what is wrong: a SEG export of a case not converted from DICOM; a SEG that
references no series of the tree, or another frame of reference; overlapping segments (unless the
dataset declares regions, which then round-trip). Channel names: DICOM Modality, ``--channel-names``
for NIfTI sources, and the fingerprint's warning for a generically named channel that looks like CT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import ConversionError, VoxflowWarning
from voxflow.fingerprint import compute_fingerprint
from voxflow.io import convert, dicom_reference, export_store, write_dicom_seg
from voxflow.store import Store

REGIONS = {"background": 0, "whole": [1, 2], "core": [2]}


def _volume() -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.mgrid[:6, :12, :10]
    image = (100 * z + y + x).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[1:5, 2:9, 2:8] = 1
    label[2:4, 4:7, 3:6] = 2
    return image, label


@pytest.fixture
def mr_tree(
    tmp_path: Path, dicom_writer: Callable[..., list[Path]], oblique_xyz: tuple[float, ...]
) -> tuple[Path, Store, np.ndarray]:
    """A tree with one oblique MR series, converted; and the label to put in SEGs."""
    image, label = _volume()
    dicom_writer(tmp_path / "tree" / "study" / "t1", image, series_uid="1.2.826.0.1.7", direction=oblique_xyz)
    store = convert(tmp_path / "tree", tmp_path / "plain.zarr", progress=False)
    return tmp_path / "tree", store, label


def _write_seg(store: Store, label: np.ndarray, path: Path, labels: dict, **kw: object) -> Path:
    (cid,) = store.case_ids()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom_seg(
        label, store.geometry(cid), dicom_reference(store.case_attrs(cid)), path, labels=labels, case_id=cid, **kw
    )


def test_dicom_modality_names_the_channel_and_conversion_records_the_uids(mr_tree) -> None:
    _, store, _ = mr_tree
    assert store.meta.channel_names == ("MR",)
    (cid,) = store.case_ids()
    ref = dicom_reference(store.case_attrs(cid))
    assert ref["series"]["SeriesInstanceUID"] == "1.2.826.0.1.7"
    assert ref["study"]["StudyInstanceUID"] == "1.2.3.4"
    assert ref["sop_instance_uids"] == [f"1.2.826.0.1.7.{k + 1}" for k in range(6)]  # in z order
    assert len(ref["image_positions"]) == 6


def test_seg_round_trip_through_convert(mr_tree, tmp_path: Path) -> None:
    tree, store, label = mr_tree
    _write_seg(
        store, label, tree / "study" / "seg" / "seg.dcm", {"background": 0, "edge": 1, "core": 2}, model_name="m"
    )
    back = convert(tree, tmp_path / "back.zarr", progress=False)
    (cid,) = back.case_ids()
    assert back.meta.labels == {"background": 0, "edge": 1, "core": 2}  # segment labels name the classes
    np.testing.assert_array_equal(back.label(cid).compute(), label)
    back.geometry(cid).check_matches(store.geometry(cid))


def test_seg_export_of_a_case_not_from_dicom_names_the_case(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    store = convert(tmp_path / "scan.nii.gz", tmp_path / "s.zarr", progress=False)
    with pytest.raises(ConversionError, match=r"case 'scan'.*no DICOM source record"):
        export_store(store, tmp_path / "out", array="image", file_ending=".dcm", progress=False)
    res = CliRunner().invoke(
        main, ["export", str(store.path), str(tmp_path / "out"), "--array", "image", "--file-ending", ".dcm"]
    )
    assert res.exit_code != 0
    assert "DICOM SEG" in res.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def _prediction_like(store: Store, label: np.ndarray, path: Path, attrs: dict) -> Store:
    (cid,) = store.case_ids()
    meta = dataclasses.replace(store.meta, labels={"background": 0, "a": 1, "b": 2}, kind="prediction")
    out = Store.create(path, meta)
    out.begin_case(cid, geometry=store.geometry(cid), attrs=attrs)
    out.create_array(cid, "label", shape=label.shape, dtype=np.uint8, chunks=label.shape)[...] = label
    out.mark_complete(cid)
    return out


def test_seg_export_of_a_prediction_store(mr_tree, tmp_path: Path) -> None:
    """A prediction store records its input case's provenance as ``input`` (with the DICOM record);
    one that does not needs ``dicom_reference``."""
    _, store, label = mr_tree
    (cid,) = store.case_ids()
    pred = _prediction_like(
        store,
        label,
        tmp_path / "pred.zarr",
        {"input": store.case_attrs(cid)["provenance"], "configurations": ["3d_fullres"]},
    )
    (path,) = export_store(pred, tmp_path / "out", file_ending=".dcm", progress=False)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.7"
    assert ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "3d_fullres"

    bare = _prediction_like(store, label, tmp_path / "bare.zarr", {})
    with pytest.raises(ConversionError, match="--dicom-reference"):
        export_store(bare, tmp_path / "out2", file_ending=".dcm", progress=False)
    (path,) = export_store(bare, tmp_path / "out2", file_ending=".dcm", progress=False, dicom_reference=store.path)
    assert pydicom.dcmread(path).Modality == "SEG"


def test_seg_referencing_no_series_of_the_tree_is_an_error(mr_tree) -> None:
    tree, store, label = mr_tree
    seg = _write_seg(store, label, tree / "study" / "seg" / "seg.dcm", {"background": 0, "a": 1, "b": 2})
    ds = pydicom.dcmread(seg)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.999"
    ds.save_as(seg)
    with pytest.raises(ConversionError, match=r"seg\.dcm.*references series \['1\.2\.999'\] and none is in the tree"):
        convert(tree, tree.parent / "x.zarr", progress=False)


def test_seg_with_another_frame_of_reference_is_an_error(mr_tree) -> None:
    tree, store, label = mr_tree
    seg = _write_seg(store, label, tree / "study" / "seg" / "seg.dcm", {"background": 0, "a": 1, "b": 2})
    ds = pydicom.dcmread(seg)
    ds.FrameOfReferenceUID = "1.2.888"
    ds.save_as(seg)
    with pytest.raises(ConversionError, match=r"FrameOfReferenceUID.*'1\.2\.888'"):
        convert(tree, tree.parent / "x.zarr", progress=False)


def test_overlapping_segments_are_an_error_unless_regions_are_declared(mr_tree, tmp_path: Path) -> None:
    tree, store, label = mr_tree
    seg = _write_seg(store, label, tree / "study" / "seg" / "seg.dcm", REGIONS, regions_class_order=(1, 2))
    assert pydicom.dcmread(seg).SegmentsOverlap == "YES"  # region "whole" contains "core"
    with pytest.raises(
        ConversionError, match=r"segments 1 \('whole'\) and 2 \('core'\) share \d+ voxel\(s\) on slice \d"
    ):
        convert(tree, tmp_path / "x.zarr", progress=False)
    back = convert(
        tree, tmp_path / "regions.zarr", progress=False, labels=REGIONS, regions_class_order=(1, 2), overwrite=True
    )
    (cid,) = back.case_ids()
    np.testing.assert_array_equal(back.label(cid).compute(), label)


def test_seg_needs_consecutive_label_values(mr_tree, tmp_path: Path) -> None:
    _, store, label = mr_tree
    with pytest.raises(ConversionError, match=r"without gaps.*\[1, 3\]"):
        _write_seg(store, np.where(label == 2, 3, label), tmp_path / "s.dcm", {"background": 0, "a": 1, "c": 3})


# ---------------------------------------------------------------------- channel names
def _ct_nifti(folder: Path) -> Path:
    folder.mkdir(parents=True)
    z, y, x = np.mgrid[:8, :16, :16]
    hu = np.where((y - 8) ** 2 + (x - 8) ** 2 < 30, 40 + 10 * z, -1024).astype(np.int16)
    hu[:, 7:9, 7:9] = 1200  # bone
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(folder / "body.nii.gz"))
    return folder / "body.nii.gz"


def test_channel_names_option_and_ct_warning(tmp_path: Path) -> None:
    src = _ct_nifti(tmp_path / "ct")
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "named.zarr"), "--channel-names", "CT"])
    assert res.exit_code == 0, res.output
    named = Store.open(tmp_path / "named.zarr")
    assert named.meta.channel_names == ("CT",)
    compute_fingerprint(named, progress=False)  # no warning: it is named CT

    plain = convert(src, tmp_path / "plain.zarr", progress=False)
    assert plain.meta.channel_names == ("image",)
    with pytest.warns(VoxflowWarning, match=r"channel 0 is named 'image' but looks like CT.*--channel-names CT"):
        compute_fingerprint(plain, progress=False)

    bad = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "bad.zarr"), "--channel-names", "CT,"])
    assert bad.exit_code != 0
    assert "--channel-names" in bad.output


def test_mr_like_generic_channel_does_not_warn(tmp_path: Path) -> None:
    img = (np.arange(8 * 16 * 16).reshape(8, 16, 16) % 900).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "mr.nii.gz"))
    compute_fingerprint(convert(tmp_path / "mr.nii.gz", tmp_path / "s.zarr", progress=False), progress=False)
