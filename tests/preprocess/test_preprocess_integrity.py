"""Issue 19: preprocess takes the store lock, resumes past damaged cases, records the cases asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from voxflow._lock import exclusive_lock, read_lock, store_lock_file
from voxflow.preprocess import run_preprocess
from voxflow.store import Store

HOLD = """
import sys
from voxflow._lock import exclusive_lock
with exclusive_lock(sys.argv[1], command="holder-under-test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_preprocess_fails_at_once_naming_the_holder(tmp_path: Path, small_store, helpers) -> None:
    src = small_store(2)
    work = tmp_path / "work"
    work.mkdir()
    helpers.make_plan(helpers.make_config()).save(work / "plans.json")
    target = work / "preprocessed" / "3d_fullres.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store_lock_file(target))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run(
            [sys.executable, "-m", "voxflow", "preprocess", str(src.path), "--work", str(work)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode != 0
        assert f"pid {holder.pid}" in res.stderr
        assert "holder-under-test" in res.stderr
        assert "Traceback" not in res.stderr
        assert not (target / "zarr.json").exists()  # nothing written
        assert read_lock(store_lock_file(target))["pid"] == holder.pid
    finally:
        holder.communicate(timeout=30)
    assert holder.returncode == 0
    assert not store_lock_file(target).exists()


def test_resume_redoes_a_case_with_damaged_metadata(tmp_path: Path, small_store, helpers) -> None:
    src = small_store(2)
    plan = helpers.make_plan(helpers.make_config())
    out_path = tmp_path / "pp.zarr"
    out = run_preprocess(src, plan, "3d_fullres", out_path, scheduler="sync", progress=False)
    assert out.unfinished_case_ids() == []
    assert not store_lock_file(out_path).exists()
    ref = out.image("case_001").compute()
    meta = out_path / "cases" / "case_001" / "label" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:30])
    out = run_preprocess(src, plan, "3d_fullres", out_path, scheduler="sync", progress=False)
    assert out.case_ids() == ["case_000", "case_001"]
    assert out.metadata_intact("case_001")
    assert (out.image("case_001").compute() == ref).all()


def test_cases_not_yet_started_count_as_unfinished(tmp_path: Path, small_store, helpers) -> None:
    src = small_store(3)
    plan = helpers.make_plan(helpers.make_config())
    out = run_preprocess(
        src, plan, "3d_fullres", tmp_path / "pp.zarr", scheduler="sync", progress=False, case_ids=["case_000"]
    )
    assert out.unfinished_case_ids() == []  # asked for one case only: done
    out.expect_cases(["case_000"], source=src.path)  # as a full run records it
    assert out.unfinished_case_ids() == ["case_001", "case_002"]
    with exclusive_lock(store_lock_file(tmp_path / "pp.zarr"), command="test"):  # re-entrant in one process
        out = run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", scheduler="sync", progress=False)
    assert out.unfinished_case_ids() == []
    assert Store.open(tmp_path / "pp.zarr").case_ids() == ["case_000", "case_001", "case_002"]
