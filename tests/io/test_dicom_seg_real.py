"""DICOM SEG out and in on the real series in ../shared/data (skipped when absent): the oblique TCIA
MR with its mask series, and the JPEG-2000 CT whose files lack Study/Series/SOP Instance UIDs.

* out: ``voxflow export --file-ending .dcm`` writes a SEG that ``dciodvfy`` (dicom3tools; skipped
  when not installed) reports no error for, that references the source series slice by slice, and
  whose voxels, read back with highdicom onto the NIfTI export's grid, equal the NIfTI export;
* in: SEGs written from the TCIA mask labels, put beside the image series instead of the masks,
  convert to the same labels the mask series give;
* modality: the CT converts with channel ``CT`` and plans CT normalisation with the dataset's
  foreground percentiles.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import VoxflowWarning
from voxflow.io import convert, dicom_reference, write_dicom_seg
from voxflow.store import Store

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
CT_LABELS = {"background": 0, "bone": 1, "soft_tissue": 2}


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's report lines for ``path`` (skips the test when dicom3tools is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]


def assert_valid(path: Path) -> list[str]:
    report = dciodvfy(path)
    errors = [line for line in report if line.startswith("Error")]
    assert not errors, "\n".join(report)
    return [line for line in report if line.startswith("Warning")]


def seg_on_nifti_grid(seg_path: Path, nifti_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(SEG voxels resampled by highdicom onto the NIfTI's grid, NIfTI voxels), both (z, y, x)."""
    import highdicom as hd

    img = sitk.ReadImage(str(nifti_path))
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    sp = img.GetSpacing()
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = d[:, 2] * sp[2], d[:, 1] * sp[1], d[:, 0] * sp[0]
    affine[:3, 3] = img.GetOrigin()
    arr = sitk.GetArrayFromImage(img)
    grid = hd.VolumeGeometry(affine, arr.shape, coordinate_system="PATIENT")
    vol = hd.seg.segread(str(seg_path)).get_volume(combine_segments=True, relabel=False)
    return np.asarray(vol.match_geometry(grid).array), arr


def export(store: Path, out: Path, ending: str, *extra: str) -> None:
    res = CliRunner().invoke(main, ["export", str(store), str(out), "--file-ending", ending, *extra])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mr_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return convert(SHARED / "dicom-mr-tcia", tmp_path_factory.mktemp("mr") / "mr.zarr", progress=False)


@pytest.fixture(scope="module")
def ct_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The CT series plus a SEG of a threshold label (bone > 200 HU, soft tissue > -300 HU)."""
    root = tmp_path_factory.mktemp("ct")
    store = convert(SHARED / "dicom-ct-j2k", root / "plain.zarr", progress=False)
    (cid,) = store.case_ids()
    hu = store.image(cid)[0].compute()
    label = np.where(hu > 200, 1, np.where(hu > -300, 2, 0)).astype(np.uint8)
    tree = root / "tree"
    shutil.copytree(SHARED / "dicom-ct-j2k", tree)
    with pytest.warns(VoxflowWarning, match="StudyInstanceUID, SeriesInstanceUID"):  # the files have none
        write_dicom_seg(
            label,
            store.geometry(cid),
            dicom_reference(store.case_attrs(cid)),
            tree / "seg.dcm",
            labels=CT_LABELS,
            case_id=cid,
            model_name="threshold",
        )
    return tree, label


@pytest.fixture(scope="module")
def ct_store(ct_tree: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Store:
    return convert(ct_tree[0], tmp_path_factory.mktemp("ctseg") / "ct.zarr", progress=False)


# ---------------------------------------------------------------------- SEG out
def test_seg_of_oblique_mr_is_valid_references_its_series_and_equals_nifti(mr_store: Store, tmp_path: Path) -> None:
    import highdicom as hd

    export(mr_store.path, tmp_path / "nii", ".nii.gz")
    export(mr_store.path, tmp_path / "seg", ".dcm", "--model-name", "tumour-model")
    labelled = [c for c in mr_store.case_ids() if mr_store.label(c) is not None]
    assert sorted(p.stem for p in (tmp_path / "seg").iterdir()) == sorted(labelled)
    for cid in labelled:
        seg_path = tmp_path / "seg" / f"{cid}.dcm"
        assert_valid(seg_path)
        seg_voxels, nifti = seg_on_nifti_grid(seg_path, tmp_path / "nii" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(seg_voxels, nifti)
        assert nifti.any()

        ref = dicom_reference(mr_store.case_attrs(cid))
        seg = hd.seg.segread(str(seg_path))
        assert seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == ref["study"]["StudyInstanceUID"]
        assert seg.FrameOfReferenceUID == ref["series"]["FrameOfReferenceUID"]
        (series,) = seg.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == ref["series"]["SeriesInstanceUID"]
        assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == ref["sop_instance_uids"]
        position_of = dict(zip(ref["sop_instance_uids"], ref["image_positions"], strict=True))
        frames = seg.PerFrameFunctionalGroupsSequence
        assert len(frames) == len(position_of)  # every slice, empty ones included
        for f in frames:  # each frame refers to the source slice at its own position
            uid = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            np.testing.assert_allclose(
                [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], position_of[uid], atol=1e-4
            )
        iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        np.testing.assert_allclose([float(v) for v in iop], ref["image_orientation"], atol=1e-6)
        assert not np.allclose([float(v) for v in iop], [1, 0, 0, 0, 1, 0], atol=1e-3)  # oblique
        (segment,) = seg.SegmentSequence
        assert (segment.SegmentNumber, segment.SegmentLabel) == (1, "foreground")
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmSource) == ("tumour-model", "voxflow")
        assert algo.AlgorithmVersion == __import__("voxflow").__version__


def test_seg_of_jpeg2000_ct_is_valid_and_equals_nifti(ct_store: Store, tmp_path: Path) -> None:
    import highdicom as hd

    export(ct_store.path, tmp_path / "nii", ".nii.gz")
    with pytest.warns(VoxflowWarning, match="anonymised without UIDs"):
        export(ct_store.path, tmp_path / "seg", ".dcm")
    (cid,) = ct_store.case_ids()
    seg_path = tmp_path / "seg" / f"{cid}.dcm"
    assert_valid(seg_path)
    seg_voxels, nifti = seg_on_nifti_grid(seg_path, tmp_path / "nii" / f"{cid}.nii.gz")
    np.testing.assert_array_equal(seg_voxels, nifti)
    assert set(np.unique(nifti)) == {0, 1, 2}
    seg = hd.seg.segread(str(seg_path))
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "bone"), (2, "soft_tissue")]
    ref = dicom_reference(ct_store.case_attrs(cid))
    # the files have empty SOPInstanceUIDs: the file meta's (distinct per slice) are referenced instead
    assert len(set(ref["sop_instance_uids"])) == 20
    assert seg.FrameOfReferenceUID == ref["series"]["FrameOfReferenceUID"]


# ---------------------------------------------------------------------- SEG in
def test_segs_from_tcia_masks_convert_back_to_the_mask_labels(mr_store: Store, tmp_path: Path) -> None:
    export(mr_store.path, tmp_path / "segs", ".dcm")
    tree = tmp_path / "tree"
    for cid in mr_store.case_ids():  # image series copied; each mask series replaced by its SEG
        image_dir = Path(mr_store.case_attrs(cid)["provenance"]["image"][0]).parent
        rel = image_dir.relative_to(SHARED / "dicom-mr-tcia")
        shutil.copytree(image_dir, tree / rel)
        if (tmp_path / "segs" / f"{cid}.dcm").exists():
            (tree / rel.parent / "SEG").mkdir()
            shutil.copy(tmp_path / "segs" / f"{cid}.dcm", tree / rel.parent / "SEG" / "1-1.dcm")
    back = convert(tree, tmp_path / "back.zarr", progress=False)
    assert back.case_ids() == mr_store.case_ids()
    assert back.meta.labels == mr_store.meta.labels == {"background": 0, "foreground": 1}
    assert back.meta.channel_names == ("MR",)
    for cid in mr_store.case_ids():
        want = mr_store.label(cid)
        got = back.label(cid)
        assert (want is None) == (got is None)
        if want is not None:
            np.testing.assert_array_equal(got.compute(), want.compute())
            assert Path(back.case_attrs(cid)["provenance"]["label"][0]).name == "1-1.dcm"


def test_seg_of_ct_without_uids_converts_back(ct_tree: tuple[Path, np.ndarray], ct_store: Store) -> None:
    (cid,) = ct_store.case_ids()
    np.testing.assert_array_equal(ct_store.label(cid).compute(), ct_tree[1])
    assert ct_store.meta.labels == CT_LABELS


# ---------------------------------------------------------------------- modality -> configuration
def test_ct_series_plans_ct_normalisation_with_foreground_percentiles(ct_store: Store) -> None:
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.plan import plan_experiment

    assert ct_store.meta.channel_names == ("CT",)  # from the DICOM Modality
    fp = compute_fingerprint(ct_store, progress=False)
    (stats,) = fp.intensity
    assert stats.n_samples > 0
    plan = plan_experiment(fp)
    for cfg in plan.configurations.values():
        (norm,) = cfg.normalization
        assert norm.scheme == "ct"
        assert (norm.lower, norm.upper) == (stats.percentile_00_5, stats.percentile_99_5)
        assert (norm.mean, norm.std) == (stats.mean, stats.std)
