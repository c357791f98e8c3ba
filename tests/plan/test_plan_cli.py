from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.fingerprint import Fingerprint
from voxflow.geometry import Geometry
from voxflow.plan import Plan
from voxflow.store import DatasetMeta, Store
from voxflow.testing import synthetic_case


def _store(path) -> Store:
    store = Store.create(path, DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2}))
    rng = np.random.default_rng(5)
    for i in range(2):
        image, label = synthetic_case((12, 20, 18), rng=rng)
        store.begin_case(f"case_{i}", geometry=Geometry(shape_zyx=(12, 20, 18), spacing_zyx=(2.5, 0.8, 0.8)))
        store.create_array(f"case_{i}", "image", shape=image.shape, dtype=image.dtype, chunks=(1, 5, 8, 7))[...] = image
        store.create_array(f"case_{i}", "label", shape=label.shape, dtype=label.dtype, chunks=(5, 8, 7))[...] = label
        store.mark_complete(f"case_{i}")
    return store


def test_fingerprint_and_plan_commands(tmp_path) -> None:
    work = tmp_path / "work"
    _store(work / "dataset.zarr")
    runner = CliRunner()
    res = runner.invoke(main, ["fingerprint", "--work", str(work), "--samples-per-case", "50"])
    assert res.exit_code == 0, res.output
    fp = Fingerprint.load(work / "fingerprint.json")
    assert fp.n_cases == 2
    assert fp.samples_per_case == 50
    assert fp.intensity[0].n_samples == sum(min(50, c.n_foreground_voxels) for c in fp.cases) > 50
    res = runner.invoke(
        main,
        ["plan", "--work", str(work), "--preset", "cpu", "--set", "train.epochs=3", "--set", "3d_fullres.batch_size=3"],
    )
    assert res.exit_code == 0, res.output
    for row in ("spacing_zyx (mm)", "median shape", "patch", "batch", "stages", "kernels", "normalisation"):
        assert row in res.output
    plan = Plan.load(work / "plans.json")
    assert {c.train.epochs for c in plan.configurations.values()} == {3}
    assert plan.configuration("3d_fullres").batch_size == 3
    assert plan.preset == "cpu"
    out = tmp_path / "other.json"
    res = runner.invoke(main, ["plan", str(work / "fingerprint.json"), "-o", str(out), "--gpu-memory-gb", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["gpu_memory_gb"] == 2.0


def test_cli_errors_are_short_and_named(tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["plan", "--work", str(tmp_path)])
    assert res.exit_code != 0
    assert "run `voxflow fingerprint` first" in res.output
    res = runner.invoke(main, ["fingerprint", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "fp.json")])
    assert res.exit_code != 0
    assert "nope.zarr" in res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a clean error, not a crash
    (tmp_path / "fingerprint.json").write_text("{}")
    _store(tmp_path / "dataset.zarr")
    res = runner.invoke(main, ["fingerprint", "--work", str(tmp_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["plan", "--work", str(tmp_path), "--set", "train.epochz=3"])
    assert res.exit_code != 0
    assert "epochz" in res.output
