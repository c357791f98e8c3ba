from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import CaseNotFoundError, EvaluationError, GeometryMismatchError
from voxflow.evaluate import EvaluationSummary, evaluate, format_table
from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store

SPACING_ZYX = (3.0, 0.7, 0.9)


def write_label(path: Path, arr: np.ndarray, spacing_zyx: tuple[float, ...] = SPACING_ZYX) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin((1.0, -2.0, 3.0))
    sitk.WriteImage(img, str(path))


def make_cases(rng: np.random.Generator, n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    preds, refs = [], []
    for i in range(n):
        ref = np.zeros((8, 20, 22), np.uint8)
        ref[2:6, 4:14, 5:15] = 1
        ref[3:5, 6:9, 7:10] = 2
        pred = np.roll(ref, i + 1, axis=2)
        pred[(rng.random(pred.shape) < 0.01)] = 1
        if i == 2:  # class 2 absent from prediction and reference: Dice NaN, excluded from means
            ref[ref == 2] = 1
            pred[pred == 2] = 1
        preds.append(pred)
        refs.append(ref)
    return preds, refs


@pytest.fixture
def folders(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, list[np.ndarray], list[np.ndarray]]:
    preds, refs = make_cases(rng)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        write_label(tmp_path / "pred" / f"case_{i}.nii.gz", p)
        write_label(tmp_path / "gt" / f"case_{i}.nii.gz", r)
    return tmp_path / "pred", tmp_path / "gt", preds, refs


def dice(p: np.ndarray, r: np.ndarray) -> float:
    s = p.sum() + r.sum()
    return float(2 * (p & r).sum() / s) if s else math.nan


def test_evaluate_folders_with_regions(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, preds, refs = folders
    out = tmp_path / "summary.json"
    summary = evaluate(pred_dir, gt_dir, labels=[1, 2, "1+2"], output=out, tolerance_mm=1.0)
    assert summary.labels == ("1", "2", "1+2")
    per_case = summary.metric_per_case
    assert [c.case_id for c in per_case] == ["case_0", "case_1", "case_2"]
    for c, p, r in zip(per_case, preds, refs, strict=True):
        assert c.metrics["1"]["dice"] == pytest.approx(dice(p == 1, r == 1))
        assert c.metrics["1+2"]["dice"] == pytest.approx(dice(p > 0, r > 0))
        assert c.metrics["1"]["volume_ref_mm3"] == pytest.approx((r == 1).sum() * np.prod(SPACING_ZYX))
    assert math.isnan(per_case[2].metrics["2"]["dice"])
    assert summary.mean["2"]["dice"] == pytest.approx(
        np.mean([dice(p == 2, r == 2) for p, r in zip(preds[:2], refs[:2], strict=True)])
    )
    assert summary.mean["2"]["n_cases_scored"] == 2
    fg = np.mean([summary.mean[k]["dice"] for k in ("1", "2", "1+2")])
    assert summary.foreground_mean["dice"] == pytest.approx(fg)
    on_disk = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert on_disk["metric_per_case"][2]["metrics"]["2"]["dice"] is None
    assert on_disk["metric_per_case"][0]["metrics"]["1"]["hd95_mm"] > 0
    table = format_table(summary)
    assert "1+2" in table
    assert "dice" in table


def test_default_labels_come_from_dataset_json_or_values_present(folders) -> None:
    pred_dir, gt_dir, _, _ = folders
    assert evaluate(pred_dir, gt_dir, surface=False).labels == ("1", "2")
    (gt_dir / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}}))
    assert evaluate(pred_dir, gt_dir, surface=False).labels == ("1",)


def test_geometry_mismatch_and_missing_reference(folders) -> None:
    pred_dir, gt_dir, preds, _ = folders
    write_label(pred_dir / "case_1.nii.gz", preds[1], spacing_zyx=(2.0, 0.7, 0.9))
    with pytest.raises(GeometryMismatchError, match=r"case 'case_1'.*case_1\.nii\.gz"):
        evaluate(pred_dir, gt_dir, labels=[1])
    write_label(pred_dir / "case_1.nii.gz", preds[1])
    write_label(pred_dir / "extra.nii.gz", preds[1])
    with pytest.raises(CaseNotFoundError, match="extra"):
        evaluate(pred_dir, gt_dir, labels=[1])


def test_stores_as_inputs(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, preds, refs = folders
    geom = Geometry(shape_zyx=preds[0].shape, spacing_zyx=SPACING_ZYX, origin_zyx=(3.0, -2.0, 1.0))
    meta = DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2}, kind="prediction")
    store = Store.create(tmp_path / "pred.zarr", meta)
    for i, p in enumerate(preds):
        store.begin_case(f"case_{i}", geometry=geom)
        store.create_array(f"case_{i}", "label", shape=p.shape, dtype=np.uint8, chunks=(3, 7, 9))[...] = p
        store.mark_complete(f"case_{i}")
    from_store = evaluate(tmp_path / "pred.zarr", gt_dir, labels=[1, 2])
    from_files = evaluate(pred_dir, gt_dir, labels=[1, 2])
    for a, b in zip(from_store.metric_per_case, from_files.metric_per_case, strict=True):
        assert a.metrics["1"] == pytest.approx(b.metrics["1"], nan_ok=True)


def test_cli_evaluate(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, _, _ = folders
    out = tmp_path / "cli_summary.json"
    res = CliRunner().invoke(main, ["evaluate", str(pred_dir), str(gt_dir), "--labels", "1,1+2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "1+2" in res.output
    assert json.loads(out.read_text())["labels"] == ["1", "1+2"]
    res = CliRunner().invoke(main, ["evaluate", str(pred_dir), str(gt_dir), "--labels", "x", "-o", str(out)])
    assert res.exit_code != 0
    assert "a label must be an integer" in res.output


def test_summary_is_typed_and_round_trips_through_summary_json(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, preds, refs = folders
    out = tmp_path / "summary.json"
    summary = evaluate(pred_dir, gt_dir, labels=[1, 2], output=out, surface=False)
    assert isinstance(summary, EvaluationSummary)
    on_disk = json.loads(out.read_text())
    assert list(on_disk) == ["labels", "tolerance_mm", "conventions", "metric_per_case", "mean", "foreground_mean"]
    assert list(on_disk["metric_per_case"][0]) == ["case_id", "prediction", "reference", "metrics"]
    loaded = EvaluationSummary.load(out)
    assert json.dumps(loaded.to_dict()) == json.dumps(summary.to_dict())  # NaN (null on disk) read back as NaN
    assert math.isnan(loaded.metric_per_case[2].metrics["2"]["dice"])
    assert isinstance(loaded.mean["1"]["n_cases_scored"], int)
    expected = []
    for p, r in zip(preds, refs, strict=True):
        d = [x for x in (dice(p == 1, r == 1), dice(p == 2, r == 2)) if not math.isnan(x)]
        if d:
            expected.append(np.mean(d))
    assert loaded.case_dice() == pytest.approx(expected)
    assert loaded.dice == pytest.approx(summary.foreground_mean["dice"])
    on_disk["metric_per_case"][0]["metrics"]["1"]["dice"] = "high"
    out.write_text(json.dumps(on_disk))
    with pytest.raises(EvaluationError, match=r"summary\.json: metric_per_case\.0.*dice must be a number"):
        EvaluationSummary.load(out)
