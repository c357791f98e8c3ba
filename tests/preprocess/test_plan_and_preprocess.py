"""`voxflow plan-and-preprocess`: convert -> fingerprint -> plan -> preprocess, from the CLI."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.plan.schema import Plan
from voxflow.store import Store
from voxflow.workspace import Workspace


def test_plan_and_preprocess_from_raw_dataset_and_from_store(tmp_path) -> None:
    from voxflow.synthetic import make_dataset

    raw = make_dataset(tmp_path / "raw", kind="ct", n_cases=2, shape_zyx=(12, 24, 24), seed=1)
    ws = Workspace(tmp_path / "work")
    result = CliRunner().invoke(
        main, ["plan-and-preprocess", str(raw), "--work", str(ws.root), "--preset", "cpu", "-c", "3d_fullres"]
    )
    assert result.exit_code == 0, result.output
    plan = Plan.load(ws.plans)
    assert ws.fingerprint.is_file()
    assert "3d_fullres" in plan.configurations
    pp = Store.open(ws.preprocessed("3d_fullres"))
    src = Store.open(ws.dataset_store)
    assert pp.case_ids() == src.case_ids()
    assert len(pp.case_ids()) == 2
    cfg = plan.configuration("3d_fullres")
    for cid in pp.case_ids():
        geom = pp.geometry(cid)
        assert pp.image(cid).shape == (1, *geom.shape_zyx)
        np.testing.assert_allclose(np.asarray(geom.spacing_zyx), cfg.spacing_zyx, rtol=0.1)
        assert set(pp.case_attrs(cid)["classes_present"]) <= {0, 1, 2}
    # a store as SRC is used as is; complete cases are skipped on the rerun
    again = CliRunner().invoke(
        main,
        ["plan-and-preprocess", str(ws.dataset_store), "--work", str(ws.root), "--preset", "cpu", "-c", "3d_fullres"],
    )
    assert again.exit_code == 0, again.output
    assert "3d_fullres: 2 cases" in again.output


def test_plan_and_preprocess_real_hippocampus_cases(tmp_path, shared_data) -> None:
    """Real MSD data (uint8 and float32 images, a float32 label file) through the whole command."""
    src = tmp_path / "hippo"
    for sub in ("images", "labels"):
        (src / sub).mkdir(parents=True)
        for name in ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz"):
            (src / sub / name).symlink_to(shared_data / "hippocampus-dev" / sub / name)
    ws = Workspace(tmp_path / "work")
    result = CliRunner().invoke(
        main, ["plan-and-preprocess", str(src), "--work", str(ws.root), "--preset", "cpu", "-c", "3d_fullres"]
    )
    assert result.exit_code == 0, result.output
    pp = Store.open(ws.preprocessed("3d_fullres"))
    norm = Plan.load(ws.plans).configuration("3d_fullres").normalization[0]
    assert norm.scheme == "zscore"
    for cid in pp.case_ids():
        image = pp.image(cid).compute()[0]
        sel = image[image != 0] if norm.use_mask else image
        assert abs(float(sel.mean())) < 0.05
        assert abs(float(sel.std()) - 1.0) < 0.05
        label = pp.label(cid).compute()
        fg = pp.zarr_array(cid, "fg_index")[...]
        assert set(np.unique(label)) == {0, 1, 2}
        assert (label[fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0]).all()
