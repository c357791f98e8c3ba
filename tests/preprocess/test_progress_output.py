"""Default output is one bar per stage over cases; per-case bars only for big cases; INFO needs -v."""

from __future__ import annotations

import logging

import pytest

from voxflow import cluster
from voxflow._cliutil import configure_logging
from voxflow.preprocess import run_preprocess


def _write_label_folders(root, rng) -> None:  # noqa: ANN001
    """Two random binary 6x8x8 label files in ``root/pred`` and ``root/ref`` each."""
    import numpy as np
    import SimpleITK as sitk

    for folder in ("pred", "ref"):
        (root / folder).mkdir()
        for i in range(2):
            lab = (rng.random((6, 8, 8)) > 0.6).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(root / folder / f"c{i}.nii.gz"))


def test_one_preprocess_bar_over_cases_and_no_per_case_bars(tmp_path, small_store, helpers, capsys) -> None:
    src = small_store(n_cases=3)
    plan = helpers.make_plan(helpers.make_config())
    run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=True)
    err = capsys.readouterr().err
    assert "preprocess: 100%" in err
    assert "3/3" in err
    assert "nonzero boxes" not in err  # small cases find their box in their own task
    assert not [c for c in src.case_ids() if f"preprocess {c}" in err], err  # small cases: no bar of their own


def test_big_cases_get_their_own_bars(tmp_path, small_store, helpers, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "BIG_CASE_VOXELS", 1)
    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)  # a big case is never small
    src = small_store(n_cases=2)
    run_preprocess(src, helpers.make_plan(helpers.make_config()), "3d_fullres", tmp_path / "pp.zarr", progress=True)
    err = capsys.readouterr().err
    assert "nonzero boxes: 100%" in err
    assert all(f"preprocess {c}" in err for c in src.case_ids())
    assert cluster.case_progress(True, 10)
    assert not cluster.case_progress(False, 10)


@pytest.mark.parametrize(("verbose", "level"), [(0, logging.WARNING), (1, logging.INFO), (2, logging.DEBUG)])
def test_info_lines_only_with_v(verbose: int, level: int) -> None:
    logger = logging.getLogger("voxflow")
    before = logger.level
    try:
        configure_logging(verbose)
        assert logger.getEffectiveLevel() == level
    finally:
        logger.setLevel(before)


def test_evaluate_and_postprocessing_selection_show_bars(tmp_path, rng, capsys) -> None:

    from voxflow.evaluate import evaluate
    from voxflow.postprocess import determine_postprocessing

    _write_label_folders(tmp_path, rng)
    evaluate(tmp_path / "pred", tmp_path / "ref", labels=[1])
    determine_postprocessing(tmp_path / "pred", tmp_path / "ref", labels=[1])
    err = capsys.readouterr().err
    assert "evaluate 2 small cases" in err
    assert "postprocessing selection (2 cases): 100%" in err


def test_evaluate_of_big_cases_shows_its_two_bars(tmp_path, rng, capsys, monkeypatch: pytest.MonkeyPatch) -> None:

    from voxflow.evaluate import evaluate

    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)
    _write_label_folders(tmp_path, rng)
    evaluate(tmp_path / "pred", tmp_path / "ref", labels=[1])
    err = capsys.readouterr().err
    assert "evaluate 2 cases: overlap" in err
    assert "evaluate 2 cases: surface distances" in err
