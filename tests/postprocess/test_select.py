from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.geometry import Geometry
from voxflow.postprocess import Operation, PostprocessingSpec, determine_postprocessing, run_postprocess
from voxflow.store import DatasetMeta, Store


def save(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(path))


def ball(shape: tuple[int, int, int], centre: tuple[int, int, int], r: float) -> np.ndarray:
    g = np.indices(shape)
    return ((g - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= r * r


def write_cases(root: Path, preds: list[np.ndarray], refs: list[np.ndarray]) -> tuple[Path, Path]:
    (root / "pred").mkdir(parents=True)
    (root / "gt").mkdir()
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        save(root / "pred" / f"c{i}.nii.gz", p)
        save(root / "gt" / f"c{i}.nii.gz", r)
    return root / "pred", root / "gt"


SHAPE = (12, 20, 20)


def organ(i: int) -> np.ndarray:
    return ball(SHAPE, (6, 9 + i % 2, 10), 5).astype(np.uint8)


def test_keep_largest_kept_when_it_helps(tmp_path: Path) -> None:
    refs = [organ(i) for i in range(3)]
    preds = [r.copy() for r in refs]
    for p in preds:
        p[0:2, 0:2, 17:20] = 1  # a spurious blob far from the organ
    pred_dir, gt_dir = write_cases(tmp_path, preds, refs)
    spec = determine_postprocessing(pred_dir, gt_dir, labels=[1], output=tmp_path / "pp.json")
    assert Operation(op="keep_largest", target=1) in spec.operations
    assert Operation(op="fill_holes", target=1) not in spec.operations  # nothing to fill: no gain
    saved = json.loads((tmp_path / "pp.json").read_text())
    assert saved["selection"]["trials"][0]["dice_after"] > saved["selection"]["trials"][0]["dice_before"]


def test_keep_largest_dropped_when_it_hurts(tmp_path: Path) -> None:
    refs = []
    for i in range(3):
        r = organ(i)
        r[0:3, 0:3, 15:19] = 1  # the reference itself has a second component
        refs.append(r)
    preds = [r.copy() for r in refs]
    for p in preds:
        p[6, 9:11, 5] = 0  # small error elsewhere so Dice < 1
    pred_dir, gt_dir = write_cases(tmp_path, preds, refs)
    spec = determine_postprocessing(pred_dir, gt_dir, labels=[1])
    assert spec.operations == ()
    trial = spec.selection["trials"][0]
    assert trial["operation"]["op"] == "keep_largest"
    assert trial["kept"] is False


def test_fill_holes_kept_or_dropped_by_its_effect(tmp_path: Path) -> None:
    solid = [organ(i) for i in range(2)]
    holed = []
    for s in solid:
        h = s.copy()
        h[5:8, 8:11, 9:12] = 0
        holed.append(h)
    pred_dir, gt_dir = write_cases(tmp_path / "helps", holed, solid)
    assert Operation(op="fill_holes", target=1) in determine_postprocessing(pred_dir, gt_dir, labels=[1]).operations
    pred_dir, gt_dir = write_cases(tmp_path / "hurts", holed, holed)  # the references are hollow too
    assert determine_postprocessing(pred_dir, gt_dir, labels=[1]).operations == ()


def test_foreground_step_with_two_classes(tmp_path: Path) -> None:
    refs = []
    for i in range(2):
        r = organ(i)
        r[6, 9, 10] = 2
        refs.append(r)
    preds = [r.copy() for r in refs]
    for p in preds:
        p[0, 0, 19] = 2
        p[11, 19, 0] = 1
    pred_dir, gt_dir = write_cases(tmp_path, preds, refs)
    spec = determine_postprocessing(pred_dir, gt_dir, labels=[1, 2])
    assert spec.operations[0] == Operation(op="keep_largest", target="foreground")
    assert spec.selection["final_dice"]["2"] == pytest.approx(1.0)


def test_run_postprocess_store_folder_and_cli(tmp_path: Path) -> None:
    lab = organ(0)
    lab[0:2, 0:2, 17:20] = 1
    geom = Geometry(shape_zyx=SHAPE, spacing_zyx=(2.0, 0.8, 0.8))
    meta = DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1}, kind="prediction")
    src = Store.create(tmp_path / "pred.zarr", meta)
    src.begin_case("c0", geometry=geom, attrs={"provenance": {"file": "x"}})
    src.create_array("c0", "label", shape=SHAPE, dtype=np.uint8, chunks=(5, 7, 6))[...] = lab
    src.mark_complete("c0")
    spec = PostprocessingSpec(operations=(Operation(op="keep_largest", target=1),))
    run_postprocess(src, tmp_path / "pp.zarr", spec, progress=False)
    out = Store.open(tmp_path / "pp.zarr")
    assert out.case_ids() == ["c0"]
    np.testing.assert_array_equal(out.label("c0").compute(), organ(0))
    assert out.case_attrs("c0")["postprocessing"]["operations"] == [{"op": "keep_largest", "target": 1}]
    assert out.case_attrs("c0")["provenance"] == {"file": "x"}

    (tmp_path / "files").mkdir()
    save(tmp_path / "files" / "c0.nii.gz", lab)
    spec.save(tmp_path / "model" / "postprocessing.json")
    res = CliRunner().invoke(
        main,
        ["postprocess", str(tmp_path / "files"), str(tmp_path / "files_pp"), "--model-dir", str(tmp_path / "model")],
    )
    assert res.exit_code == 0, res.output
    img = sitk.ReadImage(str(tmp_path / "files_pp" / "c0.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), organ(0))
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 2.0))
    assert not list((tmp_path / "files_pp").glob(".*"))
    res = CliRunner().invoke(
        main,
        ["postprocess", str(tmp_path / "files"), str(tmp_path / "files_pp"), "--model-dir", str(tmp_path / "model")],
    )
    assert res.exit_code != 0
    assert "--overwrite" in res.output


def _store_with(path: Path, kind: str, labels: dict[str, np.ndarray]) -> None:
    meta = DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1}, kind=kind)
    st = Store.create(path, meta)
    for cid, lab in labels.items():
        st.begin_case(cid, geometry=Geometry(shape_zyx=SHAPE, spacing_zyx=(2.0, 0.8, 0.8)))
        st.create_array(cid, "label", shape=SHAPE, dtype=np.uint8, chunks=(6, 8, 7))[...] = lab
        st.mark_complete(cid)


def test_determine_for_configuration_reads_every_fold(tmp_path: Path) -> None:
    from voxflow.errors import IncompleteStoreError
    from voxflow.postprocess import determine_for_configuration, load_model_postprocessing
    from voxflow.workspace import Workspace

    work = Workspace(tmp_path / "work")
    refs = {f"c{i}": organ(i) for i in range(4)}
    _store_with(work.dataset_store, "dataset", refs)
    for fold, ids in enumerate((("c0", "c1"), ("c2", "c3"))):
        preds = {}
        for cid in ids:
            p = refs[cid].copy()
            p[0:2, 0:2, 17:20] = 1
            preds[cid] = p
        _store_with(work.run_dir("3d_fullres", fold) / "validation" / "prediction.zarr", "prediction", preds)
    assert load_model_postprocessing(work.configuration_dir("3d_fullres")) is None
    spec = determine_for_configuration(work, "3d_fullres")
    assert spec.selection["n_cases"] == 4
    assert load_model_postprocessing(work.configuration_dir("3d_fullres")) == spec
    assert Operation(op="keep_largest", target=1) in spec.operations
    with pytest.raises(IncompleteStoreError, match="fold_7"):
        determine_for_configuration(work, "3d_fullres", folds=[0, 7])


def test_cli_determine_then_apply(tmp_path: Path) -> None:
    refs = [organ(i) for i in range(2)]
    preds = [r.copy() for r in refs]
    for p in preds:
        p[0:2, 0:2, 17:20] = 1
    pred_dir, gt_dir = write_cases(tmp_path, preds, refs)
    res = CliRunner().invoke(
        main,
        [
            "postprocess",
            str(pred_dir),
            str(tmp_path / "out"),
            "--determine-with",
            str(gt_dir),
            "-p",
            str(tmp_path / "pp.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "keep_largest 1" in res.output
    assert PostprocessingSpec.load(tmp_path / "pp.json").operations == (Operation(op="keep_largest", target=1),)
    for i, r in enumerate(refs):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"c{i}.nii.gz"))), r)
    res = CliRunner().invoke(main, ["postprocess", str(pred_dir), str(tmp_path / "out2")])
    assert res.exit_code != 0
    assert "--postprocessing" in res.output
