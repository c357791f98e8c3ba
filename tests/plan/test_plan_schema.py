from __future__ import annotations

import json

import numpy as np
import pytest

from voxflow.errors import PlanError
from voxflow.fingerprint import AxisStats, CaseFingerprint, Fingerprint, IntensityStats
from voxflow.plan import Plan, plan_experiment


@pytest.fixture(scope="module")
def plan() -> Plan:
    shapes, spacings = [(60, 300, 300)] * 4, [(3.0, 0.8, 0.8)] * 4
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i}",
            shape_zyx=s,
            spacing_zyx=sp,
            nonzero_bbox_zyx=tuple((0, n) for n in s),
            shape_after_crop_zyx=s,
            fraction_kept_by_crop=1.0,
        )
        for i, (s, sp) in enumerate(zip(shapes, spacings, strict=True))
    )
    st = IntensityStats(
        channel="CT",
        n_samples=10,
        mean=40.0,
        std=30.0,
        median=35.0,
        min=-50.0,
        max=200.0,
        percentile_00_5=-40.0,
        percentile_99_5=180.0,
    )
    fp = Fingerprint(
        channel_names=("CT",),
        labels={"background": 0, "organ": 1},
        samples_per_case=10,
        seed=0,
        cases=cases,
        intensity=(st,),
        classes=(),
        spacing=AxisStats.of(np.array(spacings)),
        shape=AxisStats.of(np.array(shapes)),
        shape_after_crop=AxisStats.of(np.array(shapes)),
    )
    return plan_experiment(fp, preset="cpu")


def test_json_round_trip(plan: Plan, tmp_path) -> None:
    path = tmp_path / "plans.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert json.loads(path.read_text())["configurations"]["3d_fullres"]["patch_size_vox"] == list(
        plan.configuration("3d_fullres").patch_size_vox
    )


def _edit(plan: Plan, tmp_path, change) -> Plan:
    data = plan.to_dict()
    change(data["configurations"]["3d_fullres"])
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return Plan.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(batch_size=0), r"configurations\.3d_fullres.*batch_size must be a positive integer"),
        (
            lambda c: c.update(patch_size_vox=[c["patch_size_vox"][0] + 1, *c["patch_size_vox"][1:]]),
            r"configurations\.3d_fullres.*patch_size_vox .* divisible",
        ),
        (lambda c: c["normalization"][0].update(scheme="zcore"), r"normalization\[0\]\.scheme .*Did you mean 'zscore'"),
        (lambda c: c.update(batchsize=2), r"unknown field.*'batchsize'.*did you mean 'batch_size'"),
        (
            lambda c: c["network"].update(kernel_sizes=[[2, 3, 3]] * c["network"]["n_stages"]),
            r"kernel_sizes must be odd",
        ),
        (
            lambda c: c["train"].update(epochs=-1),
            r"configurations\.3d_fullres\.train.*epochs must be a positive integer",
        ),
        (lambda c: c["resampling"].update(image_order=5), r"resampling.*image_order must be a spline order"),
        (lambda c: c.update(spacing_zyx=[1.0, 1.0]), r"spacing_zyx must have 3 entries"),
    ],
)
def test_invalid_edits_name_the_field(plan: Plan, tmp_path, change, message: str) -> None:
    with pytest.raises(PlanError, match=message) as err:
        _edit(plan, tmp_path, change)
    assert "edited.json" in str(err.value)


def test_overrides(plan: Plan) -> None:
    out = plan.with_overrides({"3d_fullres.train.epochs": "7", "2d.batch_size": "3"})
    assert out.configuration("3d_fullres").train.epochs == 7
    assert out.configuration("2d").batch_size == 3
    assert out.configuration("2d").train.epochs == plan.configuration("2d").train.epochs
    rel = plan.with_overrides({"train.mirror_axes": "[1, 2]"}, configuration="3d_fullres")
    assert rel.configuration("3d_fullres").train.mirror_axes == (1, 2)
    with pytest.raises(PlanError, match="did you mean 'epochs'|Did you mean 'epochs'"):
        plan.with_overrides({"train.epoch": "3"}, configuration="3d_fullres")
    with pytest.raises(PlanError, match="batch_size"):
        plan.with_overrides({"3d_fullres.batch_size": "0"})
