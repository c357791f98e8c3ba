"""`voxflow demo`: the whole workflow on the built-in synthetic CT dataset, sized for a laptop.

It writes a deterministic synthetic nnU-Net-format dataset (training cases plus held-out test cases),
runs :func:`voxflow.pipeline.run_workflow` with the planner's ``cpu`` preset (or the default preset on
CUDA), segments the held-out cases with the trained model, scores them against their ground truth and
writes a PNG of a few slices. On 2 CPU cores it finishes in a few minutes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxflow._types import PathLikeStr
from voxflow.pipeline._workflow import RunOptions, run_workflow
from voxflow.workspace import Workspace

__all__ = ["DemoOptions", "napari_command", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """Size of the demo. Defaults fit 2 CPU cores in well under 10 minutes."""

    n_train: int = 8
    n_test: int = 3
    shape_zyx: tuple[int, int, int] = (32, 80, 80)
    epochs: int = 25
    iters_per_epoch: int = 20
    device: str = "cpu"
    scheduler: str = "threads"
    tta: bool = False
    seed: int = 0


def _overrides(o: DemoOptions) -> dict[str, str]:
    return {
        "train.epochs": str(o.epochs),
        "train.iters_per_epoch": str(o.iters_per_epoch),
        "train.val_iters": "4",
        "train.checkpoint_every": "4",
        "train.mirror_axes": "[1, 2]",
    }


def run_demo(
    work: PathLikeStr, options: DemoOptions | None = None, *, report: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the demo in ``work``; returns a summary with per-class Dice on the held-out cases."""
    from voxflow.evaluate import evaluate
    from voxflow.infer import predict
    from voxflow.synthetic import make_dataset

    o = options or DemoOptions()
    report = report or log.info
    ws = Workspace(work).ensure()
    t0 = time.perf_counter()
    raw = ws.root / "raw"
    if not (raw / "dataset.json").is_file():
        make_dataset(raw, kind="ct", n_cases=o.n_train, n_test_cases=o.n_test, shape_zyx=o.shape_zyx, seed=o.seed)
        report(
            f"[data] synthetic CT dataset ({o.n_train} training + {o.n_test} held-out cases, "
            f"{'x'.join(map(str, o.shape_zyx))} voxels) -> {raw}"
        )
    else:
        report(f"[data] skipped: {raw} exists")
    preset = "default" if o.device.startswith("cuda") else "cpu"
    run_opts = RunOptions(
        configurations=("3d_fullres",),
        folds=("0",),
        scheduler=o.scheduler,
        device=o.device,
        preset=preset,
        overrides=_overrides(o),
        tta=o.tta,
    )
    summary = run_workflow(raw, ws, run_opts, report=report)
    test_out = ws.root / "test_predictions"
    pred = predict(
        raw / "imagesTs",
        test_out,
        model_dir=ws.configuration_dir("3d_fullres"),
        folds=[0],
        device=o.device,
        tta=o.tta,
        scheduler=o.scheduler,
    )
    report(f"[predict] {len(pred.case_ids())} held-out cases -> {test_out}")
    scores = evaluate(pred, raw / "labelsTs", output=test_out / "summary.json", scheduler=o.scheduler)
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    names = {str(v): k for k, v in labels.items() if not isinstance(v, list)}
    dice = {names.get(k, k): v.get("dice") for k, v in scores.mean.items()}
    png = _figure(raw, pred, ws.root / "demo_slices.png")
    wall = time.perf_counter() - t0
    result = {
        "dice_held_out": dice,
        "cv": summary,
        "wall_s": round(wall, 1),
        "prediction_store": str(pred.path),
        "figure": str(png),
        "test_predictions": str(test_out),
    }
    (ws.root / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str))
    _report_outputs(report, dice, pred, test_out, png, ws, wall)
    return result


def _report_outputs(
    report: Callable[[str], None],
    dice: dict[str, Any],
    pred: Any,
    test_out: Path,
    png: Path,
    ws: Workspace,
    wall: float,
) -> None:
    """The demo's closing lines: held-out Dice, total time and where each output is."""
    report("")
    report(f"Dice on {len(pred.case_ids())} held-out synthetic cases:")
    for name, d in dice.items():
        report(f"  {name:<10} {d:.3f}" if d is not None and not math.isnan(d) else f"  {name:<10} n/a")
    report(f"Total time {wall / 60:.1f} min. Outputs:")
    report(f"  predictions (NIfTI)  {test_out}/*.nii.gz   -- open with any viewer, e.g. 3D Slicer or ITK-SNAP")
    report(f"  prediction store     {pred.path}   (OME-NGFF; view a case over its image in napari:)")
    if pred.case_ids():
        report(f"    {napari_command(pred, pred.case_ids()[0], image_store=test_out / '.input' / 'input.zarr')}")
    report(f"  slices figure        {png}")
    report(f"  training curves      {ws.run_dir('3d_fullres', 0) / 'progress.png'}")
    report(
        f"  model                {ws.configuration_dir('3d_fullres')}   "
        f"(package it: voxflow export-model {ws.root} -o model.zip)"
    )


def napari_command(pred: Any, case_id: str, *, image_store: PathLikeStr | None = None) -> str:
    """The shell command that opens a predicted case in napari, over its image from ``image_store``
    when that store holds the case (``napari-ome-zarr`` reads both stores as OME-NGFF)."""
    import shlex

    paths = []
    if image_store is not None and (Path(image_store) / "cases" / case_id / "zarr.json").is_file():
        paths.append(str(Path(image_store) / "cases" / case_id))
    paths.append(str(pred.path / "cases" / case_id))
    return "napari --plugin napari-ome-zarr " + " ".join(shlex.quote(p) for p in paths)


def _figure(raw: Path, pred: Any, path: Path) -> Path:
    import SimpleITK as sitk

    from voxflow.pipeline._figure import save_comparison_png

    rows = []
    for cid in pred.case_ids()[:2]:
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTs" / f"{cid}_0000.nii.gz")))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{cid}.nii.gz")))
        rows.append((cid, img.astype(np.float32), gt, np.asarray(pred.label(cid))))
    return save_comparison_png(rows, path)
